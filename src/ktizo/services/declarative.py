"""Declarative state, kubectl-style: ``ktizo apply`` and ``ktizo export`` over YAML documents ``ktizo.dev/v1``.

Kinds ``Site``, ``Group``, ``Rule``, ``Webhook`` and ``Device``. Every document has ``metadata.name`` and a ``spec``;
an export applies as unchanged. One apply is one transaction: every document is checked (errors name the file, the
document and the field) and applied, or nothing is. A dry run does the same work and rolls it back, so its diff is
exactly what the real run would do. ``--prune`` deletes objects of the applied kinds that an earlier apply managed and
the files no longer name (never a machine that only knocked: kubectl's last-applied rule).

Devices are applied in batches (one INSERT per 1,000 new machines, their audit rows and events likewise), so a file
of 100,000 pre-registered machines applies in seconds; changes to existing machines go through the registry's own
use cases (update, approve, reject), one by one, with every rule those enforce."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from ktizo.db import Database
from ktizo.db.batch import insert_many, table_of
from ktizo.db.models import AppliedObject, Device, DeviceGroup, Enrollment, Site
from ktizo.db.types import utcnow
from ktizo.domain.devices import DeviceStatus, MachineKind, Role, Source
from ktizo.domain.errors import KtizoError, PermissionDenied, ValidationFailed
from ktizo.domain.identity import normalize_machine_id
from ktizo.domain.users import UserRole
from ktizo.services import audit
from ktizo.services.context import Actor
from ktizo.services.devices import DeviceChanges, DeviceService, validate_changes
from ktizo.services.groups import GroupService
from ktizo.services.rules import RuleEngine, check_name
from ktizo.services.sites import SiteService, normalize_site_code

API_VERSION = "ktizo.dev/v1"
KINDS = ("Site", "Group", "Rule", "Webhook", "Device")  # applied in this order, pruned in the reverse
MAX_DOCUMENTS = 250_000
BATCH = 1000
DEVICE_FIELDS = (
    "mac_address",
    "machine_id",
    "uuid",
    "serial",
    "hostname",
    "ip_address",
    "role",
    "labels",
    "patch",
    "install_disk",
    "notes",
    "status",
)
# What a Device document may set. It sets only the fields it names (machines report things of their own); Groups,
# Rules, Webhooks and Sites are the administrator's alone, so their documents are their whole state.
_MANAGED = ("hostname", "ip_address", "role", "labels", "patch", "install_disk", "notes")
GROUP_SPEC = ("priority", "selector", "patch", "gateway", "nameservers", "description")
SITE_SPEC = ("name", "enrollment_policy", "max_pending", "max_agents")


@dataclass(frozen=True)
class Document:
    kind: str
    name: str
    spec: dict[str, Any]
    source: str  # the file (or "-" for standard input)
    index: int  # 1-based, within its file

    @property
    def where(self) -> str:
        return f"{self.source}: document {self.index} ({self.kind} {self.name!r})"

    def error(self, message: str, field: str | None) -> ValidationFailed:
        at = f"spec.{field}" if field and not field.startswith(("spec", "metadata")) else field
        return DocumentInvalid(f"{self.where}: {at + ': ' if at else ''}{message}", at)


class DocumentInvalid(ValidationFailed):
    """A document that cannot be applied; the message names the file, the document and the field already."""

    def __str__(self) -> str:
        return self.message


@dataclass
class Change:
    kind: str
    name: str  # the object's key: a Device's MAC or machine-id, the name of anything else
    result: str  # created | configured | unchanged | deleted
    diff: list[str] = field(default_factory=list)
    title: str | None = None  # a Device's document name, when it says more than its key

    def line(self) -> str:
        shown = f"{self.title} ({self.name})" if self.title and self.title != self.name else self.name
        return f"{self.kind.lower()}/{shown} {self.result}"


@dataclass
class Report:
    changes: list[Change]
    dry_run: bool
    notes: list[str] = field(default_factory=list)  # things to do next (a site without a key, say)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for change in self.changes:
            out[change.result] = out.get(change.result, 0) + 1
        return out


class _DryRun(Exception):
    def __init__(self, report: Report) -> None:
        self.report = report


# -- reading documents -----------------------------------------------------------------------------------


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML's safe loader (libyaml's when present) without YAML 1.1's base-60 numbers: an unquoted MAC such as
    52:54:00:12:34:56 stays the text it looks like instead of becoming the integer 2.6e9."""


_SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
_NUMBERS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


class _NotBase60:
    def __init__(self, regexp: re.Pattern[str]) -> None:
        self.regexp = regexp

    def match(self, value: str) -> re.Match[str] | None:
        return None if _SEXAGESIMAL.match(value) else self.regexp.match(value)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, _NotBase60(regexp) if tag in _NUMBERS else regexp) for tag, regexp in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse(text: str, source: str) -> list[Document]:
    """The documents of one file, each checked for ``apiVersion``, ``kind``, ``metadata.name`` and ``spec``."""
    try:
        raw = list(yaml.load_all(text, Loader=_Loader))  # a safe loader, see _Loader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValidationFailed(f"{source}: not YAML{where}: {problem}", "file") from None
    docs = []
    for index, item in enumerate(raw, start=1):
        if item is None:
            continue  # an empty document (a trailing ---)
        here = f"{source}: document {index}"
        if not isinstance(item, dict):
            raise ValidationFailed(f"{here}: a document is a mapping with apiVersion, kind, metadata and spec", "file")
        if item.get("apiVersion") != API_VERSION:
            raise ValidationFailed(f"{here}: apiVersion must be {API_VERSION}", "apiVersion")
        kind = item.get("kind")
        if kind not in KINDS:
            raise ValidationFailed(f"{here}: kind must be one of {', '.join(KINDS)}", "kind")
        metadata = item.get("metadata")
        name = metadata.get("name") if isinstance(metadata, dict) else None
        if not isinstance(name, str) or not name.strip() or len(name) > 253:
            raise ValidationFailed(f"{here} ({kind}): metadata.name is required (a text of at most 253)", "metadata")
        spec = item.get("spec")
        if not isinstance(spec, dict):
            raise ValidationFailed(f"{here} ({kind} {name!r}): spec is required and is a mapping", "spec")
        unknown = set(item) - {"apiVersion", "kind", "metadata", "spec"}
        if unknown:
            raise ValidationFailed(f"{here}: unknown top-level field {sorted(unknown)[0]!r}", "file")
        docs.append(Document(kind, name.strip(), spec, source, index))
        if len(docs) > MAX_DOCUMENTS:
            raise ValidationFailed(f"{source}: more than {MAX_DOCUMENTS} documents; split the file", "file")
    return docs


def document(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


def dump(docs: Iterable[dict[str, Any]]) -> str:
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump_all(list(docs), Dumper=dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


# -- the kinds ---------------------------------------------------------------------------------------------


def device_key(spec: dict[str, Any]) -> str | None:
    return spec.get("mac_address") or spec.get("machine_id") or (f"uuid:{spec['uuid']}" if spec.get("uuid") else None)


def device_spec(device: Any) -> dict[str, Any]:
    """A device as its document's spec: the API's field names, empty values left out."""
    spec: dict[str, Any] = {}
    if device.kind == MachineKind.AGENT.value:
        spec["machine_id"] = device.machine_id
    elif device.mac_address:
        spec["mac_address"] = device.mac_address
    for name in ("uuid", "serial", "hostname", "ip_address", "role", "labels", "patch", "install_disk", "notes"):
        value = getattr(device, name)
        if value not in (None, "", {}, []):
            spec[name] = dict(value) if isinstance(value, dict) else value
    status = device.status
    if status == DeviceStatus.PENDING.value and device.approve_on_arrival:
        status = DeviceStatus.APPROVED.value
    spec["status"] = status
    return spec


def device_name(device: Any) -> str:
    return device.hostname or device.mac_address or device.machine_id or f"device-{device.id}"


class Declarative:
    def __init__(
        self,
        db: Database,
        devices: DeviceService,
        groups: GroupService,
        rules: RuleEngine,
        sites: SiteService,
        webhooks: Any,
    ) -> None:
        self.db = db
        self.devices = devices
        self.groups = groups
        self.rules = rules
        self.sites = sites
        self.webhooks = webhooks
        self._progress: Callable[[str], None] = lambda _message: None

    # -- export ----------------------------------------------------------------------------------------

    def export(self, kinds: Sequence[str] | None = None, *, include_secrets: bool = False) -> list[dict[str, Any]]:
        wanted = [k for k in KINDS if kinds is None or k in kinds]
        out: list[dict[str, Any]] = []
        with self.db.read() as s:
            for kind in wanted:
                for name, spec in self._current(s, kind, include_secrets=include_secrets).values():
                    out.append(document(kind, name, spec))
        return out

    def _current(
        self, s: Session, kind: str, *, include_secrets: bool = False
    ) -> dict[str, tuple[str, dict[str, Any]]]:
        """Each object of ``kind`` by its key: (its document name, its spec)."""
        if kind == "Device":
            rows = s.scalars(select(Device).order_by(Device.id)).all()
            return {k: (device_name(d), device_spec(d)) for d in rows if (k := device_key(device_spec(d)))}
        if kind == "Group":
            return {g.name: (g.name, _group_spec(g)) for g in s.scalars(select(DeviceGroup).order_by(DeviceGroup.name))}
        if kind == "Site":
            return {x.site_code: (x.site_code, _site_spec(x)) for x in s.scalars(select(Site).order_by(Site.site_code))}
        if kind == "Rule":
            return {name: (name, spec) for name, spec in self.rules.export()}
        return {name: (name, spec) for name, spec in self.webhooks.export(include_secrets=include_secrets)}

    # -- apply -----------------------------------------------------------------------------------------

    def apply(
        self,
        actor: Actor,
        docs: Sequence[Document],
        *,
        dry_run: bool = False,
        prune: bool = False,
        progress: Callable[[str], None] | None = None,
    ) -> Report:
        actor.require(UserRole.OPERATOR)
        by_kind: dict[str, list[Document]] = {k: [] for k in KINDS}
        for doc in docs:
            by_kind[doc.kind].append(doc)
        report = Report([], dry_run)
        self._progress = progress or (lambda _message: None)
        try:
            with self.db.write() as s:
                named: dict[str, set[str]] = {}
                for kind in KINDS:
                    if by_kind[kind]:
                        self._progress(f"{kind}: {len(by_kind[kind])} document(s)")
                        before = len(report.changes)
                        self._apply_kind(s, actor, kind, by_kind[kind], report)
                        named[kind] = {c.name for c in report.changes[before:]}
                if prune:
                    for kind in reversed(KINDS):
                        if kind in named:
                            self._prune(s, actor, kind, named[kind], report)
                audit.record(s, actor, "apply", None, {"dry_run": dry_run, "prune": prune, **report.counts()})
                if dry_run:
                    raise _DryRun(report)
        except _DryRun:
            return report
        return report

    def _apply_kind(self, s: Session, actor: Actor, kind: str, docs: list[Document], report: Report) -> None:
        if kind == "Device":
            self._apply_devices(s, actor, docs, report)
            return
        seen: dict[str, Document] = {}
        current = self._current(s, kind, include_secrets=False)
        for doc in docs:
            key = _object_key(kind, doc)
            if key in seen:
                raise doc.error(f"{kind} {doc.name!r} is also document {seen[key].index} of {seen[key].source}", None)
            seen[key] = doc
            before = current.get(key)
            try:
                result = self._apply_one(s, actor, kind, key, doc, before)
            except ValidationFailed as exc:
                raise doc.error(exc.message, exc.field) from None
            except KtizoError as exc:
                raise type(exc)(f"{doc.where}: {exc.message}") from None
            after = self._current(s, kind).get(key) if result != "unchanged" else before
            diff = _diff(before[1] if before else None, after[1] if after else None)
            report.changes.append(Change(kind, key, result, diff if result == "configured" else []))
            if kind == "Site" and result == "created":
                report.notes.append(f"site {key} has no enrollment key yet: `ktizo sites rotate-key {key}` makes one")
            _manage(s, kind, key, actor)

    def _apply_one(
        self, s: Session, actor: Actor, kind: str, key: str, doc: Document, before: tuple[str, dict[str, Any]] | None
    ) -> str:
        spec = doc.spec
        if kind == "Rule":
            return self.rules.apply_in(s, actor, key, spec)
        if kind == "Webhook":
            result: str = self.webhooks.apply_in(s, actor, key, spec)
            return result
        if kind == "Group":
            unknown = set(spec) - set(GROUP_SPEC)
            if unknown:
                raise ValidationFailed(f"unknown field; a group has {', '.join(GROUP_SPEC)}", sorted(unknown)[0])
            values = {k: spec.get(k) for k in GROUP_SPEC}
            values["priority"] = 100 if values["priority"] is None else values["priority"]
            values["selector"] = values["selector"] or {}
            values["nameservers"] = values["nameservers"] or []
            values["description"] = values["description"] or ""
            if before is None:
                self.groups.create(actor, {"name": key, **values})
                return "created"
            if _group_spec_values(values) == before[1]:
                return "unchanged"
            self.groups.update(actor, key, values)
            return "configured" if self._current(s, "Group")[key][1] != before[1] else "unchanged"
        # Site
        unknown = set(spec) - set(SITE_SPEC)
        if unknown:
            raise ValidationFailed(f"unknown field; a site has {', '.join(SITE_SPEC)}", sorted(unknown)[0])
        title, policy = str(spec.get("name") or ""), str(spec.get("enrollment_policy") or "auto-approve")
        pending, agents = spec.get("max_pending"), spec.get("max_agents")
        if before is None:
            self.sites.create(actor, key, name=title, policy=policy, max_pending=pending, max_agents=agents)
            return "created"
        desired = {"enrollment_policy": policy, "name": title, "max_pending": pending, "max_agents": agents}
        if {k: v for k, v in desired.items() if v not in (None, "")} == before[1]:
            return "unchanged"
        site = self.sites.update(actor, key, name=title, policy=policy, max_pending=pending, max_agents=agents)
        return "unchanged" if _site_spec(site) == before[1] else "configured"

    def _prune(self, s: Session, actor: Actor, kind: str, named: set[str], report: Report) -> None:
        managed = set(s.scalars(select(AppliedObject.name).where(AppliedObject.kind == kind)))
        current = self._current(s, kind)
        for key in sorted(managed - named):
            if key in current:
                self._delete(s, actor, kind, key)
                report.changes.append(Change(kind, key, "deleted"))
            s.execute(delete(AppliedObject).where(AppliedObject.kind == kind, AppliedObject.name == key))

    def _delete(self, s: Session, actor: Actor, kind: str, key: str) -> None:
        if kind == "Rule":
            self.rules.delete_in(s, actor, key)
        elif kind == "Webhook":
            self.webhooks.delete_in(s, actor, key)
        elif kind == "Group":
            self.groups.delete(actor, key)
        elif kind == "Site":
            self.sites.delete(actor, key)
        else:
            device = self._find_device(s, key)
            if device is not None:
                self.devices.delete(actor, device.id)

    # -- devices, in batches ---------------------------------------------------------------------------

    @staticmethod
    def _find_device(s: Session, key: str) -> Device | None:
        if key.startswith("uuid:"):
            return s.scalar(select(Device).where(Device.uuid == key[5:], Device.mac_address.is_(None)))
        if ":" in key:
            return s.scalar(select(Device).where(Device.mac_address == key))
        return s.scalar(select(Device).where(Device.machine_id == key))

    def _apply_devices(self, s: Session, actor: Actor, docs: list[Document], report: Report) -> None:
        wanted: dict[str, tuple[Document, dict[str, Any]]] = {}
        for doc in docs:
            values = self._device_values(actor, doc)
            key = device_key(values)
            assert key is not None
            if key in wanted:
                other = wanted[key][0]
                raise doc.error(f"{key} is also document {other.index} of {other.source}", "mac_address")
            wanted[key] = (doc, values)
        existing = self._existing_devices(s, list(wanted))
        self._check_unique(s, wanted, existing)
        new = [(doc, values) for key, (doc, values) in wanted.items() if key not in existing]
        self._progress(f"devices: {len(existing)} known, {len(new)} new")
        for start in range(0, len(new), BATCH):
            self._insert_devices(s, actor, new[start : start + BATCH])
            if (start // BATCH) % 10 == 9:
                self._progress(f"devices: {start + BATCH}/{len(new)} inserted")
        for doc, values in new:
            key = device_key(values)
            assert key is not None
            report.changes.append(Change("Device", key, "created", title=doc.name))
        for key, (doc, values) in wanted.items():
            device = existing.get(key)
            if device is None:
                continue
            before = device_spec(device)
            try:
                self._change_device(s, actor, device, values)
            except ValidationFailed as exc:
                raise doc.error(exc.message, exc.field) from None
            except KtizoError as exc:
                raise type(exc)(f"{doc.where}: {exc.message}") from None
            after = device_spec(device)
            result = "unchanged" if after == before else "configured"
            diff = _diff(before, after) if result == "configured" else []
            report.changes.append(Change("Device", key, result, diff, title=doc.name))
        rows = [{"kind": "Device", "name": key, "applied_at": utcnow(), "applied_by": actor.name} for key in wanted]
        managed = set(s.scalars(select(AppliedObject.name).where(AppliedObject.kind == "Device")))
        fresh = [r for r in rows if r["name"] not in managed]
        for start in range(0, len(fresh), BATCH):
            insert_many(s, table_of(AppliedObject), fresh[start : start + BATCH])

    def _device_values(self, actor: Actor, doc: Document) -> dict[str, Any]:
        spec = doc.spec
        unknown = set(spec) - set(DEVICE_FIELDS)
        if unknown:
            raise doc.error(f"unknown field; a Device has {', '.join(DEVICE_FIELDS)}", sorted(unknown)[0])
        try:
            values = validate_changes({k: v for k, v in spec.items() if k not in ("status", "machine_id")})
        except ValidationFailed as exc:
            raise doc.error(exc.message, exc.field) from None
        if spec.get("machine_id") is not None:
            if spec.get("mac_address"):
                raise doc.error("a Device is known by mac_address or by machine_id, not both", "machine_id")
            try:
                values["machine_id"] = normalize_machine_id(str(spec["machine_id"]), "machine_id")
            except ValidationFailed as exc:
                raise doc.error(exc.message, "machine_id") from None
            if values.get("role"):
                raise doc.error("an agent host has no Talos role", "role")
            if values.get("ip_address"):
                raise doc.error(
                    "an agent's addresses are its own: set ip_address only for Talos machines", "ip_address"
                )
        elif not values.get("mac_address") and not values.get("uuid"):
            raise doc.error("a Device needs mac_address (Talos) or machine_id (an agent host)", "mac_address")
        elif values.get("ip_address") and not values.get("mac_address"):
            raise doc.error("a static address needs the MAC (Talos selects the NIC by it)", "ip_address")
        status = spec.get("status")
        if status is not None and status not in {s.value for s in DeviceStatus}:
            raise doc.error("status is pending, approved or rejected", "status")
        values["status"] = status
        if values.get("role") == Role.CONTROLPLANE.value and actor.role is not UserRole.ADMIN:
            raise PermissionDenied(
                f"{doc.where}: a controlplane machine needs the admin role (its config carries the CA keys)"
            )
        if values.get("patch"):
            try:
                self.devices._check_config_fields(None, {"patch": values["patch"], "role": values.get("role")})
            except ValidationFailed as exc:
                raise doc.error(exc.message, "patch") from None
        return values

    @staticmethod
    def _existing_devices(s: Session, keys: list[str]) -> dict[str, Device]:
        found: dict[str, Device] = {}
        macs = [k for k in keys if ":" in k and not k.startswith("uuid:")]
        ids = [k for k in keys if ":" not in k]
        uuids = [k[5:] for k in keys if k.startswith("uuid:")]
        for start in range(0, max(len(macs), len(ids), len(uuids)), BATCH):
            if macs[start : start + BATCH]:
                for d in s.scalars(select(Device).where(Device.mac_address.in_(macs[start : start + BATCH]))):
                    found[d.mac_address or ""] = d
            if ids[start : start + BATCH]:
                for d in s.scalars(select(Device).where(Device.machine_id.in_(ids[start : start + BATCH]))):
                    found[d.machine_id or ""] = d
            if uuids[start : start + BATCH]:
                stmt = select(Device).where(Device.uuid.in_(uuids[start : start + BATCH]), Device.mac_address.is_(None))
                for d in s.scalars(stmt):
                    found[f"uuid:{d.uuid}"] = d
        return found

    @staticmethod
    def _check_unique(
        s: Session, wanted: dict[str, tuple[Document, dict[str, Any]]], existing: dict[str, Device]
    ) -> None:
        """Two approved machines never share a hostname or a static address: checked here over the whole file (the
        database's unique indexes would refuse it too, but without saying which document)."""
        mine = {d.id for d in existing.values()}
        taken_names: dict[str, str] = {}
        taken_ips: dict[str, str] = {}
        for device_id, hostname, ip, mac in s.execute(
            select(Device.id, Device.hostname, Device.ip_address, Device.mac_address).where(
                Device.status == DeviceStatus.APPROVED.value
            )
        ):
            if device_id in mine:
                continue
            if hostname:
                taken_names[hostname] = f"machine {mac or hostname}"
            if ip:
                taken_ips[ip.split("/")[0]] = f"machine {mac or hostname}"
        for key, (doc, values) in wanted.items():
            device = existing.get(key)
            approved = values["status"] == DeviceStatus.APPROVED.value or (
                values["status"] is None and device is not None and device.status == DeviceStatus.APPROVED.value
            )
            if not approved:
                continue
            hostname, ip = values.get("hostname"), values.get("ip_address")
            if hostname:
                if hostname in taken_names:
                    raise doc.error(f"hostname {hostname} is taken by {taken_names[hostname]}", "hostname")
                taken_names[hostname] = doc.where
            if ip:
                bare = ip.split("/")[0]
                if bare in taken_ips:
                    raise doc.error(f"address {bare} is taken by {taken_ips[bare]}", "ip_address")
                taken_ips[bare] = doc.where

    def _insert_devices(self, s: Session, actor: Actor, batch: list[tuple[Document, dict[str, Any]]]) -> None:
        now = utcnow()
        rows: list[dict[str, Any]] = []
        for _doc, values in batch:
            agent = "machine_id" in values
            approve_now = values["status"] == DeviceStatus.APPROVED.value and not agent
            rows.append(
                {
                    "kind": (MachineKind.AGENT if agent else MachineKind.TALOS).value,
                    "mac_address": values.get("mac_address"),
                    "machine_id": values.get("machine_id"),
                    "uuid": values.get("uuid"),
                    "serial": values.get("serial"),
                    "hostname": values.get("hostname"),
                    "ip_address": values.get("ip_address"),
                    # What the ORM's validator derives: the approved-address unique index is over it.
                    "static_ip": values["ip_address"].split("/")[0] if values.get("ip_address") else None,
                    "role": None if agent else values.get("role") or Role.WORKER.value,
                    "labels": values.get("labels") or {},  # (an agent's role stays NULL: see kind_fields)
                    "patch": values.get("patch"),
                    "install_disk": values.get("install_disk"),
                    "notes": values.get("notes") or "",
                    "status": values["status"] if values["status"] and not agent else DeviceStatus.PENDING.value,
                    "source": Source.MANUAL.value,
                    "facts": {},
                    "extra_nics": [],
                    "first_seen": now,
                    "approved_at": now if approve_now else None,
                    "approved_by": actor.name if approve_now else None,
                    "rejected_at": now if values["status"] == DeviceStatus.REJECTED.value else None,
                    "rejected_by": actor.name if values["status"] == DeviceStatus.REJECTED.value else None,
                    "approve_on_arrival": actor.name
                    if agent and values["status"] == DeviceStatus.APPROVED.value
                    else None,
                    "revision": 1,
                }
            )
        table = table_of(Device)  # Core, not the ORM: an agent's role stays NULL (the ORM would default it)
        # The rows in one batched INSERT, then their new ids in one query.
        made = insert_many(s, table, rows, returning=("id", "mac_address", "machine_id", "uuid"))
        ids = {r.mac_address or r.machine_id or r.uuid: r.id for r in made}
        trail: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        for row in rows:
            shown = {**row, "id": ids[row["mac_address"] or row["machine_id"] or row["uuid"]]}
            trail.append(("create", shown, {"source": "apply", "hostname": row["hostname"], "role": row["role"]}))
            if row["status"] == DeviceStatus.APPROVED.value:
                trail.append(
                    (
                        "approve",
                        shown,
                        {"from": "pending", "hostname": row["hostname"], "ip_address": row["ip_address"]},
                    )
                )
                if row["role"] == Role.CONTROLPLANE.value:
                    trail.append(("secrets_release", shown, {"reason": "controlplane approved"}))
            elif row["status"] == DeviceStatus.REJECTED.value:
                trail.append(("reject", shown, {"from": "pending"}))
        record_many(s, actor, trail)

    def _change_device(self, s: Session, actor: Actor, device: Device, values: dict[str, Any]) -> None:
        """A document sets the fields it names (``null`` clears one); what it leaves out stays as it is, since a
        machine reports things of its own (an agent's hostname, a bound UUID)."""
        agent = device.kind == MachineKind.AGENT.value
        changes = DeviceChanges()
        for name in (*_MANAGED, "uuid", "serial"):
            if name not in values or (agent and name in ("role", "ip_address")):
                continue
            wanted = values[name]
            if name == "labels":
                wanted = wanted or {}
            elif name == "notes":
                wanted = wanted or ""
            elif name in ("role", "uuid", "serial") and wanted is None:
                continue  # a machine always has a role; identity factors are unbound with `devices unbind`
            if getattr(device, name) != wanted:
                setattr(changes, name, wanted)
        status = values["status"]
        wanted_status = DeviceStatus.PENDING.value if status == "approved" and device.approve_on_arrival else status
        if (
            not changes.items()
            and wanted_status in (None, device.status)
            and not (device.approve_on_arrival and status not in (None, DeviceStatus.APPROVED.value))
        ):
            return  # the common case of a re-apply: nothing to write, nothing to read back
        if status is None or status == device.status:
            if changes.items():
                self.devices.update(actor, device.id, changes)
        elif status == DeviceStatus.APPROVED.value:
            if agent and s.scalar(select(Enrollment.id).where(Enrollment.device_id == device.id)) is None:
                if changes.items():
                    self.devices.update(actor, device.id, changes)
                device.approve_on_arrival = actor.name  # approved when it enrolls: its certificate needs the CSR
            else:
                self.devices.approve_in(s, actor, device, changes)
        elif status == DeviceStatus.REJECTED.value:
            if changes.items():
                self.devices.update(actor, device.id, changes)
            self.devices.reject_in(s, actor, device, None, details={"source": "apply"})
        else:
            raise ValidationFailed(
                f"this machine is {device.status} and cannot go back to pending; delete it to start over", "status"
            )
        if status != DeviceStatus.APPROVED.value and device.approve_on_arrival:
            device.approve_on_arrival = None
        s.flush()
        s.refresh(device)


# -- helpers ------------------------------------------------------------------------------------------------


def record_many(s: Session, actor: Actor, entries: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> None:
    """Audit rows and events for a batch of machines by one actor."""
    audit.record_batch(s, [audit.Entry(actor, action, row, details) for action, row, details in entries])


def _object_key(kind: str, doc: Document) -> str:
    name = doc.name.strip().lower()
    try:
        if kind == "Site":
            return normalize_site_code(name, "metadata.name")
        if kind in ("Rule", "Webhook", "Group"):
            return check_name(name)
    except ValidationFailed as exc:
        raise doc.error(exc.message, "metadata.name") from None
    return name


def _manage(s: Session, kind: str, key: str, actor: Actor) -> None:
    if s.get(AppliedObject, (kind, key)) is None:
        s.add(AppliedObject(kind=kind, name=key, applied_at=utcnow(), applied_by=actor.name))
        s.flush()


def _group_spec(group: DeviceGroup) -> dict[str, Any]:
    return _group_spec_values({k: getattr(group, k) for k in GROUP_SPEC})


def _group_spec_values(values: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {"priority": values.get("priority", 100)}
    for name in ("selector", "patch", "gateway", "nameservers", "description"):
        value = values.get(name)
        if value not in (None, "", {}, []):
            spec[name] = value
    return spec


def _site_spec(site: Site) -> dict[str, Any]:
    spec: dict[str, Any] = {"enrollment_policy": site.enrollment_policy}
    if site.name:
        spec["name"] = site.name
    for name in ("max_pending", "max_agents"):
        if getattr(site, name) is not None:
            spec[name] = getattr(site, name)
    return spec


def _diff(before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[str]:
    """``field: old -> new`` for each field that differs (patches shown by size and digest, never their text)."""
    before, after = before or {}, after or {}
    lines = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        if name in ("patch", "secret"):
            old = audit.patch_summary(old) if isinstance(old, str) else old
            new = audit.patch_summary(new) if isinstance(new, str) else new
        if old is None:
            lines.append(f"+ {name}: {_shown(new)}")
        elif new is None:
            lines.append(f"- {name}: {_shown(old)}")
        else:
            lines.append(f"~ {name}: {_shown(old)} -> {_shown(new)}")
    return lines


def _shown(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-4].strip() if text.endswith("\n...") or text.endswith(" ...") else text
