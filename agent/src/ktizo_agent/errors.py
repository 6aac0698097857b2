"""What can go wrong, as exceptions carrying the exit code and the next step for the person at the terminal."""

from __future__ import annotations

import enum
import signal


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    REJECTED = 3
    GONE = 4
    GAVE_UP = 5
    KEY_REFUSED = 6


class AgentError(Exception):
    """A failure the agent explains: ``message`` says what happened, ``hint`` what to do about it."""

    exit_code = ExitCode.ERROR

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  next: {self.hint}" if self.hint else self.message


class UsageError(AgentError):
    exit_code = ExitCode.USAGE


class Rejected(AgentError):
    """Ktizo said no (403): the enrollment was rejected, or the agent revoked."""

    exit_code = ExitCode.REJECTED


class Gone(AgentError):
    """Ktizo does not know us (404): purged, expired, or already picked up."""

    exit_code = ExitCode.GONE


class GaveUp(AgentError):
    exit_code = ExitCode.GAVE_UP


class KeyRefused(AgentError):
    """Ktizo refused the site code and enrollment key (401): unknown site, or a wrong, rotated-away, expired or
    used-up key. Trying again with the same key cannot help."""

    exit_code = ExitCode.KEY_REFUSED


class Throttled(AgentError):
    """429 from Ktizo; ``retry_after`` is how long it asked us to wait."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Interrupted(BaseException):  # like KeyboardInterrupt: no `except Exception` on the way up swallows it
    """SIGINT or SIGTERM arrived while the agent was waiting."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"
