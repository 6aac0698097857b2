"""A clock the tests move themselves (``ktizo.domain.clock``): time passes only when a test says so.

A held request answered while this clock stands still was answered by what the test did, not by its timeout,
however slow the machine running the test is; a lockout that ends "after 15 minutes" is checked by moving the
clock 15 minutes, not by waiting, nor by rewriting rows in the database."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from dataclasses import dataclass, field


@dataclass
class _Sleeper:
    deadline: float
    loop: asyncio.AbstractEventLoop
    event: asyncio.Event = field(default_factory=asyncio.Event)


class ManualClock:
    def __init__(self, start: dt.datetime | None = None) -> None:
        self._now = start or dt.datetime.now(dt.UTC)
        self._monotonic = 0.0
        self._sleepers: list[_Sleeper] = []
        self._lock = threading.Lock()

    def now(self) -> dt.datetime:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return self._monotonic

    def advance(self, seconds: float = 0.0, **delta: float) -> None:
        """Move time forward (``advance(60)`` or ``advance(minutes=15)``); sleepers that are due wake up."""
        step = seconds + dt.timedelta(**delta).total_seconds()
        with self._lock:
            self._now += dt.timedelta(seconds=step)
            self._monotonic += step
            due = [s for s in self._sleepers if s.deadline <= self._monotonic]
            self._sleepers = [s for s in self._sleepers if s.deadline > self._monotonic]
        for sleeper in due:
            if not sleeper.loop.is_closed():
                sleeper.loop.call_soon_threadsafe(sleeper.event.set)

    @property
    def sleeping(self) -> int:
        with self._lock:
            return len(self._sleepers)

    def _sleeper(self, seconds: float) -> _Sleeper:
        sleeper = _Sleeper(self._monotonic + seconds, asyncio.get_running_loop())
        with self._lock:
            sleeper.deadline = self._monotonic + seconds
            if seconds > 0:
                self._sleepers.append(sleeper)
            else:
                sleeper.event.set()
        return sleeper

    async def sleep(self, seconds: float) -> None:
        await self._sleeper(seconds).event.wait()

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        sleeper = self._sleeper(timeout)
        waiting = asyncio.ensure_future(event.wait())
        timer = asyncio.ensure_future(sleeper.event.wait())
        try:
            await asyncio.wait({waiting, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            timer.cancel()
            with self._lock:
                if sleeper in self._sleepers:
                    self._sleepers.remove(sleeper)
        return event.is_set()
