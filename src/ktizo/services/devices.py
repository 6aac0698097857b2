"""Device registry use cases: list, pre-register, edit, approve, reject, delete, unbind, and first contact."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import String, cast, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ktizo.db import Database
from ktizo.db.models import Device
from ktizo.db.types import utcnow
from ktizo.domain.bounds import is_possible_id, parse_id
from ktizo.domain.devices import DeviceStatus, Role, Source, check_transition
from ktizo.domain.errors import Conflict, NotFound, TooManyAttempts, ValidationFailed
from ktizo.domain.identity import normalize_interface_address, normalize_ip, normalize_mac
from ktizo.domain.users import UserRole
from ktizo.services import audit
from ktizo.services.context import Actor
from ktizo.services.groups import check_patch_on_bases, normalize_labels
from ktizo.services.render import ConfigSource
from ktizo.services.watch import ApprovalWatcher
from ktizo.talos import load_patch

UNSET: Any = object()


@dataclass
class DeviceChanges:
    """Fields an operator may set. ``UNSET`` means "leave as is"; ``None`` clears an optional field.

    Values arrive already normalised (the API and CLI parse with the domain's normalisers)."""

    mac_address: Any = UNSET
    hostname: Any = UNSET
    ip_address: Any = UNSET
    role: Any = UNSET
    notes: Any = UNSET
    uuid: Any = UNSET
    serial: Any = UNSET
    labels: Any = UNSET
    patch: Any = UNSET
    install_disk: Any = UNSET
    extra_nics: Any = UNSET

    def items(self) -> list[tuple[str, Any]]:
        return [(k, v) for k, v in vars(self).items() if v is not UNSET]


@dataclass(frozen=True)
class DeviceQuery:
    status: DeviceStatus | None = None
    search: str | None = None
    limit: int = 1000
    offset: int = 0
    order: str = "id"
    descending: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


_ORDERABLE = {
    "id": Device.id,
    "mac_address": Device.mac_address,
    "hostname": Device.hostname,
    "ip_address": Device.ip_address,
    "status": Device.status,
    "first_seen": Device.first_seen,
    "last_seen": Device.last_seen,
}


NEW_DEVICE_WINDOW = dt.timedelta(minutes=1)


def check_new_device_budget(session: Session, mac: str | None, source_ip: str | None, per_minute: int) -> None:
    """Refuse (429) one more unknown machine from an address that registered ``per_minute`` already; a machine
    already known by ``mac`` is never refused.

    The unauthenticated doors create rows: without a budget one host could fill the pending list (and the
    database) with invented MACs. Real machines each have their own address, and Talos retries a refusal, so a
    rack behind one NAT still gets in, a minute's worth at a time. Counted in the database, so every replica
    shares the budget."""
    if not per_minute or not source_ip:
        return
    if mac is not None and session.scalar(select(Device.id).where(Device.mac_address == mac)) is not None:
        return
    since = utcnow() - NEW_DEVICE_WINDOW
    count, oldest = session.execute(
        select(func.count(), func.min(Device.first_seen)).where(Device.first_seen >= since, Device.last_ip == source_ip)
    ).one()
    if count >= per_minute:
        wait = TooManyAttempts.seconds_until(oldest + NEW_DEVICE_WINDOW, utcnow())
        raise TooManyAttempts(
            f"too many new machines from {source_ip} in the last minute ({count}); this one is registered when it "
            f"asks again in {wait} s",
            wait,
        )


def insert_ignoring_conflict(session: Session, values: dict[str, Any]) -> int | None:
    """INSERT … ON CONFLICT DO NOTHING: concurrent first contacts of one machine make exactly one row.

    Returns the new id, or None when another transaction already made the row."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(Device).values(**values).on_conflict_do_nothing().returning(Device.id)
    return session.execute(stmt).scalar()


class DeviceService:
    def __init__(
        self,
        db: Database,
        source: ConfigSource | None = None,
        watcher: ApprovalWatcher | None = None,
        *,
        new_per_minute: int = 0,
    ) -> None:
        self.new_per_minute = new_per_minute  # see check_new_device_budget
        self.db = db
        self.source = source
        self.watcher = watcher

    def _check_config_fields(self, device: Device | None, values: dict[str, Any]) -> None:
        """Normalise labels and extra NICs; refuse a device patch that would break the device's config."""
        if "labels" in values:
            values["labels"] = normalize_labels(values["labels"] or {})
        if "extra_nics" in values:
            primary = values.get("mac_address", device.mac_address if device else None)
            values["extra_nics"] = normalize_nics(values["extra_nics"] or [], primary)
        if "install_disk" in values and values["install_disk"] is not None:
            disk = str(values["install_disk"]).strip()
            if not re.fullmatch(r"/dev/[A-Za-z0-9._/-]{1,100}", disk) or ".." in disk:
                raise ValidationFailed("install_disk must be a device path such as /dev/nvme0n1", "install_disk")
            values["install_disk"] = disk
        if values.get("patch"):
            patch = load_patch(values["patch"])
            if self.source is not None:
                snap = self.source.snapshot()
                role = Role(values.get("role") or (device.role if device else "worker"))
                labels = values.get("labels", device.labels if device else {}) or {}
                probe = _Probe(device.id if device else -1, labels)
                groups = snap.groups_for(probe)  # type: ignore[arg-type]
                patches = [g.patch for g in groups if g.patch is not None] + [patch]
                check_patch_on_bases(self.source, snap, [role], patches)
        elif "patch" in values:
            values["patch"] = None

    # -- reading ---------------------------------------------------------------------------------------

    def list(self, q: DeviceQuery) -> tuple[list[Device], int]:
        stmt = select(Device)
        if q.status is not None:
            stmt = stmt.where(Device.status == q.status.value)
        if q.search:
            term = f"%{q.search.strip().lower()}%"
            stmt = stmt.where(
                or_(
                    Device.mac_address.like(term),
                    func.lower(Device.hostname).like(term),
                    Device.ip_address.like(term),
                    func.lower(Device.serial).like(term),
                    Device.uuid.like(term),
                    cast(Device.last_ip, String).like(term),
                )
            )
        column = _ORDERABLE.get(q.order, Device.id)
        order = column.desc() if q.descending else column.asc()
        with self.db.read() as s:
            if q.search:
                # A search scans every row anyway: count the matches in the same scan (the window count is
                # computed before LIMIT cuts the page) instead of scanning twice.
                paged = stmt.add_columns(func.count().over().label("total"))
                result = s.execute(paged.order_by(order, Device.id).limit(q.limit).offset(q.offset)).all()
                if result:
                    return [row[0] for row in result], int(result[0][1])
                if q.offset == 0:
                    return [], 0  # nothing matched at all
            # Without a search, an index answers the count and a top-N the page: two cheap queries beat one
            # window over every row of the tab.
            total = s.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0
            rows = s.scalars(stmt.order_by(order, Device.id).limit(q.limit).offset(q.offset)).all()
        return list(rows), total

    def counts(self) -> dict[str, int]:
        with self.db.read() as s:
            rows = s.execute(select(Device.status, func.count()).group_by(Device.status)).all()
        counts = {st.value: 0 for st in DeviceStatus}
        counts.update({str(status): int(n) for status, n in rows})
        return counts

    def get(self, device_id: int) -> Device:
        with self.db.read() as s:
            return self._get(s, device_id)

    def resolve(self, ref: str) -> Device:
        """Find a device by id or by MAC in any spelling (what the CLI accepts)."""
        ref = ref.strip()
        if ref.isascii() and ref.isdigit() and len(ref) != 12:  # twelve digits is a bare MAC like 525400000001
            device_id = parse_id(ref)
            if device_id is None:
                raise NotFound(f"no device with id {ref}")
            return self.get(device_id)
        mac = normalize_mac(ref, "device")
        with self.db.read() as s:
            device = s.scalar(select(Device).where(Device.mac_address == mac))
        if device is None:
            raise NotFound(f"no device with MAC {mac}")
        return device

    @staticmethod
    def _get(s: Session, device_id: int, *, lock: bool = False) -> Device:
        device = None
        if is_possible_id(device_id):  # any other number is no row, and as a parameter it is a driver error
            stmt = select(Device).where(Device.id == device_id)
            if lock:
                stmt = stmt.with_for_update()
            device = s.scalar(stmt)
        if device is None:
            raise NotFound(f"no device with id {device_id}")
        return device

    # -- operator changes ------------------------------------------------------------------------------

    def create(self, actor: Actor, changes: DeviceChanges) -> Device:
        """Pre-register a device before it boots; it waits as pending (or is approved later) like any other."""
        actor.require(UserRole.OPERATOR)
        values = dict(changes.items())
        if not values.get("mac_address") and not values.get("uuid"):
            raise ValidationFailed("a device needs a mac_address (or at least a uuid)", "mac_address")
        _check_static_ip(values.get("mac_address"), values.get("ip_address"))
        self._check_config_fields(None, values)
        with self.db.write() as s:
            self._ensure_mac_free(s, values.get("mac_address"))
            device = Device(source=Source.MANUAL.value, status=DeviceStatus.PENDING.value, facts={}, **values)
            s.add(device)
            s.flush()  # the audit row needs the id
            audit.record(s, actor, "create", device, _jsonable(values))
        return device

    def update(self, actor: Actor, device_id: int, changes: DeviceChanges) -> Device:
        actor.require(UserRole.OPERATOR)
        with self.db.write() as s:
            device = self._get(s, device_id, lock=True)
            before = {k: getattr(device, k) for k, _ in changes.items()}
            values = dict(changes.items())
            self._check_config_fields(device, values)
            if "mac_address" in values and values["mac_address"] != device.mac_address:
                self._ensure_mac_free(s, values["mac_address"])
            _check_static_ip(values.get("mac_address", device.mac_address), values.get("ip_address", device.ip_address))
            changed = {k: v for k, v in values.items() if before[k] != v}
            if not changed:
                return device
            if device.status == DeviceStatus.APPROVED.value and ("hostname" in changed or "ip_address" in changed):
                _ensure_name_and_address_free(s, device.id, values.get("hostname"), values.get("ip_address"))
            for key, value in changed.items():
                setattr(device, key, value)
            device.revision += 1
            audit.record(
                s,
                actor,
                "update",
                device,
                {k: {"from": before[k], "to": v} for k, v in _jsonable(changed).items()},
            )
        return device

    def approve(self, actor: Actor, device_id: int, changes: DeviceChanges) -> Device:
        actor.require(UserRole.OPERATOR)
        with self.db.write() as s:
            device = self.approve_in(s, actor, self._get(s, device_id, lock=True), changes)
        self.notify(device.id)
        return device

    def notify(self, device_id: int) -> None:
        """After the approving transaction commits: a held config request for the device answers now."""
        if self.watcher is not None:
            self.watcher.notify(device_id)

    def approve_in(self, s: Session, actor: Actor, device: Device, changes: DeviceChanges) -> Device:
        """The approval itself, inside the caller's transaction (so a console-code approval is one step)."""
        check_transition(DeviceStatus(device.status), DeviceStatus.APPROVED)
        values = dict(changes.items())
        self._check_config_fields(device, values)
        if values.get("role") is None:
            values.pop("role", None)  # keep the device's role (worker unless pre-registered otherwise)
        if "mac_address" in values and values["mac_address"] != device.mac_address:
            self._ensure_mac_free(s, values["mac_address"])
        _check_static_ip(values.get("mac_address", device.mac_address), values.get("ip_address", device.ip_address))
        _ensure_name_and_address_free(
            s, device.id, values.get("hostname", device.hostname), values.get("ip_address", device.ip_address)
        )
        for key, value in values.items():
            setattr(device, key, value)
        previous = device.status
        device.status = DeviceStatus.APPROVED.value
        device.approved_at = utcnow()
        device.approved_by = actor.name
        device.revision += 1
        audit.record(
            s,
            actor,
            "approve",
            device,
            {
                "from": previous,
                "hostname": device.hostname,
                "ip_address": device.ip_address,
                "role": device.role,
                "notes": device.notes,
            },
        )
        return device

    def reject(self, actor: Actor, device_id: int, notes: str | None = None) -> Device:
        actor.require(UserRole.OPERATOR)
        with self.db.write() as s:
            device = self._get(s, device_id, lock=True)
            check_transition(DeviceStatus(device.status), DeviceStatus.REJECTED)
            previous = device.status
            device.status = DeviceStatus.REJECTED.value
            device.rejected_at = utcnow()
            device.rejected_by = actor.name
            if notes is not None:
                device.notes = notes
            device.revision += 1
            audit.record(s, actor, "reject", device, {"from": previous, "revoked": previous == "approved"})
        self.notify(device.id)
        return device

    def delete(self, actor: Actor, device_id: int) -> None:
        actor.require(UserRole.OPERATOR)
        with self.db.write() as s:
            device = self._get(s, device_id, lock=True)
            audit.record(
                s,
                actor,
                "delete",
                device,
                {"status": device.status, "hostname": device.hostname, "uuid": device.uuid},
            )
            s.delete(device)

    def set_installed(self, actor: Actor, device_id: int, installed: bool) -> Device:
        """Say whether Talos is installed: iPXE then boots the local disk, or netboots it again (reinstall)."""
        actor.require(UserRole.OPERATOR)
        with self.db.write() as s:
            device = self._get(s, device_id, lock=True)
            device.installed_at = utcnow() if installed else None
            audit.record(s, actor, "installed" if installed else "reinstall", device, {})
        return device

    def unbind(self, actor: Actor, device_id: int) -> Device:
        """Forget the UUID/serial a device reported, so a replaced mainboard with the same NIC can be let in."""
        actor.require(UserRole.OPERATOR)
        with self.db.write() as s:
            device = self._get(s, device_id, lock=True)
            old = {"uuid": device.uuid, "serial": device.serial}
            device.uuid = None
            device.serial = None
            device.revision += 1
            audit.record(s, actor, "unbind", device, old)
        return device

    # -- machines knocking -----------------------------------------------------------------------------

    def register(self, mac: str, source_ip: str | None, source: Source = Source.REGISTER) -> tuple[Device, bool]:
        """First contact by MAC: create a pending record unless one exists. Returns (device, created)."""
        now = utcnow()
        with self.db.write() as s:
            check_new_device_budget(s, mac, source_ip, self.new_per_minute)
            new_id = insert_ignoring_conflict(
                s,
                {
                    "mac_address": mac,
                    "status": "pending",
                    "role": "worker",
                    "notes": "",
                    "source": source.value,
                    "facts": {},
                    "first_seen": now,
                    "last_seen": now,
                    "last_ip": source_ip,
                    "revision": 1,
                },
            )
            device = s.scalar(select(Device).where(Device.mac_address == mac))
            assert device is not None
            if new_id is not None:
                audit.record(s, Actor.device(source_ip), "register", device, {"source": source.value})
            else:
                device.last_seen = now
                device.last_ip = source_ip
        return device, new_id is not None

    @staticmethod
    def _ensure_mac_free(s: Session, mac: str | None) -> None:
        if mac and s.scalar(select(Device.id).where(Device.mac_address == mac)) is not None:
            raise Conflict(f"a device with MAC {mac} already exists")


class _Probe:
    """Just enough of a device to ask which groups would apply to it."""

    def __init__(self, device_id: int, labels: dict[str, str]) -> None:
        self.id = device_id
        self.labels = labels


def normalize_nics(nics: list[Any], primary_mac: str | None) -> list[dict[str, Any]]:
    """Extra NICs: ``[{mac, addresses: [CIDR…], gateway?}]``, each selected by its MAC."""
    if not isinstance(nics, list) or len(nics) > 16:
        raise ValidationFailed("extra_nics is a list of at most 16 NICs", "extra_nics")
    out: list[dict[str, Any]] = []
    seen = {primary_mac} if primary_mac else set()
    for i, nic in enumerate(nics):
        where = f"extra_nics.{i}"
        if not isinstance(nic, dict) or set(nic) - {"mac", "addresses", "gateway"}:
            raise ValidationFailed("each NIC is {mac, addresses, gateway}", where)
        mac = normalize_mac(str(nic.get("mac", "")), f"{where}.mac")
        if mac in seen:
            raise ValidationFailed(f"{mac} is listed twice (or is the device's own MAC)", f"{where}.mac")
        seen.add(mac)
        addresses = [normalize_interface_address(str(a), f"{where}.addresses") for a in nic.get("addresses") or []]
        entry: dict[str, Any] = {"mac": mac, "addresses": addresses}
        if nic.get("gateway"):
            entry["gateway"] = normalize_ip(str(nic["gateway"]), f"{where}.gateway")
        out.append(entry)
    return out


def _check_static_ip(mac: str | None, ip: str | None) -> None:
    if ip and not mac:
        raise ValidationFailed(
            "a static IP needs the device's MAC address: Talos selects the NIC to configure by it",
            "ip_address",
        )


def _ensure_name_and_address_free(s: Session, device_id: int, hostname: str | None, ip: str | None) -> None:
    """Two approved machines with one static address, or one hostname, break each other (and etcd, for control
    planes). Only approved devices hold a name or an address: a rejected machine's old fields free them, so a
    failed machine can be replaced by rejecting it and approving the new one with the same hostname and IP."""
    others = select(Device).where(Device.id != device_id, Device.status == DeviceStatus.APPROVED.value).limit(1)
    if ip:
        host = ip.split("/")[0]
        clash = s.scalar(others.where(or_(Device.ip_address == host, Device.ip_address.like(f"{host}/%"))))
        if clash is not None:
            raise Conflict(
                f"{host} is already the static IP of approved device {_named(clash)}: "
                "pick another address, or change or revoke that device first",
                "ip_address",
            )
    if hostname:
        clash = s.scalar(others.where(func.lower(Device.hostname) == hostname.lower()))
        if clash is not None:
            raise Conflict(
                f"{hostname} is already the hostname of approved device {_named(clash)}: "
                "pick another name, or change or revoke that device first",
                "hostname",
            )


def _named(device: Device) -> str:
    return f"{device.id} ({device.mac_address or device.uuid})"


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.value if isinstance(v, Role | DeviceStatus) else v) for k, v in values.items()}
