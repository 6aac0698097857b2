"""What every command shares: settings from options and environment, services, and error reporting."""

from __future__ import annotations

import enum
import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import typer
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from ktizo.app import build_services
from ktizo.db.migrate import alembic_config, current_revision, head_revision
from ktizo.db.models import Device
from ktizo.domain.errors import KtizoError, NotFound, ValidationFailed
from ktizo.services.registry import Services
from ktizo.settings import Settings

P = ParamSpec("P")
R = TypeVar("R")
E = TypeVar("E", bound=enum.Enum)

GLOBAL_OPTIONS_HINT = (
    "--data-dir and --database-url go before the command (`ktizo --data-dir DIR devices list`), "
    "or set KTIZO_DATA_DIR / KTIZO_DATABASE_URL"
)


class State:
    """Per-invocation state kept on the Typer context."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._services: Services | None = None

    def services(self, *, need_schema: bool = True) -> Services:
        """The services over the configured database. Only ``serve`` and ``db upgrade`` pass ``need_schema=False``:
        every other command must find an existing, migrated database and never create one."""
        if self._services is None:
            if need_schema:
                _require_database_file(self.settings)
            self._services = build_services(self.settings)
            if need_schema:
                _require_current_schema(self._services)
        return self._services


def shown_url(url: str) -> str:
    """A database URL fit for a terminal: without its password."""
    return make_url(url).render_as_string(hide_password=True)


def _sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    if parsed.database.startswith("file:"):  # a URI filename: leave it to SQLite
        return None
    return Path(parsed.database)


def _require_database_file(settings: Settings) -> None:
    # Opening a missing SQLite file creates it (and its directory): run from the wrong directory, a command
    # would make an empty second database and then report it as merely behind on migrations.
    path = _sqlite_path(settings.effective_database_url)
    if path is None or path.is_file():
        return
    where = f"data directory {settings.data_dir}" if not settings.database_url else "KTIZO_DATABASE_URL"
    fail(
        f"there is no Ktizo database at {path} ({where}).\n"
        "  To use the server's: pass its data directory, `ktizo --data-dir DIR …` or KTIZO_DATA_DIR=DIR "
        "(or KTIZO_DATABASE_URL for PostgreSQL).\n"
        "  To start a new installation here: `ktizo db upgrade` (or `ktizo serve`) creates it."
    )


def _require_current_schema(services: Services) -> None:
    url = shown_url(services.db.url)
    try:
        current = current_revision(services.db)
    except SQLAlchemyError as exc:
        fail(f"cannot read the database at {url}: {getattr(exc, 'orig', None) or exc}")
        return
    head = head_revision()
    if current == head:
        return
    if current is None:
        fail(f"the database at {url} has no Ktizo schema yet: run `ktizo db upgrade` (or start `ktizo serve`)")
        return
    known = {script.revision for script in ScriptDirectory.from_config(alembic_config(services.db)).walk_revisions()}
    if current in known:
        fail(f"the database at {url} is at revision {current}, this Ktizo needs {head}: run `ktizo db upgrade`")
        return
    fail(
        f"the database at {url} is at revision {current}, which this Ktizo (at {head}) does not know: "
        "a newer Ktizo upgraded it; use that version"
    )


def state(ctx: typer.Context) -> State:
    obj = ctx.find_root().obj
    assert isinstance(obj, State)
    return obj


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    """A line on stderr: the command did what it was asked, but something still stands in the way."""
    typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)


def reports_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn domain errors into one readable line and a non-zero exit code (2 for bad input)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except ValidationFailed as exc:
            fail(str(exc), 2)
        except KtizoError as exc:
            fail(exc.message)
        raise AssertionError("unreachable")

    return wrapper


def resolve_device(services: Services, ref: str) -> Device:
    """``services.devices.resolve``, with a pointer to the device list when a MAC is unknown."""
    try:
        return services.devices.resolve(ref)
    except NotFound as exc:
        if exc.message.startswith("no device with MAC"):
            raise NotFound(f"{exc.message} (`ktizo devices list` shows the devices Ktizo knows)") from None
        raise


def choices(enum_type: type[E], metavar: str | None = None) -> dict[str, Any]:
    """``typer.Option``/``typer.Argument`` settings for an enum: the choices in the help (or ``metavar``), and a bad
    value refused with them (``'master' is not one of 'controlplane', 'worker'``) rather than in pydantic's words."""
    values = [str(member.value) for member in enum_type]

    def parse(value: Any) -> E:
        if isinstance(value, enum_type):
            return value
        for member in enum_type:
            if str(member.value) == str(value).strip().lower():
                return member
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(map(repr, values))}")

    return {"parser": parse, "metavar": metavar or "[" + "|".join(values) + "]"}


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    typer.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
