"""``ktizo users``, ``ktizo tokens`` and ``ktizo audit``."""

from __future__ import annotations

import datetime as dt
import sys
from typing import Annotated

import typer

from ktizo.cli.common import print_json, print_table, reports_errors, state
from ktizo.domain.users import UserRole
from ktizo.services.audit import AuditQuery
from ktizo.services.context import Actor

users_app = typer.Typer(help="Operator accounts.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens (sent as `Authorization: Bearer …`).", no_args_is_help=True)
audit_app = typer.Typer(help="The audit trail.", no_args_is_help=True)


@users_app.command("create")
@reports_errors
def create_user(
    ctx: typer.Context,
    username: str,
    role: Annotated[UserRole, typer.Option(help="viewer, operator or admin")] = UserRole.OPERATOR,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from stdin")] = False,
) -> None:
    """Create a user; the password is prompted for (or read from stdin)."""
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
    """Give a user a new random password and print it once (for a forgotten admin password too)."""
    password = state(ctx).services().users.reset_password(Actor.cli(), username)
    typer.echo(password)
    typer.echo(f"new password for {username}: hand it over; they can sign in at once", err=True)


@users_app.command("disable")
@reports_errors
def disable_user(ctx: typer.Context, username: str) -> None:
    """Disable a user: their password and tokens stop working at once."""
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
    name: Annotated[str, typer.Option(help="A label to recognise the token by")] = "cli",
    expires_days: Annotated[int | None, typer.Option(min=1, help="Expire after this many days")] = None,
) -> None:
    """Create an API token for USERNAME and print it (only the token, only this once)."""
    ttl = dt.timedelta(days=expires_days) if expires_days else None
    token = state(ctx).services().users.create_token(Actor.cli(), username, name=name, ttl=ttl)
    typer.echo(token)


@audit_app.command("list")
@reports_errors
def list_audit(
    ctx: typer.Context,
    device: Annotated[str | None, typer.Option(metavar="MAC|ID", help="Only this device's events")] = None,
    actor: Annotated[str | None, typer.Option()] = None,
    action: Annotated[str | None, typer.Option(help="e.g. approve, config_download, identity_mismatch")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10000)] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Newest events first."""
    services = state(ctx).services()
    device_id = services.devices.resolve(device).id if device else None
    rows, total = services.audit.list(AuditQuery(device_id=device_id, actor=actor, action=action, limit=limit))
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
                    )
                }
                for r in rows
            ]
        )
        return
    print_table(
        ["at", "actor", "action", "device", "from", "details"],
        [
            (
                r.at.strftime("%Y-%m-%d %H:%M:%S"),
                r.actor,
                r.action,
                r.device_mac or r.device_id,
                r.source_ip,
                r.details or "",
            )
            for r in rows
        ],
    )
    if total > len(rows):
        typer.echo(f"({len(rows)} of {total} events; use --limit)")
