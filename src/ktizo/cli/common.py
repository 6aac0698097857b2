"""What every command shares: settings from options and environment, services, and error reporting."""

from __future__ import annotations

import enum
import functools
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import typer

from ktizo.domain.errors import KtizoError, NotFound, ValidationFailed

if TYPE_CHECKING:  # at run time these load with the first command that needs the database, not for --help
    from ktizo.services.records import Device
    from ktizo.services.registry import Services
    from ktizo.settings import Settings

P = ParamSpec("P")
R = TypeVar("R")
E = TypeVar("E", bound=enum.Enum)

GLOBAL_OPTIONS_HINT = (
    "--data-dir and --database-url go before the command (`ktizo --data-dir DIR devices list`), "
    "or set KTIZO_DATA_DIR / KTIZO_DATABASE_URL"
)
# Everything a terminal could take as a command (escape sequences, carriage returns, bells) that a machine or an
# operator may have put into a stored text; newlines and tabs stay where a command prints several lines itself.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def safe(value: Any, *, newlines: bool = False) -> str:
    """``value`` as text fit for a terminal: control characters shown escaped (``\\x1b``), never interpreted."""
    text = "" if value is None else str(value)
    text = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    return text if newlines else text.replace("\n", "\\n").replace("\t", "\\t")


class State:
    """Per-invocation state kept on the Typer context."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._services: Services | None = None

    def services(self, *, need_schema: bool = True) -> Services:
        """The services over the configured database. Only ``serve`` and ``db upgrade`` pass ``need_schema=False``:
        every other command must find an existing, migrated database and never create one."""
        if self._services is None:
            from ktizo.app import build_services

            if need_schema:
                _require_database_file(self.settings)
            self._services = build_services(self.settings)
            if need_schema:
                _require_current_schema(self._services)
        return self._services


def make_private_dir(path: Path) -> None:
    """The data directory holds the database (and with it, unless sealed, the cluster's secrets): only its owner
    may enter it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def shown_url(url: str) -> str:
    """A database URL fit for a terminal: without its password."""
    from ktizo.services.schema import display_url

    return display_url(url)


def _require_database_file(settings: Settings) -> None:
    # Opening a missing SQLite file creates it (and its directory): run from the wrong directory, a command
    # would make an empty second database and then report it as merely behind on migrations.
    from ktizo.services.schema import sqlite_file

    path = sqlite_file(settings.effective_database_url)
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
        schema = services.schema.state()
    except KtizoError as exc:
        fail(exc.message)
        return
    if schema.is_current:
        return
    if schema.current is None:
        fail(f"the database at {url} has no Ktizo schema yet: run `ktizo db upgrade` (or start `ktizo serve`)")
        return
    if schema.known:
        fail(
            f"the database at {url} is at revision {schema.current}, this Ktizo needs {schema.head}: "
            "run `ktizo db upgrade`"
        )
        return
    fail(
        f"the database at {url} is at revision {schema.current}, which this Ktizo (at {schema.head}) does not know: "
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
    """One transaction for the whole command (all it changes lands, or none of it), and domain errors as one
    readable line with a non-zero exit code (2 for bad input)."""
    return _reporting(fn, one_transaction=True)


def reports_errors_without_transaction(fn: Callable[P, R]) -> Callable[P, R]:
    """For the commands that run for a long time (``serve``, ``pxe run``): each of their steps commits itself."""
    return _reporting(fn, one_transaction=False)


def _reporting(fn: Callable[P, R], *, one_transaction: bool) -> Callable[P, R]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            if not one_transaction:
                return fn(*args, **kwargs)
            from ktizo.services.transactions import transaction

            with transaction() as tx:
                try:
                    return fn(*args, **kwargs)
                except typer.Exit as exc:
                    if not exc.exit_code:  # a command that ends early on purpose keeps what it did
                        tx.commit()
                    raise
        except ValidationFailed as exc:
            fail(safe(exc), 2)
        except KtizoError as exc:
            fail(safe(exc.message))
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
    # json.dumps escapes every control character, so stored text cannot reach the terminal as one.
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[("" if v is None else safe(v)) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    typer.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
