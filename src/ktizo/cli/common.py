"""What every command shares: settings from options and environment, services, and error reporting."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import typer

from ktizo.app import build_services
from ktizo.db.migrate import is_current
from ktizo.domain.errors import KtizoError, ValidationFailed
from ktizo.services.registry import Services
from ktizo.settings import Settings

P = ParamSpec("P")
R = TypeVar("R")


class State:
    """Per-invocation state kept on the Typer context."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._services: Services | None = None

    def services(self, *, need_schema: bool = True) -> Services:
        if self._services is None:
            self._services = build_services(self.settings)
            if need_schema and not is_current(self._services.db):
                fail(
                    f"the database at {self._services.db.url} is not initialised or is behind this release; "
                    "run `ktizo db upgrade` (or start `ktizo serve`, which upgrades it) first"
                )
        return self._services


def state(ctx: typer.Context) -> State:
    obj = ctx.find_root().obj
    assert isinstance(obj, State)
    return obj


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


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


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    typer.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
