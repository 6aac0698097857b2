"""``ktizo apply`` and ``ktizo export``: Ktizo's state as YAML documents, kubectl-style."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from ktizo.cli.common import fail, reports_errors, safe, state
from ktizo.services.context import Actor

KINDS = ("Site", "Group", "Rule", "Webhook", "Device")
_SUFFIXES = (".yaml", ".yml", ".json")


def _read(target: str) -> list[tuple[str, str]]:
    """(source name, text) for ``-`` (standard input), a file, or every YAML file in a directory (sorted)."""
    if target == "-":
        return [("-", sys.stdin.read())]
    path = Path(target)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _SUFFIXES)
        if not files:
            fail(f"{target}: no .yaml, .yml or .json files in this directory")
        return [(str(p), p.read_text(encoding="utf-8")) for p in files]
    if not path.is_file():
        fail(f"{target}: no such file or directory")
    return [(str(path), path.read_text(encoding="utf-8"))]


def apply(
    ctx: typer.Context,
    files: Annotated[
        list[str],
        typer.Option("-f", "--filename", metavar="FILE|DIR|-", help="Documents to apply (repeatable; - is stdin)"),
    ],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would change; change nothing")] = False,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune",
            help="Delete objects of the applied kinds that an earlier apply made and the files no longer name",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the summary")] = False,
) -> None:
    """Apply YAML documents (apiVersion ktizo.dev/v1; kinds Device, Group, Rule, Webhook, Site) in one transaction.

    Idempotent: applying the same files again changes nothing. Every object is printed with what happened to it
    (created, configured with its changed fields, unchanged, deleted)."""
    from ktizo.services.declarative import parse

    docs = []
    for source, text in _read_all(files):
        docs.extend(parse(text, source))
    if not docs:
        fail("no documents to apply")
    services = state(ctx).services()
    big = len(docs) > 1000
    started = time.monotonic()

    def progress(message: str) -> None:
        if big:
            typer.echo(f"[{time.monotonic() - started:5.1f} s] {message}", err=True)

    progress(f"applying {len(docs)} documents in one transaction")
    report = services.declarative.apply(Actor.cli(), docs, dry_run=dry_run, prune=prune, progress=progress)
    progress("applied, committing" if not dry_run else "rolled back (dry run)")
    suffix = " (dry run)" if dry_run else ""
    shown = 0
    for change in report.changes:
        if quiet or (change.result == "unchanged" and len(report.changes) > 50):
            continue
        shown += 1
        typer.echo(safe(change.line()) + suffix)
        for line in change.diff:
            typer.echo("    " + safe(line))
    for note in report.notes:
        typer.echo(f"note: {safe(note)}", err=True)
    counts = report.counts()
    summary = ", ".join(f"{n} {result}" for result, n in sorted(counts.items())) or "nothing"
    typer.echo(f"{summary}{suffix}" if not dry_run else f"{summary}{suffix}; nothing was changed")


def _read_all(targets: list[str]) -> list[tuple[str, str]]:
    out = []
    for target in targets:
        out.extend(_read(target))
    return out


def export(
    ctx: typer.Context,
    kind: Annotated[
        list[str] | None,
        typer.Option("--kind", "-k", metavar="KIND", help=f"Only these kinds ({', '.join(KINDS)}; repeatable)"),
    ] = None,
    include_secrets: Annotated[
        bool, typer.Option("--include-secrets", help="Write webhook secrets too (otherwise apply keeps the current)")
    ] = False,
) -> None:
    """Write Ktizo's objects as YAML documents to standard output: `ktizo export > state.yaml` then
    `ktizo apply -f state.yaml` changes nothing."""
    from ktizo.services.declarative import dump

    wanted = None
    if kind:
        by_lower = {k.lower(): k for k in KINDS}
        wanted = []
        for k in kind:
            if k.lower() not in by_lower:
                fail(f"unknown kind {k!r}: one of {', '.join(KINDS)}")
            wanted.append(by_lower[k.lower()])
    docs = state(ctx).services().declarative.export(wanted, include_secrets=include_secrets)
    sys.stdout.write(dump(docs))


apply = reports_errors(apply)
export = reports_errors(export)
