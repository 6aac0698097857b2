"""Time, as Ktizo reads it: one clock for wall time (windows, expiry, audit) and for waiting (long polls).

Every "now" and every timed wait in Ktizo goes through the current clock, so the tests can put a clock of their own
in its place and move time forward themselves: a test then asserts that a held request was answered *before* its
timeout (the clock never moved) rather than "within 1.5 s" of a wall clock on a loaded machine."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """The current time in UTC (timezone-aware)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back, for measuring how long something took."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        """Wait until ``event`` is set (True) or ``timeout`` seconds have passed on this clock (False)."""
        ...


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True


_current: Clock = SystemClock()


def current() -> Clock:
    return _current


def now() -> dt.datetime:
    return _current.now()


@contextmanager
def use(clock: Clock) -> Iterator[Clock]:
    """Make ``clock`` Ktizo's clock for the duration of the block (tests)."""
    global _current
    previous, _current = _current, clock
    try:
        yield clock
    finally:
        _current = previous
