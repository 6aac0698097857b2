"""Bulk approval: many pending devices at once, with names from a pattern and IPs from a range.

An operator rolling out a rack selects the machines that appeared, types ``worker-{n:02d}`` and
``10.0.5.100-10.0.5.150/24``, looks at the preview, and confirms. The preview and the approval compute the
assignment with the same function over the same rows; the approval does it again inside its one write
transaction and refuses if the result is no longer what the operator saw (``expected`` fingerprint)."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import String, cast, or_, select, text
from sqlalchemy.orm import Session

from ktizo.db import Database
from ktizo.db.models import ClusterSettings, Device
from ktizo.domain.devices import DeviceStatus, Role
from ktizo.domain.errors import Conflict, InvalidTransition, NotFound, ValidationFailed
from ktizo.domain.identity import normalize_hostname, normalize_ip
from ktizo.domain.users import UserRole
from ktizo.services.context import Actor
from ktizo.services.devices import DeviceChanges, DeviceService

MAX_DEVICES = 1000
# Two bulk approvals on two replicas must not hand out the same addresses: they take turns (PostgreSQL).
_ADVISORY_LOCK = 0x6B74697A6F01

_PATTERN = re.compile(r"(?P<prefix>[^{}]*)\{n(?::(?P<spec>0?[1-9]?d?))?\}(?P<suffix>[^{}]*)")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class BulkApproval:
    """What the operator asks for. ``ip_range`` is ``FIRST-LAST/PREFIX`` (``10.0.5.100-10.0.5.150/24``, or
    ``10.0.5.100-150/24``), or a network ``10.0.5.0/24`` (from ``ip_start`` or its first host), or an address in
    it ``10.0.5.100/24`` (from that address); empty means no static addresses (DHCP)."""

    device_ids: tuple[int, ...]
    hostname_pattern: str
    ip_range: str | None = None
    ip_start: str | None = None
    role: Role | None = None
    notes: str | None = None


@dataclass(frozen=True)
class Assignment:
    device_id: int
    mac_address: str | None
    hostname: str
    ip_address: str | None
    role: str | None  # None for agent hosts


@dataclass(frozen=True)
class BulkPlan:
    assignments: tuple[Assignment, ...]
    notes: str | None
    first_number: int
    skipped_addresses: int  # addresses in the range passed over because something already has them

    @property
    def fingerprint(self) -> str:
        """Stable digest of the whole assignment: what the operator confirmed, to compare at apply time."""
        payload = json.dumps(
            [[a.device_id, a.hostname, a.ip_address, a.role] for a in self.assignments] + [self.notes],
            separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class HostnamePattern:
    prefix: str
    spec: str
    suffix: str

    @classmethod
    def parse(cls, text: str) -> HostnamePattern:
        raw = (text or "").strip().lower()
        match = _PATTERN.fullmatch(raw)
        if match is None:
            raise ValidationFailed(
                "a hostname pattern holds one {n} placeholder, e.g. worker-{n:02d} (02d: two digits, zero-padded)",
                "hostname_pattern",
            )
        spec = match.group("spec") or "d"
        if not spec.endswith("d"):
            spec += "d"
        pattern = cls(match.group("prefix"), spec, match.group("suffix"))
        pattern.render(1)  # refuse a pattern that cannot make a valid hostname at all
        return pattern

    def render(self, n: int) -> str:
        name = f"{self.prefix}{format(n, self.spec)}{self.suffix}"
        try:
            return normalize_hostname(name, "hostname_pattern")
        except ValidationFailed as exc:
            raise ValidationFailed(f"the pattern makes {name!r}, which is not a hostname", exc.field) from None

    def number_of(self, hostname: str | None) -> int | None:
        if not hostname:
            return None
        match = re.fullmatch(re.escape(self.prefix) + r"(\d{1,9})" + re.escape(self.suffix), hostname)
        return int(match.group(1)) if match else None


@dataclass(frozen=True)
class AddressRange:
    first: IPAddress
    last: IPAddress
    network: IPNetwork

    @classmethod
    def parse(cls, text: str, start: str | None = None) -> AddressRange:
        field = "ip_range"
        raw = text.strip()
        if "/" not in raw:
            raise ValidationFailed(
                "give the range with its prefix length, e.g. 10.0.5.100-10.0.5.150/24 or 10.0.5.0/24", field
            )
        body, _, prefix = raw.rpartition("/")
        if not prefix.isdecimal():
            raise ValidationFailed(f"/{prefix[:10]} is not a prefix length", field)
        try:
            if "-" in body:
                first_text, _, last_text = (p.strip() for p in body.partition("-"))
                first = ipaddress.ip_address(first_text)
                if isinstance(first, ipaddress.IPv4Address) and last_text.isdecimal():
                    last_text = first_text.rsplit(".", 1)[0] + "." + last_text  # 10.0.5.100-150
                last = ipaddress.ip_address(last_text)
                network = ipaddress.ip_network(f"{first}/{prefix}", strict=False)
            else:
                iface = ipaddress.ip_interface(f"{body}/{prefix}")
                network = iface.network
                first = iface.ip
                if first == network.network_address:
                    first = _first_host(network)
                last = _last_host(network)
        except ValueError:
            raise ValidationFailed(
                f"{raw[:60]!r} is not an address range such as 10.0.5.100-10.0.5.150/24", field
            ) from None
        if start:
            try:
                first = ipaddress.ip_address(start.strip())
            except ValueError:
                raise ValidationFailed(f"{start[:60]!r} is not an IP address", "ip_start") from None
            if first not in network:
                raise ValidationFailed(f"{first} is not in {network}", "ip_start")
        if network.prefixlen == 0 or (network.num_addresses < 2 and network.version == 4 and network.prefixlen < 32):
            raise ValidationFailed(f"{network} is not a network machines can live in", field)
        if last not in network:
            raise ValidationFailed(f"{last} is not in {network} (the range must stay in one network)", field)
        if int(last) < int(first):
            raise ValidationFailed(f"the range ends ({last}) before it starts ({first})", field)
        return cls(first, last, network)

    def __iter__(self) -> Iterator[IPAddress]:
        special = set()
        if self.network.num_addresses > 2:
            special = {self.network.network_address, getattr(self.network, "broadcast_address", None)}
        for value in range(int(self.first), int(self.last) + 1):
            address = ipaddress.ip_address(value)
            if address not in special:
                yield address

    def __str__(self) -> str:
        return f"{self.first}-{self.last}/{self.network.prefixlen}"


def _first_host(network: IPNetwork) -> IPAddress:
    return network.network_address + (1 if network.num_addresses > 2 else 0)


def _last_host(network: IPNetwork) -> IPAddress:
    return network.broadcast_address - (1 if network.num_addresses > 2 else 0)


class BulkService:
    def __init__(self, db: Database, devices: DeviceService) -> None:
        self.db = db
        self.devices = devices

    # -- the plan --------------------------------------------------------------------------------------

    def preview(self, actor: Actor, request: BulkApproval) -> BulkPlan:
        """The assignment ``approve`` would make now; changes nothing."""
        actor.require(UserRole.OPERATOR)
        _check_request(request)
        with self.db.read() as s:
            return self._plan(s, request)[0]

    def approve(self, actor: Actor, request: BulkApproval, *, expected: str | None = None) -> BulkPlan:
        """Approve every device of the request in one transaction, one audit event each.

        With ``expected`` (a preview's fingerprint) the approval is refused when the assignment would differ
        from that preview, e.g. because another operator took one of the addresses in between."""
        actor.require(UserRole.OPERATOR)
        _check_request(request)
        with self.db.write() as s:
            if s.get_bind().dialect.name == "postgresql":
                s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK})
            plan, rows = self._plan(s, request, lock=True)
            if expected is not None and plan.fingerprint != expected:
                raise Conflict("the assignment changed since the preview (another change landed); preview again")
            devices = {d.id: d for d in rows}
            for a in plan.assignments:
                changes = DeviceChanges(hostname=a.hostname, ip_address=a.ip_address, role=a.role)
                if request.notes is not None:
                    changes.notes = request.notes
                self.devices.approve_in(
                    s, actor, devices[a.device_id], changes, details={"bulk": len(plan.assignments)}
                )
        return plan

    def reject(self, actor: Actor, device_ids: Sequence[int], notes: str | None = None) -> list[int]:
        """Reject every listed pending device in one transaction, one audit event each."""
        actor.require(UserRole.OPERATOR)
        _check_ids(device_ids)
        with self.db.write() as s:
            devices = self._devices(s, device_ids, lock=True)
            for device in devices:
                _require_pending(device)
            for device in devices:
                self.devices.reject_in(s, actor, device, notes, details={"bulk": len(devices)})
        return [d.id for d in devices]

    # -- helpers ---------------------------------------------------------------------------------------

    @staticmethod
    def _devices(s: Session, ids: Sequence[int], *, lock: bool = False) -> list[Device]:
        # First seen first: the order machines were powered on is the order an operator racked them in.
        stmt = select(Device).where(Device.id.in_(set(ids))).order_by(Device.first_seen, Device.id)
        if lock:
            stmt = stmt.with_for_update()
        devices = list(s.scalars(stmt))
        missing = set(ids) - {d.id for d in devices}
        if missing:
            raise NotFound(f"no device with id {min(missing)}")
        return devices

    def _plan(self, s: Session, request: BulkApproval, *, lock: bool = False) -> tuple[BulkPlan, list[Device]]:
        pattern = HostnamePattern.parse(request.hostname_pattern)
        addresses = AddressRange.parse(request.ip_range, request.ip_start) if request.ip_range else None
        devices = self._devices(s, request.device_ids, lock=lock)
        for device in devices:
            _require_pending(device)
            if addresses is not None and not device.mac_address:
                raise ValidationFailed(
                    f"device {device.id} has no MAC address: a static IP needs one (Talos selects the NIC by it)",
                    "ip_range",
                )

        selected = {d.id for d in devices}
        first_number = highest_number(s, pattern, selected) + 1
        hostnames = [pattern.render(first_number + i) for i in range(len(devices))]

        ips: list[str | None] = [None] * len(devices)
        skipped = 0
        if addresses is not None:
            taken = taken_addresses(s, selected)
            picked: list[str] = []
            for address in addresses:
                if len(picked) == len(devices):
                    break
                if address in taken:
                    skipped += 1
                    continue
                picked.append(f"{address}/{addresses.network.prefixlen}")
            if len(picked) < len(devices):
                raise ValidationFailed(
                    f"the range {addresses} has {len(picked)} free address(es) for {len(devices)} devices "
                    f"({skipped} already in use); widen the range",
                    "ip_range",
                )
            ips = list(picked)

        role = request.role.value if request.role is not None else None
        assignments = tuple(
            Assignment(d.id, d.mac_address, hostnames[i], ips[i], role or d.role) for i, d in enumerate(devices)
        )
        return BulkPlan(assignments, request.notes, first_number, skipped), devices


def highest_number(s: Session, pattern: HostnamePattern, exclude: set[int]) -> int:
    """The highest number a hostname of ``pattern`` already has (0 if none). Every hostname of the pattern counts,
    whatever its device's state: numbers are never handed out twice."""
    highest = 0
    prefix_like = pattern.prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    for (hostname,) in s.execute(
        select(Device.hostname).where(Device.hostname.like(prefix_like, escape="\\"), Device.id.not_in(exclude))
    ):
        number = pattern.number_of(hostname)
        if number is not None:
            highest = max(highest, number)
    return highest


def taken_addresses(s: Session, selected: set[int]) -> set[IPAddress]:
    """Addresses something already has: other devices' static IPs and extra NICs, the cluster's gateway,
    and the control plane endpoint when it is an address (often a VIP no device row holds)."""
    taken: set[IPAddress] = set()

    def add(value: Any) -> None:
        with contextlib.suppress(ValueError):  # a malformed stored value cannot collide with a valid one
            taken.add(ipaddress.ip_interface(str(value).strip()).ip)

    has_address = or_(Device.ip_address.is_not(None), cast(Device.extra_nics, String) != "[]")
    for ip, nics in s.execute(
        select(Device.ip_address, Device.extra_nics).where(Device.id.not_in(selected), has_address)
    ):
        if ip:
            add(ip)
        for nic in nics or []:
            for a in nic.get("addresses") or []:
                add(a)
    cluster = s.get(ClusterSettings, 1)
    if cluster is not None:
        if cluster.gateway:
            add(cluster.gateway)
        if cluster.endpoint:
            host = re.sub(r"^[a-z]+://", "", cluster.endpoint).rsplit(":", 1)[0].strip("[]")
            add(host)
    return taken


def _require_pending(device: Device) -> None:
    if device.status != DeviceStatus.PENDING.value:
        raise InvalidTransition(
            f"device {device.id} ({device.mac_address or device.uuid}) is {device.status}: bulk actions take "
            "pending devices only"
        )


def _check_ids(ids: Sequence[int]) -> None:
    if not ids:
        raise ValidationFailed("select at least one device", "devices")
    if len(set(ids)) > MAX_DEVICES:
        raise ValidationFailed(f"at most {MAX_DEVICES} devices at once", "devices")


def _check_request(request: BulkApproval) -> None:
    _check_ids(request.device_ids)
    if request.notes is not None and len(request.notes) > 4096:
        raise ValidationFailed("notes are at most 4096 characters", "notes")
    if request.ip_start and not request.ip_range:
        raise ValidationFailed("a start address needs a range or network", "ip_range")
    if request.ip_start:
        normalize_ip(request.ip_start, "ip_start")
