"""Domain errors to HTTP statuses: the one table, read by the API (JSON bodies) and the UI (pages)."""

from __future__ import annotations

from ktizo.domain.errors import (
    Conflict,
    KtizoError,
    NotFound,
    NotReady,
    PermissionDenied,
    TooManyAttempts,
    Unauthenticated,
    ValidationFailed,
)

# Most specific first: InvalidTransition and FailedPrecondition are Conflicts.
STATUS: tuple[tuple[type[KtizoError], int, str], ...] = (
    (ValidationFailed, 422, "That input was not accepted"),
    (Unauthenticated, 401, "Sign in again"),
    (PermissionDenied, 403, "Not allowed"),
    (NotFound, 404, "Not found"),
    (Conflict, 409, "That conflicts with the current state"),
    (TooManyAttempts, 429, "Too many attempts"),
    (NotReady, 503, "Something must be set up first"),
)


def status_of(exc: KtizoError) -> tuple[int, str]:
    """The HTTP status of ``exc`` and a title a page can show."""
    for cls, code, title in STATUS:
        if isinstance(exc, cls):
            return code, title
    return 400, "That did not work"


def retry_after(exc: KtizoError) -> dict[str, str]:
    return {"Retry-After": str(exc.retry_after)} if isinstance(exc, TooManyAttempts) else {}
