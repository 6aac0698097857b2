"""Errors in the domain's own words; each adapter maps them once (HTTP statuses live in ``api.errors``)."""

from __future__ import annotations

import datetime as dt


class KtizoError(Exception):
    """Base of every error Ktizo raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(KtizoError):
    """The thing asked for does not exist."""


class Conflict(KtizoError):
    """The request collides with existing state (a duplicate MAC, a username taken); ``field`` names the input
    that collides when there is one, so a form can show the refusal next to it, and ``fields`` every one of them
    when several collide at once (hostname and static IP)."""

    def __init__(self, message: str, field: str | None = None, *, fields: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.fields = fields or ({field: message} if field else {})


class InvalidTransition(Conflict):
    """A state change the machine state machine does not allow."""


class FailedPrecondition(Conflict):
    """An operator request that needs something done first (cluster settings, a secrets bundle)."""


class Unauthenticated(KtizoError):
    """No credentials, or credentials that do not check out."""


class PermissionDenied(KtizoError):
    """Authenticated, but the role or the machine's state does not allow this."""


class TooManyAttempts(KtizoError):
    """Refused for now because of too many recent attempts (sign-ins, new machines); ``retry_after`` in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    @staticmethod
    def seconds_until(moment: dt.datetime, now: dt.datetime) -> int:
        """A Retry-After for a window that frees up at ``moment``: whole seconds, rounded up, at least one."""
        return max(1, int((moment - now).total_seconds()) + 1)


class NotReady(KtizoError):
    """Something the operator must provide first (a base config, a cluster) is missing."""


class ValidationFailed(KtizoError):
    """Input that is malformed; ``field`` names the offending field (dotted path) when there is one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message
