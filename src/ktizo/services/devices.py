"""The machine registry for operators: list, pre-register, edit, approve, reject, delete, unbind.

Every value stored is validated here, whoever calls (API, UI, CLI, a rule): the adapters only parse. Approval and
rejection are one transition each (``approve_in``/``reject_in``), used by a single approval, bulk approval and
console-code approval alike; ``on_approve`` is where more happens on approval (agents get their certificate)."""

from __future__ import annotations

import builtins
import re
from collections.abc import Callable
from typing import Any

from sqlalchemy import String, cast, func, or_, select
from sqlalchemy.orm import Session

from ktizo.db import Database
from ktizo.db.engine import after_commit
from ktizo.db.models import Device
from ktizo.db.types import utcnow
from ktizo.domain.bounds import is_possible_id, parse_id
from ktizo.domain.devices import DeviceStatus, MachineKind, Role, Source, check_transition
from ktizo.domain.errors import Conflict, NotFound, PermissionDenied, ValidationFailed
from ktizo.domain.identity import (
    normalize_hostname,
    normalize_interface_address,
    normalize_ip,
    normalize_mac,
    normalize_serial,
    normalize_uuid,
)
from ktizo.domain.users import UserRole
from ktizo.services import audit
from ktizo.services.context import Actor
from ktizo.services.first_contact import FirstContact, Knock
from ktizo.services.groups import check_patch_on_bases, normalize_labels

# Re-exported: the values this service's use cases take (they live apart so that the CLI starts fast).
from ktizo.services.queries import UNSET as UNSET
from ktizo.services.queries import DeviceChanges as DeviceChanges
from ktizo.services.queries import DeviceQuery as DeviceQuery
from ktizo.services.render import ConfigSource, gateway_warning
from ktizo.services.watch import ApprovalWatcher
from ktizo.talos import load_patch

MAX_NOTES = 4096


_ORDERABLE = {
    "id": Device.id,
    "mac_address": Device.mac_address,
    "hostname": Device.hostname,
    "ip_address": Device.ip_address,
    "status": Device.status,
    "first_seen": Device.first_seen,
    "last_seen": Device.last_seen,
}
_OPTIONAL: dict[str, Callable[[str, str], str]] = {
    "mac_address": normalize_mac,
    "hostname": normalize_hostname,
    "ip_address": normalize_interface_address,
    "uuid": normalize_uuid,
    "serial": normalize_serial,
}
# Hooks run inside the approving transaction, after the machine's fields are set (agents: issue the certificate).
ApprovalHook = Callable[[Session, Actor, Device], None]


def validate_changes(values: dict[str, Any]) -> dict[str, Any]:
    """The fields of a change, each checked and normalised; raises ``ValidationFailed`` naming the field."""
    out = dict(values)
    for name, normalize in _OPTIONAL.items():
        if name in out and out[name] is not None:
            if not isinstance(out[name], str):
                raise ValidationFailed("must be a string", name)
            out[name] = normalize(out[name], name)
    if "role" in out and out["role"] is not None:
        try:
            out["role"] = Role(str(out["role"]).strip().lower()).value
        except ValueError:
            raise ValidationFailed("role is controlplane or worker", "role") from None
    if "notes" in out:
        notes = out["notes"] if out["notes"] is not None else ""
        if not isinstance(notes, str) or len(notes) > MAX_NOTES:
            raise ValidationFailed(f"notes are text of at most {MAX_NOTES} characters", "notes")
        out["notes"] = notes
    if "labels" in out:
        out["labels"] = normalize_labels(out["labels"] or {})
    if "install_disk" in out and out["install_disk"] is not None:
        disk = str(out["install_disk"]).strip()
        if not re.fullmatch(r"/dev/[A-Za-z0-9._/-]{1,100}", disk) or ".." in disk:
            raise ValidationFailed("install_disk must be a device path such as /dev/nvme0n1", "install_disk")
        out["install_disk"] = disk
    if "patch" in out:
        if out["patch"] is not None and not isinstance(out["patch"], str):
            raise ValidationFailed("patch is YAML text", "patch")
        out["patch"] = out["patch"] or None
    return out


class DeviceService:
    def __init__(
        self,
        db: Database,
        source: ConfigSource | None = None,
        watcher: ApprovalWatcher | None = None,
        *,
        first_contact: FirstContact | None = None,
    ) -> None:
        self.db = db
        self.source = source
        self.watcher = watcher
        self.first_contact = first_contact or FirstContact()
        self.on_approve: list[ApprovalHook] = []
        self.on_reject: list[ApprovalHook] = []  # agents: their certificates are revoked
        self.on_delete: list[ApprovalHook] = []  # agents: enrollment gone, certificates revoked (purge)

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
                    Device.machine_id.like(term),
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

    def warnings(self, device: Device) -> builtins.list[str]:
        """What stands in the way of the machine working as approved, though the approval itself went through."""
        if self.source is None or device.kind != MachineKind.TALOS.value:
            return []
        snap = self.source.snapshot()
        warning = gateway_warning(device.ip_address, snap, snap.groups_for(device))
        return [warning] if warning else []

    # -- operator changes ------------------------------------------------------------------------------

    def create(self, actor: Actor, changes: DeviceChanges) -> Device:
        """Pre-register a device before it boots; it waits as pending (or is approved later) like any other."""
        actor.require(UserRole.OPERATOR)
        values = validate_changes(dict(changes.items()))
        values.setdefault("role", Role.WORKER.value)
        values["role"] = values["role"] or Role.WORKER.value
        _guard_controlplane(actor, None, values["role"], "pre-register")
        if not values.get("mac_address") and not values.get("uuid"):
            raise ValidationFailed("a device needs a mac_address (or at least a uuid)", "mac_address")
        _check_static_ip(values.get("mac_address"), values.get("ip_address"))
        self._check_config_fields(None, values)
        with self.db.write() as s:
            self._ensure_mac_free(s, values.get("mac_address"))
            device = Device(
                kind=MachineKind.TALOS.value,
                source=Source.MANUAL.value,
                status=DeviceStatus.PENDING.value,
                facts={},
                **values,
            )
            s.add(device)
            s.flush()  # the audit row needs the id
            audit.record(s, actor, "create", device, _audited(values))
        return device

    def update(
        self, actor: Actor, device_id: int, changes: DeviceChanges, *, expected_revision: int | None = None
    ) -> Device:
        """Change a device's fields. With ``expected_revision`` (what the editor saw) a change made meanwhile by
        someone else is refused (409) instead of silently overwritten."""
        actor.require(UserRole.OPERATOR)
        values = validate_changes(dict(changes.items()))
        with self.db.write() as s:
            device = self._get(s, device_id, lock=True)
            if expected_revision is not None and device.revision != expected_revision:
                raise Conflict(
                    f"device {device.id} was changed by someone else since you opened it (revision "
                    f"{expected_revision}, now {device.revision}); reload it and make your change again",
                    "revision",
                )
            if values.get("role") is None:
                values.pop("role", None)  # a device always has a role; null leaves it as it is
            before = {k: getattr(device, k) for k in values}
            self._check_config_fields(device, values)
            changed = {k: v for k, v in values.items() if before[k] != v}
            if not changed:
                return device
            _guard_controlplane(actor, device.role, changed.get("role", device.role), "change")
            if "mac_address" in changed:
                self._ensure_mac_free(s, changed["mac_address"])
            _check_static_ip(values.get("mac_address", device.mac_address), values.get("ip_address", device.ip_address))
            if device.status == DeviceStatus.APPROVED.value and ("hostname" in changed or "ip_address" in changed):
                _ensure_name_and_address_free(s, device.id, values.get("hostname"), values.get("ip_address"))
            for key, value in changed.items():
                setattr(device, key, value)
            device.revision += 1
            self._flush(s)
            audit.record(s, actor, "update", device, _changes_audited(before, changed))
        return device

    def approve(self, actor: Actor, device_id: int, changes: DeviceChanges) -> Device:
        actor.require(UserRole.OPERATOR)
        with self.db.write() as s:
            return self.approve_in(s, actor, self._get(s, device_id, lock=True), changes)

    def approve_in(
        self, s: Session, actor: Actor, device: Device, changes: DeviceChanges, *, details: dict[str, Any] | None = None
    ) -> Device:
        """The approval transition, inside the caller's transaction: single, bulk and console-code approval all
        come through here. A held config request for the machine is answered once the transaction commits."""
        actor.require(UserRole.OPERATOR)
        check_transition(DeviceStatus(device.status), DeviceStatus.APPROVED)
        values = validate_changes(dict(changes.items()))
        if values.get("role") is None:
            values.pop("role", None)  # keep the device's role (worker unless pre-registered otherwise)
        if device.kind == MachineKind.AGENT.value:
            values.pop("role", None)
            if not values.get("hostname") and not device.hostname:
                reported = (device.facts or {}).get("hostname")
                values["hostname"] = normalize_hostname(str(reported)) if reported else None
                if not values["hostname"]:
                    raise ValidationFailed("this agent reported no hostname: give one to approve it", "hostname")
        role = values.get("role", device.role)
        _guard_controlplane(actor, device.role, role, "approve")
        self._check_config_fields(device, values)
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
        self._flush(s)
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
                **(details or {}),
            },
        )
        if device.role == Role.CONTROLPLANE.value:
            # A controlplane config carries the cluster's CA keys: approving one releases them to that machine.
            audit.record(s, actor, "secrets_release", device, {"reason": "controlplane approved"})
        for hook in self.on_approve:
            hook(s, actor, device)
        self.notify(device.id)
        return device

    def reject(self, actor: Actor, device_id: int, notes: str | None = None) -> Device:
        actor.require(UserRole.OPERATOR)
        with self.db.write() as s:
            return self.reject_in(s, actor, self._get(s, device_id, lock=True), notes)

    def reject_in(
        self, s: Session, actor: Actor, device: Device, notes: str | None, *, details: dict[str, Any] | None = None
    ) -> Device:
        """The rejection (or revocation) transition, inside the caller's transaction."""
        actor.require(UserRole.OPERATOR)
        check_transition(DeviceStatus(device.status), DeviceStatus.REJECTED)
        if notes is not None:
            device.notes = validate_changes({"notes": notes})["notes"]
        previous = device.status
        device.status = DeviceStatus.REJECTED.value
        device.rejected_at = utcnow()
        device.rejected_by = actor.name
        device.revision += 1
        audit.record(
            s, actor, "reject", device, {"from": previous, "revoked": previous == "approved", **(details or {})}
        )
        for hook in self.on_reject:
            hook(s, actor, device)
        self.notify(device.id)
        return device

    def notify(self, device_id: int) -> None:
        """Once the deciding transaction commits: a held config request for the device answers now."""
        watcher = self.watcher
        if watcher is not None:
            after_commit(lambda: watcher.notify(device_id))

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
            for hook in self.on_delete:
                hook(s, actor, device)
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
        """Forget the UUID/serial a device reported, so a replaced mainboard with the same NIC can be let in.

        On an approved control plane that hands its config (the cluster's CA keys) to the next machine naming its
        MAC, so it needs an admin."""
        actor.require(UserRole.OPERATOR)
        with self.db.write() as s:
            device = self._get(s, device_id, lock=True)
            if device.status == DeviceStatus.APPROVED.value:
                _guard_controlplane(actor, device.role, device.role, "unbind")
            old = {"uuid": device.uuid, "serial": device.serial}
            device.uuid = None
            device.serial = None
            device.revision += 1
            audit.record(s, actor, "unbind", device, old)
        return device

    # -- machines knocking -----------------------------------------------------------------------------

    def register(self, mac: str, source_ip: str | None, source: Source = Source.REGISTER) -> tuple[Device, bool]:
        """First contact by MAC: create a pending record unless one exists. Returns (device, created)."""
        with self.db.write() as s:
            arrival = self.first_contact.arrive(s, Knock(door=source, mac=normalize_mac(mac), source_ip=source_ip))
        return arrival.device, arrival.created

    # -- helpers ---------------------------------------------------------------------------------------

    def _check_config_fields(self, device: Device | None, values: dict[str, Any]) -> None:
        """Normalise extra NICs; refuse a device patch that would break the device's config."""
        if "extra_nics" in values:
            primary = values.get("mac_address", device.mac_address if device else None)
            values["extra_nics"] = normalize_nics(values["extra_nics"] or [], primary)
        if values.get("patch"):
            patch = load_patch(values["patch"])
            if self.source is not None:
                snap = self.source.snapshot()
                role = Role(values.get("role") or (device.role if device else None) or Role.WORKER.value)
                labels = values.get("labels", device.labels if device else {}) or {}
                probe = _Probe(device.id if device else -1, labels)
                groups = snap.groups_for(probe)  # type: ignore[arg-type]
                patches = [g.patch for g in groups if g.patch is not None] + [patch]
                check_patch_on_bases(self.source, snap, [role], patches)

    @staticmethod
    def _ensure_mac_free(s: Session, mac: str | None) -> None:
        if mac and s.scalar(select(Device.id).where(Device.mac_address == mac)) is not None:
            raise Conflict(f"a device with MAC {mac} already exists", "mac_address")

    @staticmethod
    def _flush(s: Session) -> None:
        """Flush now, inside the savepoint: a constraint the pre-checks missed (a concurrent approval on another
        replica) is then the same 409 as theirs, naming the field, rather than a failed commit later."""
        s.flush()


def _guard_controlplane(actor: Actor, before: str | None, after: str | None, what: str) -> None:
    """Operators approve and edit workers; a controlplane config carries the cluster's CA keys, so approving,
    creating, re-roling or editing a control plane (its patch included) is an admin's decision."""
    if Role.CONTROLPLANE.value in (before, after) and actor.role is not UserRole.ADMIN:
        raise PermissionDenied(
            f"to {what} a controlplane machine needs the admin role: its config carries the cluster's CA keys "
            "(operators approve and edit workers)"
        )


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
    failed machine can be replaced by rejecting it and approving the new one with the same hostname and IP.

    Both clashes are named at once. The partial unique indexes make the same rule hold when two approvals race."""
    others = select(Device).where(Device.id != device_id, Device.status == DeviceStatus.APPROVED.value).limit(1)
    clashes: dict[str, str] = {}
    if ip:
        host = ip.split("/")[0]
        clash = s.scalar(others.where(Device.static_ip == host))
        if clash is not None:
            clashes["ip_address"] = (
                f"{host} is already the static IP of approved device {_named(clash)}: "
                "pick another address, or change or revoke that device first"
            )
    if hostname:
        clash = s.scalar(others.where(Device.hostname == hostname.lower()))
        if clash is not None:
            clashes["hostname"] = (
                f"{hostname} is already the hostname of approved device {_named(clash)}: "
                "pick another name, or change or revoke that device first"
            )
    if clashes:
        raise Conflict("; ".join(clashes.values()), next(iter(clashes)), fields=clashes)


def _named(device: Device) -> str:
    return f"{device.id} ({device.mac_address or device.machine_id or device.uuid})"


def _audited(values: dict[str, Any]) -> dict[str, Any]:
    """A change as the audit log keeps it: a patch only as its size and digest."""
    out = {k: (v.value if isinstance(v, Role | DeviceStatus) else v) for k, v in values.items()}
    if "patch" in out:
        out["patch"] = audit.patch_summary(out["patch"])
    return out


def _changes_audited(before: dict[str, Any], changed: dict[str, Any]) -> dict[str, Any]:
    old, new = _audited({k: before[k] for k in changed}), _audited(changed)
    return {k: {"from": old[k], "to": new[k]} for k in changed}
