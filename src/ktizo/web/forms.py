"""Reading posted forms: text fields with limits, and domain errors turned into per-field messages."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from starlette.datastructures import FormData

from ktizo.domain.errors import KtizoError, PermissionDenied, ValidationFailed

Errors = dict[str, str]  # field name -> message; "_" for the form as a whole
T = TypeVar("T")


def text(form: FormData, name: str, max_length: int = 255) -> str:
    value = form.get(name)
    if not isinstance(value, str):
        return ""
    return value.strip()[: max_length + 1]


def too_long(errors: Errors, name: str, value: str, max_length: int) -> None:
    if len(value) > max_length:
        errors[name] = f"at most {max_length} characters"


def parse(errors: Errors, name: str, value: str, normalise: Callable[[str, str], T]) -> T | None:
    """Run a domain normaliser, noting its message under ``name`` instead of raising."""
    try:
        return normalise(value, name)
    except ValidationFailed as exc:
        errors[name] = exc.message
        return None


def note_error(errors: Errors, exc: KtizoError, fields: Iterable[str]) -> None:
    """Put a service's refusal next to the field it names, or above the form. Permission errors are not
    form errors: they propagate and become a 403 page."""
    if isinstance(exc, PermissionDenied):
        raise exc
    known = set(fields)
    # A conflict may name several fields at once (a hostname and a static IP both taken): each gets its own.
    named = getattr(exc, "fields", None) or {}
    if len(named) > 1 and all(name in known for name in named):
        errors.update(named)
        return
    field = getattr(exc, "field", None)
    head = field.split(".")[0] if field else None
    if head and head in known:
        errors[head] = exc.message
    else:
        errors["_"] = str(exc)


def ints(values: Iterable[object], limit: int = 5000) -> list[int]:
    out: list[int] = []
    for v in values:
        if isinstance(v, str) and v.isdecimal() and len(v) < 10:
            out.append(int(v))
        if len(out) >= limit:
            break
    return out
