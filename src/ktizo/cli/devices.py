"""``ktizo devices …``: list, show, approve, reject, delete, unbind."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ktizo.cli.common import (
    choices,
    fail,
    print_json,
    print_table,
    reports_errors,
    resolve_device,
    safe,
    state,
    warn,
)
from ktizo.domain.devices import DeviceStatus, Role
from ktizo.domain.errors import InvalidTransition
from ktizo.domain.identity import normalize_hostname, normalize_interface_address
from ktizo.services.context import Actor
from ktizo.services.queries import DeviceChanges, DeviceQuery

if TYPE_CHECKING:
    from ktizo.services.records import Device
    from ktizo.services.registry import Services

app = typer.Typer(help="Machines at the door: list, inspect, approve, reject.", no_args_is_help=True)

Ref = Annotated[str, typer.Argument(metavar="MAC|ID", help="Device id or MAC address (any spelling)")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")]
Notes = Annotated[str | None, typer.Option(metavar="TEXT", help="Free text kept with the device (audited)")]
Hostname = Annotated[str | None, typer.Option(metavar="NAME", help="RFC 1123 hostname")]
Ip = Annotated[str | None, typer.Option(metavar="CIDR", help="Static address in CIDR form, e.g. 10.0.5.100/24")]
_FIELDS = (
    "id",
    "kind",
    "machine_id",
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


def group_memberships(services: Services, device: Device) -> list[dict[str, Any]]:
    """The groups whose patches apply to the device, in the order they apply (by the renderer's own rule)."""
    from ktizo.services.render import GroupSpec

    out = []
    for group, members in services.groups.all():
        spec = GroupSpec(
            id=group.id,
            name=group.name,
            priority=group.priority,
            revision=group.revision,
            selector=dict(group.selector or {}),
            members=frozenset(members),
            patch=None,  # membership does not depend on it; parsing it here could only fail
            gateway=group.gateway,
            nameservers=(),
        )
        if spec.applies_to(device.id, device.labels or {}):
            by = "member" if device.id in spec.members else "selector"
            out.append({"id": group.id, "name": group.name, "priority": group.priority, "by": by})
    return out


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


def warn_all(warnings: list[str]) -> None:
    for warning in warnings:
        warn(safe(warning))


def warn_without_base(services: Services, role: str | None) -> None:
    """Approval succeeds without a base config for the role, but the machine then gets 503 until there is one."""
    if role is None:  # an agent host gets a certificate, not a Talos config
        return
    if not services.cluster.base_status().get(role, {}).get("present", False):
        warn(
            f"there is no {role} base config yet: the machine gets 503 until you run `ktizo cluster generate` "
            f"(after `ktizo cluster set …`) or `ktizo cluster import-base {role} FILE`"
        )


@app.command("list")
@reports_errors
def list_devices(
    ctx: typer.Context,
    status: Annotated[
        DeviceStatus | None, typer.Option(help="Only devices in this state", **choices(DeviceStatus))
    ] = None,
    search: Annotated[
        str | None, typer.Option("--search", "-q", metavar="TEXT", help="Match MAC, hostname, IP, serial")
    ] = None,
    as_json: Json = False,
    limit: Annotated[int, typer.Option(min=1, max=100000, help="Show at most this many")] = 1000,
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


def _shown(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return safe(", ".join(f"{k}={v}" for k, v in value.items()))
    return safe(value)


@app.command()
@reports_errors
def show(ctx: typer.Context, ref: Ref, as_json: Json = False) -> None:
    """Everything Ktizo knows about one device."""
    services = state(ctx).services()
    device = resolve_device(services, ref)
    data = as_dict(device)
    data["groups"] = group_memberships(services, device)
    if as_json:
        print_json(data)
        return
    patch = data.pop("patch")
    nics = data.pop("extra_nics") or []
    groups = data.pop("groups")
    for key, value in data.items():
        typer.echo(f"{key + ':':<22}{_shown(value)}".rstrip())
    shown_groups = ", ".join(f"{g['name']} (by {g['by']})" for g in groups)
    typer.echo(f"{'groups:':<22}{safe(shown_groups)}".rstrip())
    for nic in nics:
        gateway = f" via {nic['gateway']}" if nic.get("gateway") else ""
        typer.echo(f"{'extra nic:':<22}{safe(nic['mac'])} {safe(', '.join(nic.get('addresses') or []))}{safe(gateway)}")
    typer.echo("patch:")
    for line in (patch or "").rstrip("\n").splitlines():
        typer.echo(f"  {safe(line)}")


@app.command()
@reports_errors
def approve(
    ctx: typer.Context,
    ref: Ref,
    hostname: Hostname = None,
    ip: Ip = None,
    role: Annotated[
        Role | None, typer.Option(help="[default: keep the device's; worker if new]", **choices(Role))
    ] = None,
    notes: Notes = None,
) -> None:
    """Approve a pending or rejected device.

    Its next config request gets its Talos config. To change an approved device, use `ktizo devices edit`."""
    services = state(ctx).services()
    device = resolve_device(services, ref)
    changes = approval_changes(hostname, ip, role, notes)
    try:
        device = services.devices.approve(Actor.cli(), device.id, changes)
    except InvalidTransition as exc:
        if device.status == DeviceStatus.APPROVED.value:
            fail(f"{exc.message}; to change its hostname, IP, role or notes use `ktizo devices edit {ref}`")
        raise
    typer.echo(
        f"approved device {device.id} ({device.mac_address}) as {device.role}"
        + (f", hostname {device.hostname}" if device.hostname else "")
        + (f", ip {device.ip_address}" if device.ip_address else "")
    )
    warn_without_base(services, device.role)
    warn_all(services.devices.warnings(device))


@app.command()
@reports_errors
def add(
    ctx: typer.Context,
    mac: Annotated[str, typer.Argument(metavar="MAC", help="The MAC address of the NIC the machine boots from")],
    hostname: Hostname = None,
    ip: Ip = None,
    role: Annotated[Role, typer.Option(help="[default: worker]", **choices(Role))] = Role.WORKER,
    label: Annotated[
        list[str] | None, typer.Option("--label", metavar="KEY=VALUE", help="A label (repeat); groups select by label")
    ] = None,
    notes: Notes = None,
) -> None:
    """Pre-register a machine before it boots.

    It waits as pending like any other: approve it now (`ktizo devices approve MAC`) or when it appears."""
    labels = {}
    for pair in label or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--label")
        labels[key] = value
    changes = DeviceChanges(mac_address=mac, role=role, labels=labels)
    if hostname is not None:
        changes.hostname = hostname
    if ip is not None:
        changes.ip_address = ip
    if notes is not None:
        changes.notes = notes
    services = state(ctx).services()
    device = services.devices.create(Actor.cli(), changes)
    typer.echo(f"added device {device.id} ({device.mac_address}) as pending {device.role}")


@app.command()
@reports_errors
def reject(ctx: typer.Context, ref: Ref, notes: Notes = None) -> None:
    """Reject a pending device, or revoke an approved one."""
    services = state(ctx).services()
    device = resolve_device(services, ref)
    device = services.devices.reject(Actor.cli(), device.id, notes)
    typer.echo(f"rejected device {device.id} ({device.mac_address})")


@app.command()
@reports_errors
def delete(
    ctx: typer.Context, ref: Ref, yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask")] = False
) -> None:
    """Delete a device record; its audit history stays.

    If the machine boots again it is pending anew. `ktizo audit list --device MAC|ID` still shows its history."""
    services = state(ctx).services()
    device = resolve_device(services, ref)
    if not yes:
        typer.confirm(f"Delete device {device.id} ({device.mac_address}, {device.status})?", abort=True)
    services.devices.delete(Actor.cli(), device.id)
    typer.echo(f"deleted device {device.id}")


@app.command()
@reports_errors
def unbind(ctx: typer.Context, ref: Ref) -> None:
    """Forget the UUID and serial bound to a device.

    After a mainboard swap, say: its next request binds the identity it reports then."""
    services = state(ctx).services()
    device = services.devices.unbind(Actor.cli(), resolve_device(services, ref).id)
    typer.echo(f"cleared the identity binding of device {device.id}")


@app.command()
@reports_errors
def config(
    ctx: typer.Context,
    ref: Ref,
    reveal: Annotated[bool, typer.Option("--reveal", help="Show private keys and tokens (audited)")] = False,
) -> None:
    """Print the config the device would receive now.

    Secrets are redacted unless --reveal."""
    services = state(ctx).services()
    device = resolve_device(services, ref)
    typer.echo(services.preview.config(Actor.cli(), device.id, reveal=reveal), nl=False)


@app.command()
@reports_errors
def edit(
    ctx: typer.Context,
    ref: Ref,
    label: Annotated[
        list[str] | None, typer.Option("--label", metavar="KEY=VALUE", help="Set a label (repeat); KEY= removes it")
    ] = None,
    patch_file: Annotated[
        Path | None,
        typer.Option("--patch-file", exists=True, dir_okay=False, help="The device's own Talos strategic-merge patch"),
    ] = None,
    clear_patch: Annotated[bool, typer.Option("--clear-patch", help="Remove the device's own patch")] = False,
    install_disk: Annotated[
        str | None, typer.Option(metavar="DISK", help="Overrides the cluster's install disk ('' clears)")
    ] = None,
    hostname: Hostname = None,
    ip: Annotated[str | None, typer.Option(metavar="CIDR", help="Static address in CIDR form ('' clears)")] = None,
    role: Annotated[Role | None, typer.Option(help="The device's role", **choices(Role))] = None,
    notes: Notes = None,
) -> None:
    """Change a device's fields, labels, patch or install disk.

    Works for approved devices too: the config re-renders on its next request."""
    services = state(ctx).services()
    device = resolve_device(services, ref)
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
    warn_all(services.devices.warnings(device))


@app.command("approve-code")
@reports_errors
def approve_code(
    ctx: typer.Context,
    code: Annotated[str, typer.Argument(help="The code the machine's console shows, e.g. BCDF-GHJK")],
    hostname: Hostname = None,
    ip: Ip = None,
    role: Annotated[Role | None, typer.Option(help="[default: worker]", **choices(Role))] = None,
    notes: Notes = None,
) -> None:
    """Approve the machine whose Talos console shows CODE.

    The OAuth device flow (KTIZO_OAUTH_ENABLED): the machine boots within seconds."""
    services = state(ctx).services()
    changes = approval_changes(hostname, ip, role, notes)
    device = services.console_codes.approve(Actor.cli(), code, changes)
    typer.echo(f"approved device {device.id} ({device.mac_address}) for console code {code.upper()}")
    warn_without_base(services, device.role)
    warn_all(services.devices.warnings(device))


@app.command()
@reports_errors
def installed(
    ctx: typer.Context,
    ref: Ref,
    reinstall: Annotated[bool, typer.Option("--reinstall", help="Netboot and install it again")] = False,
) -> None:
    """Mark Talos installed: iPXE boots it from its disk.

    With --reinstall it netboots (and installs) again."""
    services = state(ctx).services()
    device = services.devices.set_installed(Actor.cli(), resolve_device(services, ref).id, not reinstall)
    typer.echo(f"device {device.id}: " + ("netboots again" if reinstall else "boots from its disk"))
