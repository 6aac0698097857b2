"""``ktizo secrets …``: the key that seals cluster secrets at rest, and rotating it."""

from __future__ import annotations

from typing import Annotated

import typer

from ktizo.cli.common import reports_errors, state
from ktizo.services.context import Actor

app = typer.Typer(help="The key that seals secrets at rest (KTIZO_SECRET_KEY).", no_args_is_help=True)


@app.command("generate-key")
def generate_key_command() -> None:
    """Print a new sealing key.

    Give it to Ktizo as KTIZO_SECRET_KEY, or in the file KTIZO_SECRET_KEY_FILE names."""
    from ktizo.pki.sealing import generate_key

    typer.echo(generate_key())


@app.command()
@reports_errors
def rekey(
    ctx: typer.Context,
    unseal: Annotated[bool, typer.Option("--unseal", help="Store the secrets in plaintext again")] = False,
) -> None:
    """Re-seal every stored secret with the first configured key.

    To seal for the first time: set KTIZO_SECRET_KEY and run this (plaintext copies in templates/base/ are
    removed). To rotate: set KTIZO_SECRET_KEY="NEW,OLD" (new first), run this, then drop OLD. To go back to
    plaintext: run it with --unseal while KTIZO_SECRET_KEY still holds the key."""
    cluster = state(ctx).services().cluster
    count = cluster.reseal(Actor.cli(), unseal=unseal)
    typer.echo(f"{'unsealed' if unseal else 're-sealed'} {count} value(s)")
