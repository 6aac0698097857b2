"""``ktizo rules …``: auto-approval rules (written as documents with `ktizo apply`), their dry runs."""

from __future__ import annotations

from typing import Annotated

import typer

from ktizo.cli.common import print_json, print_table, reports_errors, safe, state
from ktizo.services.context import Actor

app = typer.Typer(
    help="Auto-approval rules: policy that approves or rejects machines at the door (write them with `ktizo apply`).",
    no_args_is_help=True,
)

Name = Annotated[str, typer.Argument(metavar="NAME", help="The rule's name")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of text")]


@app.command("list")
@reports_errors
def list_rules(ctx: typer.Context, as_json: Json = False) -> None:
    """Every rule in the order they are tried."""
    from ktizo.services.rules import spec_of

    rules = state(ctx).services().rules.list()
    if as_json:
        print_json([{"name": r.name, "revision": r.revision, "matched": r.matched, **spec_of(r)} for r in rules])
        return
    print_table(
        ("PRIORITY", "NAME", "ENABLED", "ACTION", "MATCHED", "REVISION", "MATCH"),
        [
            (
                r.priority,
                r.name,
                "yes" if r.enabled else "no",
                r.action,
                f"{r.matched}/{r.max_count}" if r.max_count is not None else r.matched,
                r.revision,
                ", ".join(f"{k}={v}" for k, v in (r.match or {}).items()) or "(any machine)",
            )
            for r in rules
        ],
    )


@app.command("show")
@reports_errors
def show_rule(ctx: typer.Context, name: Name) -> None:
    """A rule as its document."""
    from ktizo.services.declarative import document, dump
    from ktizo.services.rules import spec_of

    rule = state(ctx).services().rules.get(name)
    typer.echo(dump([document("Rule", rule.name, spec_of(rule))]).rstrip())
    typer.echo(f"# revision {rule.revision}, decided {rule.matched} machine(s), last written by {safe(rule.author)}")


@app.command("dry-run")
@reports_errors
def dry_run(ctx: typer.Context, name: Name, as_json: Json = False) -> None:
    """Which pending machines the rule would take now, and what each would get. Changes nothing."""
    services = state(ctx).services()
    rule, outcomes, passed = services.rules.dry_run(name)
    if as_json:
        print_json(
            {
                "rule": rule.name,
                "revision": rule.revision,
                "enabled": rule.enabled,
                "passed_over": passed,
                "machines": [o.__dict__ for o in outcomes],
            }
        )
        return
    state_word = "" if rule.enabled else " (disabled: it decides nothing until enabled)"
    typer.echo(
        f"rule {rule.name} (revision {rule.revision}){state_word} would {rule.action} {len(outcomes)} machine(s)"
    )
    rows = []
    for o in outcomes:
        device = services.devices.get(o.device_id)
        who = device.mac_address or device.machine_id or device.uuid or str(device.id)
        rows.append((o.device_id, who, o.hostname or "", o.ip_address or "", o.role or "", o.error or o.action))
    if rows:
        print_table(("ID", "MACHINE", "HOSTNAME", "IP", "ROLE", "OUTCOME"), rows)
    typer.echo(f"{passed} pending machine(s) do not match")


@app.command("delete")
@reports_errors
def delete_rule(ctx: typer.Context, name: Name) -> None:
    """Delete a rule (what it decided stays decided)."""
    state(ctx).services().rules.delete(Actor.cli(), name)
    typer.echo(f"deleted rule {name}")
