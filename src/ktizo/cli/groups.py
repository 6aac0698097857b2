"""``ktizo groups …``: config templates per group of devices."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ktizo.cli.common import print_json, print_table, reports_errors, state
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
Selector = Annotated[list[str] | None, typer.Option("--selector", help="label KEY=VALUE the devices carry (repeat)")]


@app.command("list")
@reports_errors
def list_groups(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Groups in the order their patches apply (the last one wins)."""
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
    name: str,
    priority: Annotated[int, typer.Option()] = 100,
    selector: Selector = None,
    patch_file: PatchFile = None,
    gateway: Annotated[str | None, typer.Option()] = None,
    nameserver: Annotated[list[str] | None, typer.Option()] = None,
    description: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Create a group; its patch is checked against the base configs first."""
    values = _values(name, priority, selector, patch_file, gateway, nameserver, description)
    group = state(ctx).services().groups.create(Actor.cli(), values)
    typer.echo(f"created group {group.name} (id {group.id})")


@app.command()
@reports_errors
def update(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="NAME|ID")],
    name: Annotated[str | None, typer.Option()] = None,
    priority: Annotated[int | None, typer.Option()] = None,
    selector: Selector = None,
    patch_file: PatchFile = None,
    clear_patch: Annotated[bool, typer.Option("--clear-patch")] = False,
    gateway: Annotated[str | None, typer.Option()] = None,
    nameserver: Annotated[list[str] | None, typer.Option()] = None,
    description: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Change a group; only the options given change."""
    values = _values(name, priority, selector, patch_file, gateway, nameserver, description, clear_patch)
    group = state(ctx).services().groups.update(Actor.cli(), ref, values)
    typer.echo(f"updated group {group.name} (revision {group.revision})")


@app.command()
@reports_errors
def delete(ctx: typer.Context, ref: Annotated[str, typer.Argument(metavar="NAME|ID")]) -> None:
    """Delete a group (its members stay, without its patch)."""
    state(ctx).services().groups.delete(Actor.cli(), ref)
    typer.echo(f"deleted group {ref}")


@app.command()
@reports_errors
def members(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="NAME|ID")],
    add: Annotated[list[str] | None, typer.Option("--add", metavar="MAC|ID")] = None,
    remove: Annotated[list[str] | None, typer.Option("--remove", metavar="MAC|ID")] = None,
) -> None:
    """Add or remove explicit members."""
    services = state(ctx).services()
    to_add = [services.devices.resolve(r).id for r in add or []]
    to_remove = [services.devices.resolve(r).id for r in remove or []]
    result = services.groups.set_members(Actor.cli(), ref, to_add, to_remove)
    typer.echo(f"group {ref} has {len(result)} explicit member(s): {', '.join(map(str, result)) or '-'}")
