"""Top-level ``ktizo`` command and ``ktizo serve``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from ktizo import __version__
from ktizo.cli import assets, cluster, devices, groups, pxe, secrets, users
from ktizo.cli.common import State, reports_errors, state
from ktizo.db.migrate import upgrade
from ktizo.settings import Settings

app = typer.Typer(
    name="ktizo",
    help="Ktizo: every new machine waits at the door until you approve it.\n\n"
    "Start the server with `ktizo serve`; the other commands administer the same data directory "
    "(or KTIZO_DATABASE_URL) from a shell.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
app.add_typer(devices.app, name="devices")
app.add_typer(users.users_app, name="users")
app.add_typer(users.tokens_app, name="tokens")
app.add_typer(users.audit_app, name="audit")
app.add_typer(cluster.app, name="cluster")
app.add_typer(groups.app, name="groups")
app.add_typer(secrets.app, name="secrets")
app.add_typer(pxe.app, name="pxe")
app.add_typer(assets.app, name="assets")
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="KTIZO_DATA_DIR", help="Data directory [default: ./ktizo-data]"),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ktizo {__version__}")
        raise typer.Exit


@app.callback()
def root(
    ctx: typer.Context,
    data_dir: DataDir = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            envvar="KTIZO_DATABASE_URL",
            help="SQLAlchemy URL (default: SQLite in the data dir)",
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    overrides: dict[str, object] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if database_url is not None:
        overrides["database_url"] = database_url
    ctx.obj = State(Settings(**overrides))  # type: ignore[arg-type]


@app.command()
@reports_errors
def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Address to listen on [default: 0.0.0.0]")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on [default: 8000]")] = None,
    data_dir: DataDir = None,
) -> None:
    """Run the Ktizo server (upgrades the database first; creates `admin` on first start)."""
    import uvicorn

    from ktizo.app import create_app

    st = state(ctx)
    updates: dict[str, object] = {}
    if host:
        updates["host"] = host
    if port:
        updates["port"] = port
    if data_dir:
        updates["data_dir"] = data_dir.expanduser().resolve()
    settings = st.settings = st.settings.model_copy(update=updates)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.base_templates_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    services = st.services(need_schema=False)
    typer.echo(f"Database: {services.db.url}  (upgrading schema…)")
    upgrade(services.db)
    password = services.users.ensure_admin()
    url_host = "localhost" if settings.host in ("0.0.0.0", "::") else settings.host  # noqa: S104
    base = f"http://{url_host}:{settings.port}"
    if password:
        typer.secho("\nCreated the first user: admin", bold=True)
        typer.echo(f"  one-time password: {password}")
        typer.echo(f"  It is shown only now. Log in at {base}/docs (POST /api/v1/auth/login), or make a token:")
        typer.echo("  ktizo tokens create admin\n")
    missing = [r for r, v in services.cluster.base_status().items() if not v["present"]]
    if missing:
        typer.echo(
            f"No base config yet for: {', '.join(missing)}. Approved machines get 503 until you run "
            "`ktizo cluster set …` and `ktizo cluster generate`, or `ktizo cluster import-base ROLE FILE`."
        )
    typer.echo(
        f"Talos machines: talos.config={base}/api/v1/config/download?mac=${{mac}}&uuid=${{uuid}}&serial=${{serial}}"
    )
    typer.echo(f"API docs: {base}/docs")
    uvicorn.run(
        create_app(settings, services),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        proxy_headers=False,
        # Long-polled config requests would otherwise hold a shutdown for up to KTIZO_LONG_POLL_SECONDS.
        timeout_graceful_shutdown=5,
    )


@db_app.command("upgrade")
@reports_errors
def db_upgrade(ctx: typer.Context) -> None:
    """Create or upgrade the database schema to this release."""
    services = state(ctx).services(need_schema=False)
    upgrade(services.db)
    typer.echo(f"database at {services.db.url} is up to date")


def main() -> None:
    app()
