"""What a booting machine gets from the config door: its config, gated by approval and identity.

``decide`` answers from one read (a prepared Core query: every machine of a boot storm comes through here). The
writes an answer implies come back with it: ``followup`` (first contact, binding, a refusal to count) is written
before the answer goes out, ``delivered`` (the download record) only once the config was handed to a connection
that was still open, so a config nobody received never marks a machine installed."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from sqlalchemy import Row, bindparam, select, update
from sqlalchemy.orm import Session

from ktizo.db import Database
from ktizo.db.fastread import FastRow
from ktizo.db.models import ConfigState, Device
from ktizo.db.types import utcnow
from ktizo.domain.devices import IDENTITY_REFUSED, DeviceStatus, Source, not_approved_message
from ktizo.domain.errors import KtizoError, PermissionDenied
from ktizo.domain.identity import identifying_uuid
from ktizo.services import audit, refusals
from ktizo.services.context import Actor
from ktizo.services.download_log import Download, Touch, write_downloads
from ktizo.services.first_contact import ANY_ENABLED_RULE, FACTORS, FirstContact, Knock
from ktizo.services.render import RenderableDevice, RenderCache, Renderer

# A write the answer owes; True when it decided the machine (a rule approved it), so the answer is decided again.
Work = Callable[[Session], bool | None]


class NotApproved(PermissionDenied):
    def __init__(self, status: DeviceStatus) -> None:
        super().__init__(not_approved_message(status))
        self.status = status


class IdentityRefused(PermissionDenied):
    """The one answer to a request that does not prove the machine's identity: a factor left out, a factor that
    differs from the bound one, or the wrong source address. The detail goes to the audit log only."""

    def __init__(self) -> None:
        super().__init__(IDENTITY_REFUSED)


@dataclass(frozen=True)
class Claim:
    """What a config request says about the machine; every field already normalised, None when not known."""

    mac: str | None = None
    uuid: str | None = None
    serial: str | None = None
    hostname: str | None = None
    source_ip: str | None = None
    authorization: str | None = None  # the Authorization header, for the OAuth device flow's token

    @property
    def identifying_uuid(self) -> str | None:
        return identifying_uuid(self.uuid)

    def knock(self) -> Knock:
        facts = {"reported_hostname": self.hostname} if self.hostname else {}
        return Knock(
            door=Source.CONFIG_FETCH,
            mac=self.mac,
            uuid=self.identifying_uuid,
            serial=self.serial,
            source_ip=self.source_ip,
            facts=facts,
        )


@dataclass(frozen=True)
class Basis:
    """What an answer was decided from, so that it may be given again without deciding it again: the machine's row
    as read (the columns the download record writes left out) and how long its answer holds (a pending machine's
    until its next last_seen write is owed, an approved machine's a few seconds: anything outside its row, like a
    base config file on disk, is then looked at again)."""

    by: str  # "mac" or "uuid": how the row was found
    value: str
    row: tuple[Any, ...]
    until: dt.datetime


@dataclass(frozen=True)
class Answer:
    """What a config request gets: a body or an error, and the writes it owes."""

    body: bytes | None = None
    error: KtizoError | None = None
    followup: Work | None = None  # written before answering
    delivered: Work | None = None  # written once the body was handed to an open connection
    download: Download | None = None  # the same record, for the batched log (when nothing else is owed)
    device_id: int | None = None  # None only for a machine seen for the first time
    status: DeviceStatus | None = None
    basis: Basis | None = None  # set when the answer owes nothing before it goes out and may be given again
    touch: Touch | None = None  # all a polling machine owes, written after the answer (services.download_log)

    def result(self) -> bytes:
        if self.error is not None:
            raise self.error
        assert self.body is not None
        return self.body

    @property
    def pending(self) -> bool:
        return isinstance(self.error, NotApproved) and self.error.status is DeviceStatus.PENDING


# The boot path is hit by every machine in a boot storm: one prepared Core query, no ORM identity map.
_BOOT_COLUMNS = (
    Device.id,
    Device.kind,
    Device.mac_address,
    Device.uuid,
    Device.serial,
    Device.hostname,
    Device.ip_address,
    Device.role,
    Device.status,
    Device.revision,
    Device.last_seen,
    Device.last_ip,
    Device.facts,
    Device.labels,
    Device.patch,
    Device.install_disk,
    Device.extra_nics,
    Device.lease_ip,
    Device.installed_at,
    Device.approve_on_arrival,
    # The configuration revision rides along, so noticing a change made by another replica costs nothing.
    select(ConfigState.revision).where(ConfigState.id == 1).scalar_subquery().label("config_revision"),
)
_BY_MAC = select(*_BOOT_COLUMNS).where(Device.mac_address == bindparam("mac"))
_BY_UUID = select(*_BOOT_COLUMNS).where(Device.uuid == bindparam("uuid"), Device.mac_address.is_(None))
# Every download record writes these; what a config request is answered does not depend on them (a pending
# machine's last_seen only says when a write is owed: ``Basis.until``).
_VOLATILE = frozenset({"last_seen", "installed_at"})
_STABLE_AT = tuple(i for i, c in enumerate(_BY_MAC.selected_columns) if c.key not in _VOLATILE)
_STABLE = tuple(_BOOT_COLUMNS[i] for i in _STABLE_AT)
_STABLE_BY_MAC = _BY_MAC.with_only_columns(*_STABLE)
_STABLE_BY_UUID = _BY_UUID.with_only_columns(*_STABLE)
# How long an approved machine's answer is given again without deciding it anew (see Basis).
REMEMBER_APPROVED = dt.timedelta(seconds=10)
BootDevice = Row[Any] | FastRow  # the columns above, by attribute


class BootService:
    def __init__(
        self,
        db: Database,
        renderer: Renderer,
        first_contact: FirstContact,
        *,
        require_lease_ip: bool = False,
        access_check: Callable[[int, str | None], None] | None = None,
    ) -> None:
        self.db = db
        self.renderer = renderer
        self.first_contact = first_contact
        self.require_lease_ip = require_lease_ip
        self.access_check = access_check
        self._by_mac, self._by_uuid = db.fast_query(_BY_MAC), db.fast_query(_BY_UUID)
        self._stable = {"mac": db.fast_query(_STABLE_BY_MAC), "uuid": db.fast_query(_STABLE_BY_UUID)}
        self._any_rule = db.fast_query(ANY_ENABLED_RULE)  # SQLite's fast read; elsewhere assumed

    @property
    def cache(self) -> RenderCache:
        return self.renderer.cache

    def fetch_config(self, claim: Claim) -> bytes:
        """Decide and write in one go, as a synchronous caller (the CLI, a test) would: the config, or raise
        ``NotApproved`` / ``IdentityRefused`` (both 403 to Talos)."""
        answer = self.decide(claim)
        if answer.followup is not None:
            with self.db.write() as s:
                decided = answer.followup(s)
            if decided:  # a rule approved the machine just now: it gets its config on this very request
                answer = self.decide(claim)
        with self.db.write() as s:
            if answer.followup is not None:
                answer.followup(s)
            if answer.delivered is not None:
                answer.delivered(s)
        return answer.result()

    def decide(self, claim: Claim) -> Answer:
        """Decide a config request from one read; the writes it implies come back with the answer."""
        knock = claim.knock()  # refuses a request naming no machine
        device, read = self._lookup(claim)
        arrive = partial(self._arrive, knock)
        if device is None:
            return Answer(error=NotApproved(DeviceStatus.PENDING), followup=arrive, status=DeviceStatus.PENDING)
        status = DeviceStatus(device.status)
        refused = replace(Answer(error=IdentityRefused(), device_id=device.id), status=status)
        if self._contradicts(device, knock):
            return replace(refused, followup=arrive)  # first contact records the mismatch
        if status is not DeviceStatus.APPROVED:
            if self._owes_write(device, knock):
                if self._only_seen(device, knock):
                    touch = Touch(device.id, knock.source_ip)
                    return Answer(error=NotApproved(status), device_id=device.id, status=status, touch=touch)
                return Answer(error=NotApproved(status), followup=arrive, device_id=device.id, status=status)
            basis = None
            if read is not None and device.last_seen is not None:
                until = device.last_seen + dt.timedelta(seconds=self.first_contact.touch_interval)
                basis = Basis(*read, until=until)
            return Answer(error=NotApproved(status), device_id=device.id, status=status, basis=basis)
        missing = self._missing_factor(device, knock)
        if missing is not None:
            detail = {missing: {"bound": getattr(device, missing), "claimed": None}}
            return replace(refused, followup=partial(self._refuse, knock, device, detail))
        if self.require_lease_ip and device.lease_ip != claim.source_ip:
            # A spoofed MAC on another port has no lease for it: the lease IP is a second identity factor.
            detail = {"lease_ip": {"bound": device.lease_ip, "claimed": claim.source_ip}}
            return replace(refused, followup=partial(self._refuse, knock, device, detail))
        if self.access_check is not None:
            try:
                self.access_check(device.id, claim.authorization)
            except PermissionDenied as exc:
                return Answer(error=exc, device_id=device.id, status=status)
        body = self.render(device, device.config_revision)
        if self._binds(device, knock):  # a factor reported for the first time: first contact's full write
            delivered = partial(self._record_download, knock, device, len(body))
            return Answer(body=body, delivered=delivered, device_id=device.id, status=status)
        download = Download.of(device, knock.source_ip, len(body))
        # Behind an access check the answer depends on the token, which the row does not show.
        basis = None
        if read and self.access_check is None:
            # Spread over the second half of the span: a rack that came up together must not be decided again
            # all in the same instant.
            basis = Basis(*read, until=utcnow() + REMEMBER_APPROVED * random.uniform(0.5, 1.0))  # noqa: S311
        return Answer(
            body=body,
            delivered=partial(write_downloads, [download]),
            download=download,
            device_id=device.id,
            status=status,
            basis=basis,
        )

    def holds(self, basis: Basis) -> bool:
        """Whether an answer decided from ``basis`` is still the answer: not expired, and the machine's row as it
        was then (one narrow read of the row, on SQLite)."""
        query = self._stable[basis.by]
        if query is None or utcnow() >= basis.until:
            return False
        return query.first_raw(**{basis.by: basis.value}) == basis.row

    def render(self, device: RenderableDevice, config_revision: int | None = None) -> bytes:
        return self.renderer.render(device, self.renderer.source.snapshot(config_revision))

    # -- internals -------------------------------------------------------------------------------------

    def quiet(self, knock: Knock) -> BootDevice | None:
        """The machine ``knock`` names, when its knock changes nothing (known, nothing to bind or refuse, seen
        lately from this address with these facts), so that the door may answer from this one read; else None,
        and the door goes through first contact's write."""
        device = self._find(knock)
        if device is None:
            return None
        if self._contradicts(device, knock):
            return None
        return None if self._owes_write(device, knock) else device

    def _find(self, claim: Claim | Knock) -> BootDevice | None:
        return self._lookup(claim)[0]

    def _lookup(self, claim: Claim | Knock) -> tuple[BootDevice | None, tuple[str, str, tuple[Any, ...]] | None]:
        """The machine, and (on SQLite) how it was found with its raw row, for a ``Basis``."""
        by_mac, by_uuid = self._by_mac, self._by_uuid
        if by_mac is None or by_uuid is None:
            return self._find_through_sqlalchemy(claim), None
        if claim.mac:
            raw = by_mac.first_raw(mac=claim.mac)
            if raw is not None:
                return by_mac.process(raw), ("mac", claim.mac, tuple(raw[i] for i in _STABLE_AT))
            if claim.identifying_uuid is None:
                return None, None
        raw = by_uuid.first_raw(uuid=claim.identifying_uuid)
        if raw is None:
            return None, None
        # Found by UUID although it named a MAC: a row made for that MAC later would change the answer, so this
        # one is not given again from memory.
        read = None if claim.mac else ("uuid", claim.identifying_uuid, tuple(raw[i] for i in _STABLE_AT))
        return by_uuid.process(raw), read  # type: ignore[return-value]

    def _find_through_sqlalchemy(self, claim: Claim | Knock) -> BootDevice | None:
        with self.db.read_engine.connect() as conn:
            if claim.mac:
                row = conn.execute(_BY_MAC, {"mac": claim.mac}).first()
                if row is not None or claim.identifying_uuid is None:
                    return row
            # Known only by UUID (pre-registered that way, or Talos's legacy ?uuid= form).
            return conn.execute(_BY_UUID, {"uuid": claim.identifying_uuid}).first()

    @staticmethod
    def _binds(device: BootDevice, knock: Knock) -> bool:
        return device.mac_address is None or any(knock.claimed(f) and not getattr(device, f) for f in FACTORS)

    def _owes_write(self, device: BootDevice, knock: Knock) -> bool:
        """Whether a polling machine's knock changes anything: a boot storm of pending machines must not be a
        storm of writes."""
        if self._binds(device, knock):
            return True
        last = device.last_seen
        if last is None or (utcnow() - last).total_seconds() >= self.first_contact.touch_interval:
            return True
        if device.last_ip != knock.source_ip:
            return True
        # An approved machine's facts are not the caller's to change (first_contact._touch): no write to owe.
        return device.status != DeviceStatus.APPROVED.value and self._tells_new_facts(device, knock)

    @staticmethod
    def _tells_new_facts(device: BootDevice, knock: Knock) -> bool:
        facts = device.facts or {}
        return any(facts.get(k) != v for k, v in knock.facts.items())

    def _only_seen(self, device: BootDevice, knock: Knock) -> bool:
        """Whether all a knock owes is last_seen and last_ip (``Touch``): nothing to bind, the facts it reports
        already known, and nothing first contact would decide (no rule enabled, no approval waiting for the
        machine's arrival)."""
        if self._any_rule is None or device.approve_on_arrival or self._binds(device, knock):
            return False
        return not self._tells_new_facts(device, knock) and self._any_rule.first_raw() is None

    @staticmethod
    def _contradicts(device: BootDevice, knock: Knock) -> bool:
        """The knock claims a UUID, serial or MAC other than the one the machine is bound to."""
        return any(getattr(device, f) and knock.claimed(f) and getattr(device, f) != knock.claimed(f) for f in FACTORS)

    @staticmethod
    def _missing_factor(device: BootDevice, knock: Knock) -> str | None:
        """A bound machine gets its config only by repeating what it is bound to: leaving the UUID out of the
        request must not be a way around the binding (anyone can name a MAC seen on the wire)."""
        if device.uuid and not knock.identifying_uuid:
            return "uuid"
        if not device.uuid and device.serial and not knock.serial:
            return "serial"
        return None

    def _arrive(self, knock: Knock, s: Session) -> bool:
        return self.first_contact.arrive(s, knock).decided

    @staticmethod
    def _refuse(knock: Knock, device: BootDevice, detail: dict[str, Any], s: Session) -> None:
        refusals.refuse(s, knock.who, "identity_mismatch", knock.subject, device, {**detail, "door": knock.door.value})

    def _record_download(self, knock: Knock, device: BootDevice, size: int, s: Session) -> None:
        self.first_contact.arrive(s, knock)  # binds factors reported for the first time, touches last_seen
        now = utcnow()
        s.execute(
            update(Device)
            .where(Device.id == device.id)
            # Delivered means installed: if the machine netboots again, iPXE sends it to its disk.
            .values(last_config_download=now, installed_at=now)
        )
        audit.record(
            s,
            Actor.device(knock.source_ip),
            "config_download",
            device,
            {"role": device.role, "revision": device.revision, "bytes": size},
        )
