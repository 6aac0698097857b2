"""Waking held requests when a device is approved: Talos's backoff must not stand between an operator's click
and the machine (a long-polled config download answers the moment its device is approved).

Decisions made in this process wake its waiters once they commit. Decisions made by another worker or replica
reach them two ways: on PostgreSQL by ``LISTEN``/``NOTIFY`` (migration 0009's trigger, at commit), and on every
database by a query of what was decided since the last look, run every ``poll_seconds`` only while someone is
waiting (indexed, it returns the few machines decided, whatever the number waiting). The query looks back
``OVERLAP`` seconds further than its last run, for commits that land after their timestamp and for clocks of
replicas a little apart; a machine decided twice in that window wakes its waiter once more, which only makes it
look again. Times and waits are on Ktizo's clock."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections import defaultdict

from sqlalchemy import select

from ktizo.db import Database
from ktizo.db.models import Device
from ktizo.db.notify import DEVICES_CHANNEL, Listener
from ktizo.domain import clock

OVERLAP = dt.timedelta(seconds=2)


class ApprovalWatcher:
    def __init__(self, db: Database, poll_seconds: float | None = None) -> None:
        self.db = db
        self.listener: Listener | None = None
        if db.dialect == "postgresql":
            self.listener = Listener(db.url, DEVICES_CHANNEL, self._notified, idle=lambda: not self.waiting)
        # With notifications the query is a safety net (a dropped connection); without, it is how they travel.
        self.poll_seconds = poll_seconds if poll_seconds is not None else (1.0 if self.listener else 0.25)
        self._waiters: dict[int, set[asyncio.Event]] = defaultdict(set)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poller: asyncio.Task[None] | None = None

    async def wait(self, device_id: int, timeout: float, event: asyncio.Event | None = None) -> bool:
        """Wait up to ``timeout`` seconds for ``device_id`` to change state; True if woken, False on timeout.

        ``event`` lets the caller wake the wait for reasons of its own too (the client went away)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        event = event or asyncio.Event()
        with self._lock:
            self._waiters[device_id].add(event)
        if self._poller is None or self._poller.done():
            self._poller = loop.create_task(self._poll())
        if self.listener is not None:
            self.listener.ensure_running()
        try:
            return await clock.current().wait(event, timeout)
        finally:
            with self._lock:
                waiters = self._waiters.get(device_id)
                if waiters is not None:
                    waiters.discard(event)
                    if not waiters:
                        del self._waiters[device_id]

    def notify(self, device_id: int) -> None:
        """Wake the requests waiting for ``device_id``; safe to call from any thread."""
        with self._lock:
            events = list(self._waiters.get(device_id, ()))
        loop = self._loop
        if not events or loop is None or loop.is_closed():
            return
        for event in events:
            loop.call_soon_threadsafe(event.set)

    def _notified(self, payload: str) -> None:
        if payload.isdigit():
            self.notify(int(payload))

    def close(self) -> None:
        if self.listener is not None:
            self.listener.stop()

    @property
    def waiting(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._waiters.values())

    async def _poll(self) -> None:
        since = clock.now() - OVERLAP
        while True:
            await clock.current().sleep(self.poll_seconds)
            with self._lock:
                if not self._waiters:
                    return
            checked_at = clock.now()
            decided = await asyncio.to_thread(self._decided_since, since)
            since = checked_at - OVERLAP
            with self._lock:
                woken = [device_id for device_id in decided if device_id in self._waiters]
            for device_id in woken:
                self.notify(device_id)

    def _decided_since(self, since: dt.datetime) -> list[int]:
        with self.db.read() as s:
            decided = (
                select(Device.id)
                .where(Device.approved_at >= since)
                .union(select(Device.id).where(Device.rejected_at >= since))
            )
            return list(s.scalars(decided))
