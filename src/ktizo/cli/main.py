"""Top-level ``ktizo`` command and ``ktizo serve``."""

from __future__ import annotations

import io
import logging
import re
import socket
from pathlib import Path
from typing import IO, Annotated, Any, cast

import typer
from typer.core import TyperGroup

from ktizo import __version__
from ktizo.cli import agents, assets, cluster, devices, groups, pxe, rules, secrets, sites, users, webhooks
from ktizo.cli import apply as apply_cli
from ktizo.cli import backup as backup_cli
from ktizo.cli import gitops as gitops_cli
from ktizo.cli.common import (
    GLOBAL_OPTIONS_HINT,
    State,
    fail,
    make_private_dir,
    reports_errors_without_transaction,
    shown_url,
    state,
    warn,
)

# The base of the errors Typer shows itself (usage errors, bad option values), in whichever click it runs on:
# recent Typers carry their own copy.
_ShownError = cast(type[Exception], typer.BadParameter.__mro__[2])


def _reword(exc: Exception) -> None:
    """Typer's own errors read ``Error: …``, every other one here ``error: …``; and an unknown --data-dir or
    --database-url was a global option given after the command."""
    message = getattr(exc, "message", None)
    if isinstance(message, str) and re.match(r"No such option: --(data-dir|database-url)\b", message):
        exc.message = f"{message}. {GLOBAL_OPTIONS_HINT}"  # type: ignore[attr-defined]
    original = exc.show  # type: ignore[attr-defined]

    def show(file: IO[Any] | None = None) -> None:
        buffer = io.StringIO()
        original(file=buffer)
        text = re.sub(r"^Error: ", "error: ", buffer.getvalue(), flags=re.MULTILINE)
        typer.echo(text, file=file, err=file is None, nl=False)

    exc.show = show  # type: ignore[attr-defined]


class _Root(TyperGroup):
    # Subcommands are parsed inside the root's invoke: these two see every usage error.
    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except _ShownError as exc:
            _reword(exc)
            raise

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _ShownError as exc:
            _reword(exc)
            raise


app = typer.Typer(
    name="ktizo",
    cls=_Root,
    help="Ktizo: every new machine waits at the door until you approve it.\n\n"
    "Start the server with `ktizo serve`; the other commands work from a shell on the server's database, "
    "through the same services, audited as the actor `cli`.\n\n"
    "The global options --data-dir and --database-url go before the command: "
    "`ktizo --data-dir /srv/ktizo devices list`. Without them the CLI uses KTIZO_DATA_DIR and "
    "KTIZO_DATABASE_URL, else ./ktizo-data in the current directory.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
app.add_typer(devices.app, name="devices")
app.add_typer(agents.app, name="agents")
app.add_typer(agents.pki_app, name="pki")
app.add_typer(sites.app, name="sites")
app.add_typer(users.users_app, name="users")
app.add_typer(users.tokens_app, name="tokens")
app.add_typer(users.audit_app, name="audit")
app.add_typer(cluster.app, name="cluster")
app.add_typer(groups.app, name="groups")
app.add_typer(secrets.app, name="secrets")
app.add_typer(pxe.app, name="pxe")
app.add_typer(assets.app, name="assets")
app.add_typer(webhooks.app, name="webhooks")
app.add_typer(gitops_cli.app, name="gitops")
app.add_typer(rules.app, name="rules")
app.command("apply")(apply_cli.apply)
app.command("export")(apply_cli.export)
app.command("backup")(backup_cli.backup)
app.command("restore")(backup_cli.restore)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="KTIZO_DATA_DIR",
        metavar="DIR",
        help="The server's data directory (SQLite database, base configs) [default: ./ktizo-data]",
    ),
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
            metavar="URL",
            help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db [default: SQLite in the data dir]",
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
    from ktizo.settings import Settings  # pydantic-settings: not for --help and --version

    ctx.obj = State(Settings(**overrides))  # type: ignore[arg-type]


@app.command()
@reports_errors_without_transaction
def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Address to listen on [default: 0.0.0.0]")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on [default: 8000]")] = None,
    data_dir: DataDir = None,
    mtls_port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Port of the mTLS listener for agents, on --host [default: 8443; 0: off]"),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=64,
            help="Worker processes on this host, sharing the ports (env KTIZO_WORKERS) [default: 1]",
        ),
    ] = None,
) -> None:
    """Run the Ktizo server.

    It upgrades the database first, and on first start creates the user `admin`."""
    from ktizo.app.server import ListenerError, bind_mtls, connection_limit, mtls_listener_files, raise_file_limit
    from ktizo.app.server import serve as run_server
    from ktizo.app.wiring import build_services
    from ktizo.app.workers import BindError, Supervisor, worker_sockets

    st = state(ctx)
    updates: dict[str, object] = {}
    if host:
        updates["host"] = host
    if port:
        updates["port"] = port
    if data_dir:
        updates["data_dir"] = data_dir.expanduser().resolve()
    if mtls_port is not None:
        updates["mtls_port"] = mtls_port
    if workers is not None:
        updates["workers"] = workers
    settings = st.settings = st.settings.model_copy(update=updates)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # a line per plugin at every start
    make_private_dir(settings.data_dir)
    settings.base_templates_dir.mkdir(parents=True, exist_ok=True)

    mtls_socket = None
    pool: tuple[list[socket.socket], list[socket.socket] | None] | None = None
    try:
        if settings.workers > 1:
            pool = worker_sockets(settings)
        else:
            mtls_socket = bind_mtls(settings)
    except (ListenerError, BindError) as exc:
        fail(str(exc), 2)
    max_connections = connection_limit(settings, raise_file_limit())
    services = build_services(settings, max_connections=max_connections)
    typer.echo(f"Database: {shown_url(services.db.url)}  (upgrading schema…)")
    services.schema.upgrade()
    for problem in services.db.exposure():
        warn(problem)
    password = services.users.ensure_admin()
    url_host = "localhost" if settings.host in ("0.0.0.0", "::") else settings.host  # noqa: S104
    local = f"http://{url_host}:{settings.port}"
    if password:
        typer.secho("\nCreated the first user: admin", bold=True)
        typer.echo(f"  initial password (shown once): {password}")
        typer.echo(f"  Sign in at {local}/ui, or make an API token: ktizo tokens create admin")
        typer.echo("  To replace it: reset it on the Users page, or run `ktizo users reset-password admin`.\n")
    missing = [r for r, v in services.cluster.base_status().items() if not v["present"]]
    if missing:
        typer.echo(
            f"No base config yet for: {', '.join(missing)}. Approved machines get 503 until you run "
            "`ktizo cluster set …` and `ktizo cluster generate`, or `ktizo cluster import-base ROLE FILE`."
        )
    download = "/api/v1/config/download?mac=${mac}&uuid=${uuid}&serial=${serial}"
    if settings.public_url:
        typer.echo(f"Talos machines: talos.config={settings.public_url.rstrip('/')}{download}")
    elif url_host == "localhost":
        # localhost is right for a browser on this machine, never for the machines that boot from it.
        typer.echo(
            f"Talos machines: talos.config=http://ADDRESS:{settings.port}{download}, with an ADDRESS the machines "
            f"can reach. Set KTIZO_PUBLIC_URL (e.g. http://10.0.0.1:{settings.port}) so that iPXE scripts carry it."
        )
    else:
        typer.echo(f"Talos machines: talos.config={local}{download}")
    typer.echo(f"Web UI: {local}/ui")
    typer.echo(f"API docs: {local}/docs")
    if mtls_socket is not None or (pool is not None and pool[1]):
        typer.echo(
            f"Agents: mTLS on {settings.host}:{settings.mtls_port}; CA fingerprint {services.authority.fingerprint()}"
        )
    if pool is None:
        typer.echo(f"Serving at most {max_connections} connections at once; more get 503.")
        run_server(settings, services, max_connections, mtls_socket)
        return
    typer.echo(
        f"Serving with {settings.workers} workers, each at most {max_connections} connections at once; more get 503."
    )
    tls_files = mtls_listener_files(settings, services) if pool[1] else None
    services.db.dispose()  # the workers open their own connections; the supervisor holds none
    raise typer.Exit(Supervisor(settings, max_connections, *pool, tls_files=tls_files).run())


@db_app.command("upgrade")
@reports_errors_without_transaction
def db_upgrade(ctx: typer.Context) -> None:
    """Create or upgrade the database schema to this release."""
    st = state(ctx)
    if st.settings.database_url is None:
        make_private_dir(st.settings.data_dir)
    services = st.services(need_schema=False)
    url = shown_url(services.db.url)
    before, after = services.schema.upgrade()
    if before is None:
        typer.echo(f"created the database at {url} (schema {after})")
    elif before == after:
        typer.echo(f"database at {url} is up to date (schema {after})")
    else:
        typer.echo(f"upgraded the database at {url} from schema {before} to {after}")
    for problem in services.db.exposure():
        warn(problem)


def main() -> None:
    app()
