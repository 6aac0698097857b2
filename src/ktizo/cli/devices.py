"""``ktizo devices …``: list, show, approve, reject, delete, unbind."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ktizo.cli.common import choices, fail, print_json, print_table, reports_errors, resolve_device, state, warn
from ktizo.db.models import Device
from ktizo.domain.devices import DeviceStatus, Role
from ktizo.domain.errors import InvalidTransition
from ktizo.domain.identity import normalize_hostname, normalize_interface_address
from ktizo.services.context import Actor
from ktizo.services.devices import DeviceChanges, DeviceQuery
from ktizo.services.registry import Services
from ktizo.services.render import GroupSpec

app = typer.Typer(help="Machines at the door: list, inspect, approve, reject.", no_args_is_help=True)

Ref = Annotated[str, typer.Argument(metavar="MAC|ID", help="Device id or MAC address (any spelling)")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")]
Notes = Annotated[str | None, typer.Option(metavar="TEXT", help="Free text kept with the device (audited)")]
Hostname = Annotated[str | None, typer.Option(metavar="NAME", help="RFC 1123 hostname")]
Ip = Annotated[str | None, typer.Option(metavar="CIDR", help="Static address in CIDR form, e.g. 10.0.5.100/24")]
_FIELDS = (
    "id",
    "mac_address",
    "status",
    "role",
    "hostname",
    "ip_address",
    "uuid",
    "serial",
    "source",
    "first_seen",
    "last_seen",
    "last_ip",
    "approved_at",
    "approved_by",
    "rejected_at",
    "rejected_by",
    "last_config_download",
    "notes",
    "labels",
    "patch",
    "install_disk",
    "lease_ip",
    "installed_at",
    "extra_nics",
    "facts",
    "revision",
)


def as_dict(device: Device) -> dict[str, Any]:
    return {name: getattr(device, name) for name in _FIELDS}


def approval_changes(hostname: str | None, ip: str | None, role: Role | None, notes: str | None) -> DeviceChanges:
    """The fields an approval sets, from command-line options (unset options leave the device's values)."""
    changes = DeviceChanges()
    if hostname is not None:
        changes.hostname = normalize_hostname(hostname)
    if ip is not None:
        changes.ip_address = normalize_interface_address(ip)
    if role is not None:
        changes.role = role
    if notes is not None:
        changes.notes = notes
    return changes


@app.command("list")
@reports_errors
def list_devices(
    ctx: typer.Context,
    status: Annotated[DeviceStatus | None, typer.Option(help="Only devices in this state")] = None,
    search: Annotated[str | None, typer.Option("--search", "-q", help="Match MAC, hostname, IP, serial")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    limit: Annotated[int, typer.Option(min=1, max=100000)] = 1000,
) -> None:
    """List devices, oldest first."""
    rows, total = state(ctx).services().devices.list(DeviceQuery(status=status, search=search, limit=limit))
    if as_json:
        print_json([as_dict(d) for d in rows])
        return
    if not rows:
        typer.echo("No devices" + (f" with status {status.value}" if status else "") + ".")
        return
    print_table(
        ["id", "mac", "status", "role", "hostname", "ip", "last seen"],
        [
            (
                d.id,
                d.mac_address or "-",
                d.status,
                d.role,
                d.hostname,
                d.ip_address,
                d.last_seen.strftime("%Y-%m-%d %H:%M:%S") if d.last_seen else "",
            )
            for d in rows
        ],
    )
    if total > len(rows):
        typer.echo(f"(showing {len(rows)} of {total}; use --limit)")


@app.command()
@reports_errors
def show(ctx: typer.Context, ref: Ref, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Everything Ktizo knows about one device."""
    device = state(ctx).services().devices.resolve(ref)
    data = as_dict(device)
    if as_json:
        print_json(data)
        return
    for key, value in data.items():
        typer.echo(f"{key + ':':<22}{'' if value is None else value}")


@app.command()
@reports_errors
def approve(
    ctx: typer.Context,
    ref: Ref,
    hostname: Annotated[str | None, typer.Option(help="RFC 1123 hostname")] = None,
    ip: Annotated[str | None, typer.Option(help="Static address in CIDR form, e.g. 10.0.5.100/24")] = None,
    role: Annotated[Role | None, typer.Option(help="controlplane or worker [default: keep, worker if new]")] = None,
    notes: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Approve a pending or rejected device; its next config request gets its Talos config."""
    services = state(ctx).services()
    device = services.devices.resolve(ref)
    changes = approval_changes(hostname, ip, role, notes)
    device = services.devices.approve(Actor.cli(), device.id, changes)
    typer.echo(
        f"approved device {device.id} ({device.mac_address}) as {device.role}"
        + (f", hostname {device.hostname}" if device.hostname else "")
        + (f", ip {device.ip_address}" if device.ip_address else "")
    )


@app.command()
@reports_errors
def reject(ctx: typer.Context, ref: Ref, notes: Annotated[str | None, typer.Option()] = None) -> None:
    """Reject a pending device, or revoke an approved one."""
    services = state(ctx).services()
    device = services.devices.resolve(ref)
    device = services.devices.reject(Actor.cli(), device.id, notes)
    typer.echo(f"rejected device {device.id} ({device.mac_address})")


@app.command()
@reports_errors
def delete(
    ctx: typer.Context, ref: Ref, yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask")] = False
) -> None:
    """Delete a device record (its audit history stays). If it boots again it is pending anew."""
    services = state(ctx).services()
    device = services.devices.resolve(ref)
    if not yes:
        typer.confirm(f"Delete device {device.id} ({device.mac_address}, {device.status})?", abort=True)
    services.devices.delete(Actor.cli(), device.id)
    typer.echo(f"deleted device {device.id}")


@app.command()
@reports_errors
def unbind(ctx: typer.Context, ref: Ref) -> None:
    """Forget the UUID/serial bound to a device (after a mainboard swap, say)."""
    services = state(ctx).services()
    device = services.devices.unbind(Actor.cli(), services.devices.resolve(ref).id)
    typer.echo(f"cleared the identity binding of device {device.id}")


@app.command()
@reports_errors
def config(
    ctx: typer.Context,
    ref: Ref,
    reveal: Annotated[bool, typer.Option("--reveal", help="Show private keys and tokens (audited)")] = False,
) -> None:
    """Print the config the device would receive now (secrets redacted unless --reveal)."""
    services = state(ctx).services()
    device = services.devices.resolve(ref)
    typer.echo(services.preview.config(Actor.cli(), device.id, reveal=reveal), nl=False)


@app.command()
@reports_errors
def edit(
    ctx: typer.Context,
    ref: Ref,
    label: Annotated[list[str] | None, typer.Option("--label", help="KEY=VALUE (repeat); KEY= removes")] = None,
    patch_file: Annotated[
        Path | None,
        typer.Option("--patch-file", exists=True, dir_okay=False, help="The device's own Talos strategic-merge patch"),
    ] = None,
    clear_patch: Annotated[bool, typer.Option("--clear-patch")] = False,
    install_disk: Annotated[str | None, typer.Option(help="Overrides the cluster's install disk")] = None,
    hostname: Annotated[str | None, typer.Option()] = None,
    ip: Annotated[str | None, typer.Option(help="Static address in CIDR form")] = None,
    role: Annotated[Role | None, typer.Option()] = None,
    notes: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Change a device's fields, labels, patch or install disk (its config re-renders on the next request)."""
    services = state(ctx).services()
    device = services.devices.resolve(ref)
    changes = DeviceChanges()
    if label:
        labels = dict(device.labels or {})
        for pair in label:
            key, sep, value = pair.partition("=")
            if not sep:
                raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--label")
            if value:
                labels[key] = value
            else:
                labels.pop(key, None)
        changes.labels = labels
    if patch_file is not None:
        changes.patch = patch_file.read_text()
    elif clear_patch:
        changes.patch = None
    if install_disk is not None:
        changes.install_disk = install_disk or None
    if hostname is not None:
        changes.hostname = normalize_hostname(hostname)
    if ip is not None:
        changes.ip_address = normalize_interface_address(ip) if ip else None
    if role is not None:
        changes.role = role
    if notes is not None:
        changes.notes = notes
    device = services.devices.update(Actor.cli(), device.id, changes)
    typer.echo(f"updated device {device.id} (revision {device.revision})")


@app.command("approve-code")
@reports_errors
def approve_code(
    ctx: typer.Context,
    code: Annotated[str, typer.Argument(help="The code the machine's console shows, e.g. BCDF-GHJK")],
    hostname: Annotated[str | None, typer.Option(help="RFC 1123 hostname")] = None,
    ip: Annotated[str | None, typer.Option(help="Static address in CIDR form, e.g. 10.0.5.100/24")] = None,
    role: Annotated[Role | None, typer.Option(help="controlplane or worker")] = None,
    notes: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Approve the machine whose Talos console shows CODE (the OAuth device flow); it boots within seconds."""
    services = state(ctx).services()
    changes = approval_changes(hostname, ip, role, notes)
    device = services.netboot.approve_code(Actor.cli(), code, changes)
    typer.echo(f"approved device {device.id} ({device.mac_address}) for console code {code.upper()}")


@app.command()
@reports_errors
def installed(
    ctx: typer.Context,
    ref: Ref,
    reinstall: Annotated[bool, typer.Option("--reinstall", help="Netboot and install it again")] = False,
) -> None:
    """Mark Talos installed (iPXE boots the local disk), or with --reinstall let it netboot again."""
    services = state(ctx).services()
    device = services.devices.set_installed(Actor.cli(), services.devices.resolve(ref).id, not reinstall)
    typer.echo(f"device {device.id}: " + ("netboots again" if reinstall else "boots from its disk"))
