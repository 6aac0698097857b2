"""The config download, Talos's GET and the seed's POST alike: decide, hold a pending machine's request until it
is approved (long poll), and record the download once the config went out.

Holding requests is what a client on the provisioning network could turn against the server, so it is bounded:
at most ``max_held`` requests held in all and ``max_held_per_address`` from one address (beyond that a request is
answered at once, as without long poll), one held request per machine (a newer one for the same machine answers
the older at once), and a request whose client hung up stops waiting at once. Only the request still held when the
machine is approved gets the render, and the download is recorded only for a config handed to an open
connection."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from ktizo.db import Database
from ktizo.services.boot import Answer, BootService, Claim, Work
from ktizo.services.download_log import DownloadLog, TouchLog
from ktizo.services.watch import ApprovalWatcher


@dataclass
class Remembered:
    """An answer given again to the same request (same query, same address) while its ``Basis`` holds: a
    machine polling while pending, or downloading its config again, costs one narrow read instead of a decision."""

    answer: Answer
    payload: Any = None  # what the adapter made of the answer: its response, ready to send


# Remembered answers kept at most (one per machine and address in a storm); past it they are all forgotten.
MAX_REMEMBERED = 200_000


@dataclass
class _Held:
    device_id: int
    address: str
    event: asyncio.Event = field(default_factory=asyncio.Event)
    superseded: bool = False


class ConfigDownload:
    def __init__(
        self,
        db: Database,
        boot: BootService,
        watcher: ApprovalWatcher,
        *,
        long_poll_seconds: float,
        max_held: int,
        max_held_per_address: int,
    ) -> None:
        self.db = db
        self.boot = boot
        self.watcher = watcher
        self.long_poll_seconds = long_poll_seconds
        self.max_held = max_held
        self.max_held_per_address = max_held_per_address
        self._by_address: Counter[str] = Counter()
        self._by_device: dict[int, _Held] = {}
        self._held = 0
        self.log = DownloadLog(db)
        self.touches = TouchLog(db)
        self._remembered: dict[Hashable, Remembered] = {}
        self.refused_holds = 0  # requests answered at once because a cap was reached (for operators and tests)

    @property
    def held(self) -> int:
        return self._held

    def recall(self, key: Hashable) -> Remembered | None:
        """The answer remembered for the request ``key`` names, if it is still the answer (see ``Remembered``)."""
        remembered = self._remembered.get(key)
        if remembered is None:
            return None
        answer = remembered.answer
        # Long poll may have been turned on since.
        if answer.basis is not None and not self._would_hold(answer) and self.boot.holds(answer.basis):
            return remembered
        self._remembered.pop(key, None)
        return None

    def remember(self, key: Hashable, answer: Answer) -> Remembered | None:
        """Keep ``answer`` for the next request ``key`` names, if it may be given again: it owes no write before
        it goes out, and it would not be held (a pending machine's request waits for approval under long poll)."""
        if answer.basis is None or self._would_hold(answer):
            return None
        if len(self._remembered) >= MAX_REMEMBERED:
            self._remembered.clear()
        remembered = self._remembered[key] = Remembered(answer)
        return remembered

    def _would_hold(self, answer: Answer) -> bool:
        return self.long_poll_seconds > 0 and answer.pending

    async def request(
        self, claim: Claim, gone: asyncio.Event | None = None, on_hold: Callable[[], None] | None = None
    ) -> Answer:
        """The answer to one config request. ``gone`` is set by the adapter when the client hangs up; ``on_hold``
        is called just before the request is held (an adapter may watch for hang-ups only from then on)."""
        answer = await self._decide(claim)
        if answer.touch is not None:
            self.touches.note(answer.touch)
        if await self._write(answer.followup):  # a rule decided the machine: answer from what it is now
            answer = await self._decide(claim)
            await self._write(answer.followup)
        if self.long_poll_seconds <= 0 or not answer.pending:
            return answer
        if answer.device_id is None:  # first contact: the row exists now, look again for its id
            answer = await self._decide(claim)
            await self._write(answer.followup)
            if answer.device_id is None or not answer.pending:
                return answer
        held = self._hold(answer.device_id, claim.source_ip)
        if held is None:
            return answer
        if on_hold is not None:
            on_hold()
        bridge = asyncio.create_task(_relay(gone, held.event)) if gone is not None else None
        try:
            woken = await self.watcher.wait(held.device_id, self.long_poll_seconds, held.event)
        finally:
            self._release(held)
            if bridge is not None:
                bridge.cancel()
        if (gone is not None and gone.is_set()) or held.superseded or not woken:
            return answer  # nobody to answer, a newer request took over, or the wait ended: as without long poll
        decided = await self._decide(claim)
        await self._write(decided.followup)
        return decided

    async def delivered(self, answer: Answer, gone: asyncio.Event | None = None) -> None:
        """Call after the answer was sent: the download is recorded if the client was still connected."""
        if answer.delivered is None:
            return
        await asyncio.sleep(0)  # a hang-up the server has seen by now is relayed to ``gone`` first
        if gone is not None and gone.is_set():
            return
        if answer.download is not None:
            await self.log.record(answer.download)
        else:
            await self._write(answer.delivered)

    # -- internals -------------------------------------------------------------------------------------

    async def _decide(self, claim: Claim) -> Answer:
        # Where reads never block (SQLite in WAL mode) the answer is decided on the event loop; a PostgreSQL
        # round trip is not something to wait for there.
        if self.db.nonblocking_reads:
            return self.boot.decide(claim)
        return await asyncio.to_thread(self.boot.decide, claim)

    async def _write(self, work: Work | None) -> bool:
        if work is None:
            return False
        return bool(await asyncio.wrap_future(self.db.submit(work)))

    def _hold(self, device_id: int, source_ip: str | None) -> _Held | None:
        address = source_ip or ""
        if self._held >= self.max_held or self._by_address[address] >= self.max_held_per_address:
            self.refused_holds += 1
            return None
        older = self._by_device.get(device_id)
        if older is not None:
            older.superseded = True
            older.event.set()
        held = _Held(device_id, address)
        self._by_device[device_id] = held
        self._by_address[address] += 1
        self._held += 1
        return held

    def _release(self, held: _Held) -> None:
        self._held -= 1
        self._by_address[held.address] -= 1
        if not self._by_address[held.address]:
            del self._by_address[held.address]
        if self._by_device.get(held.device_id) is held:
            del self._by_device[held.device_id]


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()
