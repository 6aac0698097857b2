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
from typing import Any

from sqlalchemy import bindparam
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ktizo.db import Database
from ktizo.db.batch import table_of
from ktizo.db.engine import after_commit
from ktizo.db.models import Device
from ktizo.db.types import utcnow
from ktizo.db.writer import deferred_callbacks
from ktizo.services import audit, events
from ktizo.services.context import Actor

log = logging.getLogger(__name__)


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
    s.execute(_MARK_INSTALLED, [{"device": d.device["id"], "now": now, "source_ip": d.source_ip} for d in downloads])
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


class DownloadLog:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._gathering: list[tuple[Download, asyncio.Future[None]]] = []
        self._in_flight = False

    async def record(self, download: Download) -> None:
        """Record one download; returns once it is committed."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._gathering.append((download, done))
        if not self._in_flight:
            self._in_flight = True
            loop.call_soon(self._write_batch, loop)  # the requests answered in this turn of the loop join it
        await done

    def _write_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._gathering = self._gathering, []
        if not batch:
            self._in_flight = False
            return
        written = self.db.submit(partial(_write_or_split, [d for d, _ in batch]))
        written.add_done_callback(lambda f: _call_soon(loop, self._written, loop, batch, f))

    def _written(
        self, loop: asyncio.AbstractEventLoop, batch: list[tuple[Download, asyncio.Future[None]]], f: Future[object]
    ) -> None:
        error = f.exception()
        for _download, done in batch:
            if done.done():
                continue
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)
        self._write_batch(loop)


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
