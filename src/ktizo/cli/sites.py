"""``ktizo sites …``: zero-touch sites, their enrollment keys, and the collision gate."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

import typer

from ktizo.cli.common import print_json, print_table, reports_errors, safe, state
from ktizo.services.context import Actor

app = typer.Typer(
    help="Zero-touch sites: their agents enroll with the site's key (cek_), approved at once or by an operator.",
    no_args_is_help=True,
)

Code = Annotated[str, typer.Argument(metavar="CODE", help="The site's code (or its numeric id)")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of text")]
Policy = Annotated[
    str | None,
    typer.Option("--policy", metavar="auto-approve|manual", help="New agents approved at once, or by an operator"),
]


def _key_line(info: Any) -> str:
    limits = []
    if info.expires_at:
        limits.append(f"expires {info.expires_at:%Y-%m-%d %H:%M}")
    if info.max_uses is not None:
        limits.append(f"{info.uses}/{info.max_uses} uses")
    else:
        limits.append(f"{info.uses} uses")
    return f"{info.fingerprint}, made {info.created_at:%Y-%m-%d %H:%M} by {safe(info.created_by)}, " + ", ".join(limits)


@app.command("create")
@reports_errors
def create_site(
    ctx: typer.Context,
    code: Code,
    name: Annotated[str, typer.Option("--name", metavar="NAME", help="A name people recognise")] = "",
    policy: Policy = None,
    max_pending: Annotated[int | None, typer.Option(min=0, help="At most this many enrollments waiting")] = None,
    max_agents: Annotated[int | None, typer.Option(min=0, help="At most this many agents")] = None,
) -> None:
    """Create a site. Then make its key: `ktizo sites rotate-key CODE`."""
    site = (
        state(ctx)
        .services()
        .sites.create(
            Actor.cli(),
            code,
            name=name,
            policy=policy or "auto-approve",
            max_pending=max_pending,
            max_agents=max_agents,
        )
    )
    typer.echo(
        f"created site {site.site_code} ({site.enrollment_policy}); "
        f"make its key: ktizo sites rotate-key {site.site_code}"
    )


@app.command("list")
@reports_errors
def list_sites(ctx: typer.Context, as_json: Json = False) -> None:
    """Every site, with its active key's fingerprint."""
    services = state(ctx).services()
    rows = []
    for site in services.sites.list():
        key = services.sites.active_key(site.id)
        rows.append((site, key))
    if as_json:
        print_json(
            [
                {
                    "id": s.id,
                    "site_code": s.site_code,
                    "name": s.name,
                    "enrollment_policy": s.enrollment_policy,
                    "max_pending": s.max_pending,
                    "max_agents": s.max_agents,
                    "key": k.fingerprint if k else None,
                }
                for s, k in rows
            ]
        )
        return
    if not rows:
        typer.echo("No sites. Make one: ktizo sites create CODE --name NAME")
        return
    print_table(
        ["id", "code", "name", "policy", "key", "limits"],
        [
            (
                s.id,
                s.site_code,
                s.name,
                s.enrollment_policy,
                k.fingerprint if k else "(none: rotate-key)",
                f"pending ≤ {s.max_pending if s.max_pending is not None else '∞'}, agents ≤ "
                f"{s.max_agents if s.max_agents is not None else '∞'}",
            )
            for s, k in rows
        ],
    )


@app.command("show")
@reports_errors
def show_site(ctx: typer.Context, code: Code, as_json: Json = False) -> None:
    """A site: its policy, limits, keys, and how many agents enrolled with each key version."""
    services = state(ctx).services()
    site = services.sites.get(code)
    keys = services.sites.keys(site.id)
    by_version = services.sites.enrollments_by_version(site.id)
    if as_json:
        print_json(
            {
                "id": site.id,
                "site_code": site.site_code,
                "name": site.name,
                "enrollment_policy": site.enrollment_policy,
                "max_pending": site.max_pending,
                "max_agents": site.max_agents,
                "keys": [k.__dict__ for k in keys],
                "agents_by_key_version": [{"version": v, "agents": n, "latest": last} for v, n, last in by_version],
            }
        )
        return
    typer.echo(f"site      {site.site_code} ({safe(site.name)})")
    typer.echo(f"policy    {site.enrollment_policy}")
    typer.echo(f"limits    max pending {site.max_pending}, max agents {site.max_agents}")
    current = services.sites.active_key(site.id)
    for key in keys:
        active = " (active)" if current is not None and key.version == current.version else ""
        typer.echo(f"key       {_key_line(key)}{active}")
    for version, n, last in by_version:
        typer.echo(
            f"enrolled  v{version}: {n} agent(s), the latest {last:%Y-%m-%d %H:%M}" if last else f"v{version}: {n}"
        )


@app.command("delete")
@reports_errors
def delete_site(ctx: typer.Context, code: Code) -> None:
    """Delete a site and its keys (its agents stay enrolled, without a site)."""
    site = state(ctx).services().sites.delete(Actor.cli(), code)
    typer.echo(f"deleted site {site.site_code}")


@app.command("rotate-key")
@reports_errors
def rotate_key(
    ctx: typer.Context,
    code: Code,
    expires_in_days: Annotated[
        float | None, typer.Option(min=0.01, help="The key stops working after this many days")
    ] = None,
    max_uses: Annotated[
        int | None, typer.Option(min=1, help="The key stops working after this many enrollments")
    ] = None,
) -> None:
    """Make the site's next key (the old one is refused from now on) and print it, once."""
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=expires_in_days) if expires_in_days else None
    key, info = state(ctx).services().sites.rotate_key(Actor.cli(), code, expires_at=expires, max_uses=max_uses)
    typer.echo(key)
    typer.secho(f"{info.site_code} key {info.fingerprint}: shown once, keep it in your installer's secrets", err=True)


@app.command("key")
@reports_errors
def show_key(ctx: typer.Context, code: Code) -> None:
    """The active key's version and fingerprint (never the key)."""
    info = state(ctx).services().sites.active_key(code)
    if info is None:
        typer.echo("no key yet: ktizo sites rotate-key CODE")
        raise typer.Exit(1)
    typer.echo(_key_line(info))


@app.command("collisions")
@reports_errors
def collisions(ctx: typer.Context, as_json: Json = False) -> None:
    """Claims held at the collision gate: a machine_uid another agent holds, without proof of its credentials."""
    rows = state(ctx).services().zero_touch.collisions()
    if as_json:
        print_json(
            [
                {"id": c.enrollment_id, "agent": c.device.id, "claim": c.claim, "site": c.site_code, "at": c.created_at}
                for c in rows
            ]
        )
        return
    if not rows:
        typer.echo("No collisions wait.")
        return
    print_table(
        ["id", "collides with", "its hostname", "claimed hostname", "from", "site", "at"],
        [
            (
                c.enrollment_id,
                c.device.id,
                c.device.hostname or "",
                c.claim.get("hostname", ""),
                c.claim.get("source_ip", ""),
                c.site_code or "",
                f"{c.created_at:%Y-%m-%d %H:%M}",
            )
            for c in rows
        ],
    )


@app.command("resolve")
@reports_errors
def resolve(
    ctx: typer.Context,
    collision_id: Annotated[int, typer.Argument(metavar="ID", help="From `ktizo sites collisions`")],
    action: Annotated[str, typer.Argument(metavar="new|replace|reject")],
    hostname: Annotated[str | None, typer.Option(metavar="NAME", help="Hostname for new/replace")] = None,
) -> None:
    """Decide a collision: approve the claimant as a new machine, let it replace the existing one, or reject it."""
    device = state(ctx).services().zero_touch.resolve(Actor.cli(), collision_id, action, hostname)
    typer.echo(f"collision {collision_id}: {action} (agent {device.id})")
