"""The boot path's download records, written in batches: a boot storm's thousands of config downloads a second
become a few transactions of a few statements each (one UPDATE executemany, the audit rows, their events).

A request's record joins the batch being gathered while the previous one is written, so at most one batch is in
flight. The request waits for its record's commit after its answer went out, so the window in which a process
killed with SIGKILL loses downloads it answered is one batch: the ones answered while the previous batch was
being committed, plus that commit. An orderly stop (SIGTERM, SIGINT) lets the waiting requests finish first."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

from sqlalchemy import bindparam
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ktizo.db import Database
from ktizo.db.batch import execute_many, table_of
from ktizo.db.engine import after_commit
from ktizo.db.models import Device
from ktizo.db.types import utcnow
from ktizo.db.writer import deferred_callbacks
from ktizo.services import audit, events
from ktizo.services.context import Actor

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Download:
    """A config handed to a machine with nothing to bind (it knocks again, seen from ``source_ip``): what its
    audit row and event say."""

    device: Mapping[str, Any]  # the columns events.MACHINE_FIELDS names, and role and revision
    source_ip: str | None
    size: int

    @classmethod
    def of(cls, row: Any, source_ip: str | None, size: int) -> Download:
        device = {name: getattr(row, name, None) for name in (*events.MACHINE_FIELDS, "revision")}
        return cls(device, source_ip, size)


_MARK_INSTALLED = (
    table_of(Device)
    .update()
    .where(table_of(Device).c.id == bindparam("device"))
    # Delivered means installed: if the machine netboots again, iPXE sends it to its disk.
    .values(
        last_config_download=bindparam("now"),
        installed_at=bindparam("now"),
        last_seen=bindparam("now"),
        last_ip=bindparam("source_ip"),
    )
)


def write_downloads(downloads: Sequence[Download], s: Session) -> None:
    now = utcnow()
    execute_many(
        s, _MARK_INSTALLED, [{"device": d.device["id"], "now": now, "source_ip": d.source_ip} for d in downloads]
    )
    entries = [
        audit.Entry(
            Actor.device(d.source_ip),
            "config_download",
            d.device,
            {"role": d.device["role"], "revision": d.device["revision"], "bytes": d.size},
        )
        for d in downloads
    ]
    audit.record_batch(s, entries, at=now)


class Batcher(Generic[T]):
    """Items written ``write(items, session)`` a batch at a time: the items that arrive while one batch is being
    written make the next, so at most one batch is in flight."""

    def __init__(self, db: Database, write: Callable[[Sequence[T], Session], None]) -> None:
        self.db = db
        self.write = write
        self._gathering: list[tuple[T, asyncio.Future[None]]] = []
        self._in_flight = False

    async def record(self, item: T) -> None:
        """Record one item; returns once it is committed."""
        await self.note(item)

    def note(self, item: T) -> asyncio.Future[None]:
        """Record one item; the future says when it is committed (nobody need wait for it)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._gathering.append((item, done))
        if not self._in_flight:
            self._in_flight = True
            loop.call_soon(self._write_batch, loop)  # the requests answered in this turn of the loop join it
        return done

    def _write_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._gathering = self._gathering, []
        if not batch:
            self._in_flight = False
            return
        written = self.db.submit(partial(self.write, [item for item, _ in batch]))
        written.add_done_callback(lambda f: _call_soon(loop, self._written, loop, batch, f))

    def _written(
        self, loop: asyncio.AbstractEventLoop, batch: list[tuple[T, asyncio.Future[None]]], f: Future[object]
    ) -> None:
        error = f.exception()
        for _item, done in batch:
            if done.done():
                continue
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)
                done.exception()  # retrieved: a noted item nobody waits for must not log "never retrieved"
        self._write_batch(loop)


class DownloadLog(Batcher[Download]):
    def __init__(self, db: Database) -> None:
        super().__init__(db, _write_or_split)


@dataclass(frozen=True)
class Touch:
    """A pending (or rejected) machine knocked again with nothing new to say, a while since it was last seen or
    from another address: last_seen and last_ip are all it owes."""

    device_id: int
    source_ip: str | None


_TOUCH = (
    table_of(Device)
    .update()
    .where(table_of(Device).c.id == bindparam("device"))
    .values(last_seen=bindparam("now"), last_ip=bindparam("source_ip"))
)


def write_touches(touches: Sequence[Touch], s: Session) -> None:
    now = utcnow()
    execute_many(s, _TOUCH, [{"device": t.device_id, "now": now, "source_ip": t.source_ip} for t in touches])


class TouchLog(Batcher[Touch]):
    """Touches written in batches after the answer went out: a pending rack polling costs a few UPDATE statements
    every ``KTIZO_LAST_SEEN_INTERVAL``, not a first contact per machine. One lost when the process is killed is
    the next knock's to write."""

    def __init__(self, db: Database) -> None:
        super().__init__(db, write_touches)


def _write_or_split(downloads: Sequence[Download], s: Session) -> None:
    """Nothing in today's schema makes these rows fail (a machine deleted since its answer is an UPDATE of no
    row, and its download is still audited: the config was handed out), but a constraint added tomorrow must not
    take a whole batch's records down with one machine's."""
    try:
        _attempt(downloads, s)
    except IntegrityError:
        if len(downloads) == 1:
            raise
        log.warning("a batch of %d download records failed; writing them one by one", len(downloads))
        for download in downloads:
            try:
                _attempt([download], s)
            except IntegrityError:
                log.warning("download of device %s not recorded", download.device["id"], exc_info=True)


def _attempt(downloads: Sequence[Download], s: Session) -> None:
    # A rolled-back attempt's after-commit work (the downloads counter) is dropped with it.
    with deferred_callbacks() as callbacks, s.begin_nested():
        write_downloads(downloads, s)
    for callback in callbacks:
        after_commit(callback)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed (shutdown): nobody waits for the outcome any more
        loop.call_soon_threadsafe(callback, *args)
