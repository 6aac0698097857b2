"""Waking held requests when a device is approved: Talos's backoff must not stand between an operator's click
and the machine (a long-polled config download answers the moment its device is approved).

Approvals made in this process wake waiters once they commit; approvals made by another replica are noticed by
one cheap query a second, run only while someone is waiting. Times and waits are on Ktizo's clock."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections import defaultdict

from sqlalchemy import select

from ktizo.db import Database
from ktizo.db.models import Device
from ktizo.domain import clock


class ApprovalWatcher:
    def __init__(self, db: Database, poll_seconds: float = 1.0) -> None:
        self.db = db
        self.poll_seconds = poll_seconds
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

    @property
    def waiting(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._waiters.values())

    async def _poll(self) -> None:
        since = clock.now() - dt.timedelta(seconds=self.poll_seconds)
        while True:
            await clock.current().sleep(self.poll_seconds)
            with self._lock:
                ids = list(self._waiters)
            if not ids:
                return
            checked_at = clock.now()
            changed = await asyncio.to_thread(self._changed_since, ids, since)
            since = checked_at - dt.timedelta(seconds=self.poll_seconds)  # overlap: clocks and commit order
            for device_id in changed:
                self.notify(device_id)

    def _changed_since(self, ids: list[int], since: dt.datetime) -> list[int]:
        with self.db.read() as s:
            rows = s.scalars(
                select(Device.id).where(
                    Device.id.in_(ids),
                    (Device.approved_at >= since) | (Device.rejected_at >= since),
                )
            )
            return list(rows)
