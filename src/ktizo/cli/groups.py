"""``ktizo groups …``: config templates per group of devices."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ktizo.cli.common import print_json, print_table, reports_errors, resolve_device, state
from ktizo.services.context import Actor

app = typer.Typer(help="Device groups: a Talos patch and network defaults per group.", no_args_is_help=True)


def _labels(pairs: list[str] | None, what: str = "--selector") -> dict[str, str] | None:
    if pairs is None:
        return None
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint=what)
        out[key.strip()] = value.strip()
    return out


def _values(
    name: str | None,
    priority: int | None,
    selector: list[str] | None,
    patch_file: Path | None,
    gateway: str | None,
    nameserver: list[str] | None,
    description: str | None,
    clear_patch: bool = False,
) -> dict[str, Any]:
    values: dict[str, Any] = {
        "name": name,
        "priority": priority,
        "selector": _labels(selector),
        "gateway": gateway,
        "nameservers": nameserver,
        "description": description,
    }
    values = {k: v for k, v in values.items() if v is not None}
    if patch_file is not None:
        values["patch"] = patch_file.read_text()
    elif clear_patch:
        values["patch"] = None
    return values


PatchFile = Annotated[
    Path | None, typer.Option("--patch-file", exists=True, dir_okay=False, help="A Talos strategic-merge patch (YAML)")
]
Selector = Annotated[
    list[str] | None,
    typer.Option("--selector", metavar="KEY=VALUE", help="A label the member devices carry (repeat: all must match)"),
]
Gateway = Annotated[str | None, typer.Option(metavar="IP", help="Default gateway for the members' static IPs")]
Nameservers = Annotated[
    list[str] | None, typer.Option("--nameserver", metavar="IP", help="Nameserver for the members (repeatable)")
]
Description = Annotated[str | None, typer.Option(metavar="TEXT", help="What the group is for")]
GroupRef = Annotated[str, typer.Argument(metavar="NAME|ID")]


@app.command("list")
@reports_errors
def list_groups(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False
) -> None:
    """Groups in the order their patches apply (last wins)."""
    groups = state(ctx).services().groups.all()
    if as_json:
        print_json(
            [
                {
                    "id": g.id,
                    "name": g.name,
                    "priority": g.priority,
                    "selector": g.selector,
                    "patch": g.patch,
                    "gateway": g.gateway,
                    "nameservers": g.nameservers,
                    "members": m,
                }
                for g, m in groups
            ]
        )
        return
    print_table(
        ["id", "name", "priority", "selector", "members", "patch", "gateway"],
        [
            (
                g.id,
                g.name,
                g.priority,
                ",".join(f"{k}={v}" for k, v in g.selector.items()),
                len(m),
                "yes" if g.patch else "",
                g.gateway,
            )
            for g, m in groups
        ],
    )


@app.command()
@reports_errors
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The group's name")],
    priority: Annotated[
        int, typer.Option(metavar="N", help="Patches apply lowest first, so the highest priority wins")
    ] = 100,
    selector: Selector = None,
    patch_file: PatchFile = None,
    gateway: Gateway = None,
    nameserver: Nameservers = None,
    description: Description = None,
) -> None:
    """Create a group.

    Its patch is checked against the base configs first."""
    values = _values(name, priority, selector, patch_file, gateway, nameserver, description)
    group = state(ctx).services().groups.create(Actor.cli(), values)
    typer.echo(f"created group {group.name} (id {group.id})")


@app.command()
@reports_errors
def update(
    ctx: typer.Context,
    ref: GroupRef,
    name: Annotated[str | None, typer.Option(metavar="NAME", help="Rename the group")] = None,
    priority: Annotated[
        int | None, typer.Option(metavar="N", help="Patches apply lowest first, so the highest priority wins")
    ] = None,
    selector: Selector = None,
    patch_file: PatchFile = None,
    clear_patch: Annotated[bool, typer.Option("--clear-patch", help="Remove the group's patch")] = False,
    gateway: Gateway = None,
    nameserver: Nameservers = None,
    description: Description = None,
) -> None:
    """Change a group; only the options given change."""
    values = _values(name, priority, selector, patch_file, gateway, nameserver, description, clear_patch)
    group = state(ctx).services().groups.update(Actor.cli(), ref, values)
    typer.echo(f"updated group {group.name} (revision {group.revision})")


@app.command()
@reports_errors
def delete(ctx: typer.Context, ref: GroupRef) -> None:
    """Delete a group (its members stay, without its patch)."""
    state(ctx).services().groups.delete(Actor.cli(), ref)
    typer.echo(f"deleted group {ref}")


@app.command()
@reports_errors
def members(
    ctx: typer.Context,
    ref: GroupRef,
    add: Annotated[
        list[str] | None, typer.Option("--add", metavar="MAC|ID", help="Make a device a member (repeatable)")
    ] = None,
    remove: Annotated[
        list[str] | None, typer.Option("--remove", metavar="MAC|ID", help="Remove a member (repeatable)")
    ] = None,
) -> None:
    """Add or remove explicit members (besides the selector's)."""
    services = state(ctx).services()
    to_add = [resolve_device(services, r).id for r in add or []]
    to_remove = [resolve_device(services, r).id for r in remove or []]
    result = services.groups.set_members(Actor.cli(), ref, to_add, to_remove)
    typer.echo(f"group {ref} has {len(result)} explicit member(s): {', '.join(map(str, result)) or '-'}")
