"""``ktizo agents …`` and ``ktizo pki …``: Linux hosts running ktizo-agent, and Ktizo's agent CA."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ktizo.cli.common import choices, print_json, print_table, reports_errors, safe, state
from ktizo.domain.devices import DeviceStatus
from ktizo.services.context import Actor

if TYPE_CHECKING:
    from ktizo.services.records import Device
    from ktizo.services.registry import Services

app = typer.Typer(
    help="Linux hosts running ktizo-agent: list, inspect, approve, reject, revoke, purge, probe.",
    no_args_is_help=True,
)
pki_app = typer.Typer(help="Ktizo's agent CA: create it, print its fingerprint for pinning.", no_args_is_help=True)

Ref = Annotated[str, typer.Argument(metavar="ID|MACHINE_ID", help="The agent's id or its /etc/machine-id")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")]
Notes = Annotated[str | None, typer.Option(metavar="TEXT", help="Free text kept with the agent (audited)")]


def as_dict(services: Services, device: Device) -> dict[str, Any]:
    enrollment = services.agents.enrollment(device.id)
    return {
        "id": device.id,
        "machine_id": device.machine_id,
        "status": device.status,
        "hostname": device.hostname,
        "fqdn": device.fqdn,
        "addresses": list(device.addresses or []),
        "agent_address": device.agent_address,
        "enrollment": enrollment.status if enrollment is not None else None,
        "reported": {k: (device.facts or {}).get(k) for k in ("hostname", "fqdn", "ip_addresses", "os")},
        "first_seen": device.first_seen,
        "last_seen": device.last_seen,
        "last_ip": device.last_ip,
        "approved_at": device.approved_at,
        "approved_by": device.approved_by,
        "rejected_at": device.rejected_at,
        "rejected_by": device.rejected_by,
        "notes": device.notes,
        "certificates": [
            {
                "serial": c.serial,
                "not_after": c.not_after,
                "reason": c.reason,
                "revoked_at": c.revoked_at,
            }
            for c in services.agents.certificates(device.id)
        ],
        "facts": (device.facts or {}).get("host"),
    }


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


@app.command("list")
@reports_errors
def list_agents(
    ctx: typer.Context,
    status: Annotated[
        DeviceStatus | None, typer.Option(help="Only agents in this state", **choices(DeviceStatus))
    ] = None,
    as_json: Json = False,
) -> None:
    """List enrolled and enrolling hosts, oldest first."""
    services = state(ctx).services()
    rows = services.agents.list(status)
    if as_json:
        print_json([as_dict(services, d) for d in rows])
        return
    if not rows:
        typer.echo("No agents" + (f" with status {status.value}" if status else "") + ". On a host: " + INSTALL_HINT)
        return
    print_table(
        ["id", "machine-id", "status", "hostname", "reported", "addresses", "last seen"],
        [
            (
                d.id,
                d.machine_id,
                d.status,
                d.hostname or "",
                (d.facts or {}).get("hostname", ""),
                ", ".join(d.addresses or (d.facts or {}).get("ip_addresses") or []),
                _when(d.last_seen),
            )
            for d in rows
        ],
    )


@app.command("show")
@reports_errors
def show_agent(ctx: typer.Context, ref: Ref, as_json: Json = False) -> None:
    """Everything Ktizo knows of one agent: what it reported, its certificates, its latest facts."""
    services = state(ctx).services()
    data = as_dict(services, services.agents.resolve(ref))
    if as_json:
        print_json(data)
        return
    for key, value in data.items():
        if key in ("certificates", "facts", "reported"):
            continue
        typer.echo(f"{key:14} {safe(value if value is not None else '')}")
    typer.echo(f"{'reported':14} {safe(json.dumps(data['reported'], default=str))}")
    for cert in data["certificates"]:
        state_text = (
            f"revoked {_when(cert['revoked_at'])}" if cert["revoked_at"] else f"until {_when(cert['not_after'])}"
        )
        typer.echo(f"{'certificate':14} {cert['serial']} ({cert['reason']}, {state_text})")
    if data["facts"]:
        typer.echo(f"{'facts':14} {safe(json.dumps(data['facts'], default=str)[:2000])}")


@app.command("approve")
@reports_errors
def approve_agent(
    ctx: typer.Context,
    ref: Ref,
    hostname: Annotated[
        str | None, typer.Option(metavar="NAME", help="Hostname for its certificate [default: what it reported]")
    ] = None,
    notes: Notes = None,
) -> None:
    """Approve: Ktizo issues its certificate from this record; the host picks it up at its next poll."""
    services = state(ctx).services()
    device = services.agents.approve(Actor.cli(), ref, hostname=hostname, notes=notes)
    certs = services.agents.certificates(device.id)
    serial = certs[0].serial if certs else "?"
    typer.echo(f"approved agent {device.id} as {safe(device.hostname)}; certificate {serial} waits for its pickup")


@app.command("reject")
@reports_errors
def reject_agent(ctx: typer.Context, ref: Ref, notes: Notes = None) -> None:
    """Reject a pending agent: its next poll gets 403 and it stops."""
    device = state(ctx).services().agents.reject(Actor.cli(), ref, notes)
    typer.echo(f"rejected agent {device.id}")


@app.command("revoke")
@reports_errors
def revoke_agent(ctx: typer.Context, ref: Ref, notes: Notes = None) -> None:
    """Revoke an approved agent: its certificates are refused at once and listed in the CRL."""
    services = state(ctx).services()
    device = services.agents.revoke(Actor.cli(), ref, notes)
    revoked = [c.serial for c in services.agents.certificates(device.id) if c.revoked_at]
    typer.echo(f"revoked agent {device.id}: {len(revoked)} certificate(s) revoked")


@app.command("purge")
@reports_errors
def purge_agent(ctx: typer.Context, ref: Ref) -> None:
    """Forget an agent: its record, enrollment and token go, its certificates are revoked; it may enroll anew."""
    device = state(ctx).services().agents.purge(Actor.cli(), ref)
    typer.echo(f"purged agent {device.id} ({device.machine_id})")


@app.command("probe")
@reports_errors
def probe_agent(
    ctx: typer.Context,
    ref: Ref,
    address: Annotated[
        str | None, typer.Option(metavar="HOST:PORT", help="Where its listener is [default: from its check-in]")
    ] = None,
    as_json: Json = False,
) -> None:
    """Connect to the agent's own mTLS listener as Ktizo's manager and store the facts it serves."""
    facts = state(ctx).services().agents.probe(Actor.cli(), ref, address)
    if as_json:
        print_json(facts)
        return
    cpu = facts.get("cpu") or {}
    memory = facts.get("memory") or {}
    typer.echo(f"hostname   {safe(facts.get('hostname'))}")
    typer.echo(f"cpu        {safe(cpu.get('model'))} x{safe(cpu.get('logical_cpus'))}")
    typer.echo(f"memory     {safe(memory.get('total_bytes'))} bytes")
    typer.echo(
        f"disks      {len(facts.get('disks') or [])}, nics {len(facts.get('nics') or [])} (stored; --json for all)"
    )


INSTALL_HINT = "pip install ./agent && ktizo-agent --enroll URL --ca-fingerprint $(ktizo pki fingerprint)"


@pki_app.command("init")
@reports_errors
def pki_init(ctx: typer.Context) -> None:
    """Create the agent CA now (it is otherwise made on first use)."""
    ca, created = state(ctx).services().authority.init(Actor.cli())
    typer.echo(("created the agent CA: " if created else "the agent CA exists: ") + ca.fingerprint)


@pki_app.command("fingerprint")
@reports_errors
def pki_fingerprint(ctx: typer.Context) -> None:
    """Print sha256:<hex> of the agent CA certificate, for `ktizo-agent enroll --ca-fingerprint`."""
    typer.echo(state(ctx).services().authority.fingerprint())


@pki_app.command("ca")
@reports_errors
def pki_ca(ctx: typer.Context) -> None:
    """Print the agent CA certificate (PEM)."""
    typer.echo(state(ctx).services().authority.ca_pem(), nl=False)
