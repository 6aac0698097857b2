"""What a booting machine gets: the config download Talos performs, gated by approval and identity."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy import Row, bindparam, select, update
from sqlalchemy.orm import Session

from ktizo.db import Database
from ktizo.db.models import ConfigState, Device
from ktizo.db.types import utcnow
from ktizo.domain.devices import DeviceStatus, Source, not_approved_message
from ktizo.domain.errors import KtizoError, PermissionDenied, ValidationFailed
from ktizo.services import audit
from ktizo.services.context import Actor
from ktizo.services.devices import check_new_device_budget, insert_ignoring_conflict
from ktizo.services.render import RenderableDevice, RenderCache, Renderer

# SMBIOS UUIDs that firmware vendors ship on many boards at once: they identify nothing.
_MEANINGLESS_UUIDS = frozenset(
    {
        "00000000-0000-0000-0000-000000000000",
        "ffffffff-ffff-ffff-ffff-ffffffffffff",
        "03000200-0400-0500-0006-000700080009",
    }
)


class NotApproved(PermissionDenied):
    def __init__(self, status: DeviceStatus) -> None:
        super().__init__(not_approved_message(status))
        self.status = status


class IdentityMismatch(PermissionDenied):
    pass


@dataclass(frozen=True)
class Claim:
    """What a request says about the machine; every field already normalised, None when not known."""

    mac: str | None = None
    uuid: str | None = None
    serial: str | None = None
    hostname: str | None = None
    source_ip: str | None = None
    authorization: str | None = None  # the Authorization header, for the OAuth device flow's token

    @property
    def identifying_uuid(self) -> str | None:
        return self.uuid if self.uuid and self.uuid not in _MEANINGLESS_UUIDS else None


@dataclass(frozen=True)
class Answer:
    """What a config request gets: a body or an error, plus the write it still owes (``followup``)."""

    body: bytes | None = None
    error: KtizoError | None = None
    followup: Callable[[Session], None] | None = None
    device_id: int | None = None  # None only for a machine seen for the first time

    def result(self) -> bytes:
        if self.error is not None:
            raise self.error
        assert self.body is not None
        return self.body


# The boot path is hit by every machine in a boot storm: one prepared Core query, no ORM identity map.
_BOOT_COLUMNS = (
    Device.id,
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
    # The configuration revision rides along, so noticing a change made by another replica costs nothing.
    select(ConfigState.revision).where(ConfigState.id == 1).scalar_subquery().label("config_revision"),
)
_BY_MAC = select(*_BOOT_COLUMNS).where(Device.mac_address == bindparam("mac"))
_BY_UUID = select(*_BOOT_COLUMNS).where(Device.uuid == bindparam("uuid"), Device.mac_address.is_(None))
BootDevice = Row[Any]  # the columns above, by attribute


class BootService:
    def __init__(
        self,
        db: Database,
        renderer: Renderer,
        *,
        last_seen_interval: float = 15.0,
        require_lease_ip: bool = False,
        new_per_minute: int = 0,
        access_check: Callable[[int, str | None], None] | None = None,
    ) -> None:
        self.new_per_minute = new_per_minute
        self.db = db
        self.renderer = renderer
        self.last_seen_interval = last_seen_interval
        self.require_lease_ip = require_lease_ip
        self.access_check = access_check

    @property
    def cache(self) -> RenderCache:
        return self.renderer.cache

    def fetch_config(self, claim: Claim) -> bytes:
        """Return the device's config, or raise ``NotApproved`` / ``IdentityMismatch`` (both mean 403 to Talos)."""
        answer = self.answer(claim)
        if answer.followup is not None:
            with self.db.write() as s:
                answer.followup(s)
        return answer.result()

    def answer(self, claim: Claim) -> Answer:
        """Decide a config request from one read. The writes it implies (registration, last_seen, the download
        record) come back as ``followup(session)``, so an async caller can answer from the event loop and hand
        only the writes to the database's group-commit writer."""
        if not claim.mac and not claim.identifying_uuid:
            raise ValidationFailed(
                "the request names no machine: put mac=${mac}&uuid=${uuid} in the talos.config URL", "mac"
            )
        device = self._find(claim)
        if device is None:
            first_contact = partial(self._first_contact, claim, self.new_per_minute)
            return Answer(error=NotApproved(DeviceStatus.PENDING), followup=first_contact)

        mismatch = self._identity_mismatch(device, claim)
        if mismatch is not None:
            return Answer(error=mismatch[0], followup=partial(self._record_mismatch, device, claim, mismatch[1]))
        status = DeviceStatus(device.status)
        if status is not DeviceStatus.APPROVED:
            return Answer(error=NotApproved(status), followup=self._touch(device, claim), device_id=device.id)
        unproven = self._unproven_identity(device, claim)
        if unproven is not None:
            return Answer(error=unproven[0], followup=partial(self._record_mismatch, device, claim, unproven[1]))
        if self.require_lease_ip and device.lease_ip != claim.source_ip:
            # A spoofed MAC on another port has no lease for it: the lease IP is a second identity factor.
            return Answer(
                error=IdentityMismatch(
                    "Config requests for this MAC must come from its DHCP lease address "
                    f"({device.lease_ip or 'none known'})"
                ),
                device_id=device.id,
            )
        if self.access_check is not None:
            try:
                self.access_check(device.id, claim.authorization)
            except PermissionDenied as exc:
                return Answer(error=exc, device_id=device.id)
        body = self.render(device, device.config_revision)
        return Answer(body=body, followup=partial(self._record_download, device, claim, len(body)))

    def render(self, device: RenderableDevice, config_revision: int | None = None) -> bytes:
        return self.renderer.render(device, self.renderer.source.snapshot(config_revision))

    # -- internals -------------------------------------------------------------------------------------

    def _find(self, claim: Claim) -> BootDevice | None:
        with self.db.read_engine.connect() as conn:
            if claim.mac:
                row = conn.execute(_BY_MAC, {"mac": claim.mac}).first()
                if row is not None or claim.identifying_uuid is None:
                    return row
            # Known only by UUID (pre-registered that way, or Talos's legacy ?uuid= form).
            return conn.execute(_BY_UUID, {"uuid": claim.identifying_uuid}).first()

    @staticmethod
    def _first_contact(claim: Claim, new_per_minute: int, s: Session) -> None:
        now = utcnow()
        check_new_device_budget(s, claim.mac, claim.source_ip, new_per_minute)
        new_id = insert_ignoring_conflict(
            s,
            {
                "mac_address": claim.mac,
                "uuid": claim.identifying_uuid,
                "serial": claim.serial,
                "status": "pending",
                "role": "worker",
                "notes": "",
                "source": Source.CONFIG_FETCH.value,
                "facts": {"reported_hostname": claim.hostname} if claim.hostname else {},
                "first_seen": now,
                "last_seen": now,
                "last_ip": claim.source_ip,
                "revision": 1,
            },
        )
        if new_id is not None:  # else a concurrent first contact made the row and audited it
            audit.record(
                s,
                Actor.device(claim.source_ip),
                "register",
                s.get(Device, new_id),
                {"source": Source.CONFIG_FETCH.value},
            )

    @staticmethod
    def _identity_mismatch(device: BootDevice, claim: Claim) -> tuple[IdentityMismatch, dict[str, Any]] | None:
        mismatch = {}
        if device.uuid and claim.identifying_uuid and device.uuid != claim.identifying_uuid:
            mismatch["uuid"] = {"bound": device.uuid, "claimed": claim.identifying_uuid}
        if device.serial and claim.serial and device.serial != claim.serial:
            mismatch["serial"] = {"bound": device.serial, "claimed": claim.serial}
        if not mismatch:
            return None
        error = IdentityMismatch(
            f"Device identity mismatch: this MAC is bound to another {' and '.join(mismatch)}. "
            "An operator must check the machine and clear the binding."
        )
        return error, mismatch

    @staticmethod
    def _unproven_identity(device: BootDevice, claim: Claim) -> tuple[IdentityMismatch, dict[str, Any]] | None:
        """A bound machine gets its config only by repeating what it is bound to: leaving the UUID out of the
        request must not be a way around the binding (anyone can name a MAC seen on the wire)."""
        if device.uuid and not claim.identifying_uuid:
            factor, bound = "uuid", device.uuid
        elif not device.uuid and device.serial and not claim.serial:
            factor, bound = "serial", device.serial
        else:
            return None
        error = IdentityMismatch(
            f"Device identity not proven: this MAC is bound to {factor} {bound} and the request did not say its "
            f"{factor}. Put {factor}=${{{factor}}} in the talos.config URL, or have an operator clear the binding."
        )
        return error, {factor: {"bound": bound, "claimed": None}}

    @staticmethod
    def _record_mismatch(device: BootDevice, claim: Claim, mismatch: dict[str, Any], s: Session) -> None:
        audit.record(s, Actor.device(claim.source_ip), "identity_mismatch", device, {**mismatch, "mac": claim.mac})

    @classmethod
    def _record_download(cls, device: BootDevice, claim: Claim, size: int, s: Session) -> None:
        now = utcnow()
        s.execute(
            update(Device)
            .where(Device.id == device.id)
            .values(
                last_config_download=now,
                last_seen=now,
                last_ip=claim.source_ip,
                # Delivered means installed: if the machine netboots again, iPXE sends it to its disk.
                installed_at=now,
                **cls._binding(device, claim),
            )
        )
        audit.record(
            s,
            Actor.device(claim.source_ip),
            "config_download",
            device,
            {"role": device.role, "revision": device.revision, "bytes": size},
        )

    @staticmethod
    def _binding(device: BootDevice, claim: Claim) -> dict[str, Any]:
        """Identity factors to remember on first report: later requests must repeat them."""
        values: dict[str, Any] = {}
        if device.mac_address is None and claim.mac:
            values["mac_address"] = claim.mac
        if not device.uuid and claim.identifying_uuid and device.mac_address:
            values["uuid"] = claim.identifying_uuid
        if not device.serial and claim.serial:
            values["serial"] = claim.serial
        return values

    def _touch(self, device: BootDevice, claim: Claim) -> Callable[[Session], None] | None:
        """The write a polling device owes, if any: a boot storm of pending machines must not be a storm of writes."""
        values = self._binding(device, claim)
        now = utcnow()
        stale = device.last_seen is None or (now - device.last_seen).total_seconds() >= self.last_seen_interval
        if stale or device.last_ip != claim.source_ip:
            values.update(last_seen=now, last_ip=claim.source_ip)
        if claim.hostname and device.facts.get("reported_hostname") != claim.hostname:
            values["facts"] = {**device.facts, "reported_hostname": claim.hostname}
        if not values:
            return None
        return partial(self._update, device.id, values)

    @staticmethod
    def _update(device_id: int, values: dict[str, Any], s: Session) -> None:
        s.execute(update(Device).where(Device.id == device_id).values(**values))
