"""``ktizo users``, ``ktizo tokens`` and ``ktizo audit``."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from ktizo.cli.common import choices, print_json, print_table, reports_errors, state
from ktizo.domain.bounds import parse_id
from ktizo.domain.errors import NotFound
from ktizo.domain.identity import normalize_mac
from ktizo.domain.users import UserRole
from ktizo.services.context import Actor
from ktizo.services.queries import AuditEntry, AuditQuery

if TYPE_CHECKING:
    from ktizo.services.registry import Services

users_app = typer.Typer(help="Operator accounts: create, reset a password, disable.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens (sent as `Authorization: Bearer …`).", no_args_is_help=True)
audit_app = typer.Typer(help="The audit trail.", no_args_is_help=True)


@users_app.command("create")
@reports_errors
def create_user(
    ctx: typer.Context,
    username: str,
    role: Annotated[UserRole, typer.Option(help="What the user may do", **choices(UserRole))] = UserRole.OPERATOR,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from stdin")] = False,
) -> None:
    """Create a user (asks for the password).

    Roles: viewer reads; operator approves, rejects, edits and deletes devices; admin does everything."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    user = state(ctx).services().users.create(Actor.cli(), username, role, password)
    typer.echo(f"created user {user.username} ({user.role})")


@users_app.command("list")
@reports_errors
def list_users(ctx: typer.Context) -> None:
    """List users."""
    users = state(ctx).services().users.list()
    print_table(
        ["username", "role", "disabled", "last login"],
        [(u.username, u.role, "yes" if u.disabled else "", u.last_login_at) for u in users],
    )


@users_app.command("reset-password")
@reports_errors
def reset_password(ctx: typer.Context, username: str) -> None:
    """Set a new random password and print it once.

    Also the way back in when the only admin forgot theirs."""
    password = state(ctx).services().users.reset_password(Actor.cli(), username)
    typer.echo(password)
    typer.echo(f"new password for {username}: hand it over; they can sign in at once", err=True)


@users_app.command("disable")
@reports_errors
def disable_user(ctx: typer.Context, username: str) -> None:
    """Disable a user (password and tokens stop working)."""
    user = state(ctx).services().users.set_disabled(Actor.cli(), username, True)
    typer.echo(f"disabled {user.username}")


@users_app.command("enable")
@reports_errors
def enable_user(ctx: typer.Context, username: str) -> None:
    """Enable a disabled user again."""
    user = state(ctx).services().users.set_disabled(Actor.cli(), username, False)
    typer.echo(f"enabled {user.username}")


@tokens_app.command("create")
@reports_errors
def create_token(
    ctx: typer.Context,
    username: str,
    name: Annotated[str, typer.Option(metavar="LABEL", help="A label to recognise the token by")] = "cli",
    expires_days: Annotated[
        int | None, typer.Option(min=1, max=3650, metavar="DAYS", help="Expire after this many days [default: never]")
    ] = None,
) -> None:
    """Create an API token for USERNAME and print it.

    Only the token is printed, and only this once: Ktizo keeps just its hash."""
    ttl = dt.timedelta(days=expires_days) if expires_days else None
    token = state(ctx).services().users.create_token(Actor.cli(), username, name=name, ttl=ttl)
    typer.echo(token)


@audit_app.command("list")
@reports_errors
def list_audit(
    ctx: typer.Context,
    device: Annotated[
        str | None,
        typer.Option(metavar="MAC|ID", help="Only this device's events (a deleted device's too)"),
    ] = None,
    actor: Annotated[
        str | None, typer.Option(metavar="NAME", help="Only events by this user, or `cli`, `device`, `system`")
    ] = None,
    action: Annotated[
        str | None, typer.Option(metavar="ACTION", help="e.g. approve, config_download, identity_mismatch")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10000, help="Show at most this many")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """The audit trail, newest events first."""
    services = state(ctx).services()
    if device is None:
        rows, total = services.audit.list(AuditQuery(actor=actor, action=action, limit=limit))
    else:
        rows, total = _device_events(services, device, actor, action, limit)
    if as_json:
        print_json(
            [
                {
                    c: getattr(r, c)
                    for c in (
                        "id",
                        "at",
                        "actor",
                        "actor_type",
                        "action",
                        "device_id",
                        "device_mac",
                        "source_ip",
                        "details",
                        "count",
                    )
                }
                for r in rows
            ]
        )
        return
    if not rows:
        typer.echo("No audit events" + (f" for device {device}" if device else "") + ".")
        return
    print_table(
        ["at", "actor", "action", "device", "from", "details"],
        [
            (
                r.at.strftime("%Y-%m-%d %H:%M:%S"),
                r.actor,
                r.action + (f" (x{r.count})" if r.count > 1 else ""),
                r.device_mac or r.device_id,
                r.source_ip,
                json.dumps(r.details, sort_keys=True, default=str) if r.details else "",
            )
            for r in rows
        ],
    )
    if total > len(rows):
        typer.echo(f"({len(rows)} of {total} events; use --limit)")


# Events that remove a device row; what the audit log keeps of it is its id and MAC.
_REMOVALS = ("delete", "expire")


def _device_events(
    services: Services, ref: str, actor: str | None, action: str | None, limit: int
) -> tuple[list[AuditEntry], int]:
    """Events of the device ``ref`` names: an id directly (its row may be gone), or a MAC, which covers every device
    that had it, deleted ones included (deleted and seen again, a machine is a new device with a new id)."""
    ref = ref.strip()
    if ref.isascii() and ref.isdigit() and len(ref) != 12:  # as devices.resolve reads it: 12 digits is a bare MAC
        device_id = parse_id(ref)
        if device_id is None:
            raise NotFound(f"no device with id {ref}")
        return services.audit.list(AuditQuery(device_id=device_id, actor=actor, action=action, limit=limit))
    mac = normalize_mac(ref, "device")
    ids = set()
    with contextlib.suppress(NotFound):
        ids.add(services.devices.resolve(mac).id)
    # AuditQuery has no MAC filter: find the ids of removed devices with this MAC from their removal events.
    for removal in _REMOVALS:
        offset = 0
        while True:
            page, total = services.audit.list(AuditQuery(action=removal, limit=1000, offset=offset))
            ids.update(e.device_id for e in page if e.device_mac == mac and e.device_id is not None)
            offset += len(page)
            if not page or offset >= total:
                break
    if not ids:
        raise NotFound(f"no device with MAC {mac}, now or deleted (`ktizo devices list` shows the devices Ktizo knows)")
    rows: list[AuditEntry] = []
    count = 0
    for device_id in ids:
        found, total = services.audit.list(AuditQuery(device_id=device_id, actor=actor, action=action, limit=limit))
        rows.extend(found)
        count += total
    rows.sort(key=lambda e: e.id, reverse=True)
    return rows[:limit], count
