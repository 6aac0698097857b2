"""``ktizo backup DIR`` and ``ktizo restore DIR``: the database and the data directory, with a checked manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ktizo.cli.common import reports_errors_without_transaction, shown_url, state

Directory = Annotated[Path, typer.Argument(metavar="DIR", help="The backup directory.")]
Force = Annotated[bool, typer.Option("--force", help="Write over what is there.")]
KEY_REMINDER = (
    "The cluster secrets and base configs are sealed with KTIZO_SECRET_KEY: keep the key (or the key file) apart "
    "from this backup, and run the restored server with the same key (or a key list that still holds it)."
)


@reports_errors_without_transaction
def backup(
    ctx: typer.Context,
    directory: Directory,
    force: Force = False,
    with_assets: Annotated[
        bool, typer.Option("--with-assets", help="Copy the boot assets too (large; else fetched again).")
    ] = False,
) -> None:
    """Back up the database and the data directory into DIR (created 0700; it must be empty).

    On SQLite the copy is made online with SQLite's backup API: `ktizo serve` may keep running and writing.
    On PostgreSQL it prints the pg_dump command to run and copies the data directory's files."""
    from ktizo.services import backup as service

    st = state(ctx)
    result = service.backup(st.settings, directory, force=force, with_assets=with_assets)
    database = shown_url(st.settings.effective_database_url)
    if result.dialect == "sqlite":
        typer.echo(f"backed up the database at {database} (schema {result.schema_revision}) into {result.directory}")
    else:
        typer.echo(f"copied the data directory's files into {result.directory}; the database is not dumped here.")
        typer.echo(f"Dump the database at {database} (schema {result.schema_revision}) with:")
        for command in result.commands:
            typer.echo(f"  {command}")
    typer.echo(f"{len(result.files)} file(s), each with its SHA-256 in {result.directory / service.MANIFEST}")
    for item in result.skipped:
        typer.echo(f"  not copied: {item}")
    typer.echo(KEY_REMINDER)


@reports_errors_without_transaction
def restore(ctx: typer.Context, directory: Directory, force: Force = False) -> None:
    """Restore a backup made by `ktizo backup` into the data directory (it must hold no database), then upgrade
    the schema to this release's. Stop `ktizo serve` first."""
    from ktizo.services import backup as service

    st = state(ctx)
    result = service.restore(st.settings, directory, force=force)
    typer.echo(f"checked every file of {directory} against {service.MANIFEST}")
    typer.echo(f"restored {len(result.files)} file(s) into {result.data_dir}")
    if result.dialect == "sqlite":
        database = shown_url(st.settings.effective_database_url)
        if result.revision_before == result.revision_after:
            typer.echo(f"database at {database} is at schema {result.revision_after}")
        else:
            typer.echo(
                f"upgraded the restored database at {database} from schema {result.revision_before} "
                f"to {result.revision_after}"
            )
    else:
        typer.echo("Now restore the database (into an empty one) and upgrade it:")
        for command in result.commands:
            typer.echo(f"  {command}")
    typer.echo(KEY_REMINDER)
