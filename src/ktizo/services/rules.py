"""Auto-approval rules: an administrator's policy deciding machines at the door, in the door's own transaction.

A rule (``kind: Rule``) matches what a knock and the registry know of a machine (MAC prefix, source and lease
subnets, door, kind, hardware facts, site) and approves it (role, a hostname from a pattern, an address from a
range, labels) or rejects it. Rules are tried in priority order (lowest first, then by name); the first that
matches and can act decides. The rule's row is locked while it acts, so two replicas never hand out one hostname or
address twice and ``maxCount`` holds. A rule acts with the role of whoever last wrote it, and it approves a control
plane only when it says ``role: controlplane`` and that author was an admin; anything the approval refuses (no free
address left, a hostname taken meanwhile) leaves the machine pending, audited as ``rule_failed``."""

from __future__ import annotations

import builtins
import fnmatch
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ktizo.db import Database
from ktizo.db.models import Device, Rule, Site
from ktizo.db.types import utcnow
from ktizo.domain.devices import DeviceStatus, MachineKind, Role, Source
from ktizo.domain.errors import KtizoError, NotFound, PermissionDenied, ValidationFailed
from ktizo.domain.users import UserRole
from ktizo.services import audit
from ktizo.services.bulk import AddressRange, HostnamePattern, highest_number, taken_addresses
from ktizo.services.context import Actor
from ktizo.services.devices import DeviceChanges, DeviceService, validate_changes
from ktizo.services.first_contact import Knock
from ktizo.services.groups import normalize_labels

_NAME = re.compile(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?")
DOORS = ("config", "ipxe", "dhcp", "register", "device_code", "agent", "site", "manual")
_DOOR_OF_SOURCE = {
    Source.CONFIG_FETCH.value: "config",
    Source.IPXE.value: "ipxe",
    Source.DHCP.value: "dhcp",
    Source.REGISTER.value: "register",
    Source.DEVICE_CODE.value: "device_code",
    Source.MANUAL.value: "manual",
    Source.ENROLL.value: "agent",
}
MATCH_FIELDS = ("macPrefix", "sourceSubnet", "leaseSubnet", "door", "kind", "facts", "site")
FACT_FIELDS = ("manufacturer", "product", "serial", "arch")
SPEC_FIELDS = (
    "priority",
    "enabled",
    "match",
    "action",
    "role",
    "hostnamePattern",
    "ipRange",
    "labels",
    "notes",
    "maxCount",
)
MAX_RULES = 1000


@dataclass(frozen=True)
class Facts:
    """What a rule can see of a machine at the door."""

    mac: str | None
    kind: str
    door: str
    source_ip: str | None
    lease_ip: str | None
    facts: Mapping[str, Any]
    serial: str | None
    site: str | None
    role: str | None


@dataclass(frozen=True)
class Outcome:
    """What a rule did (or, in a dry run, would do) with one machine."""

    rule: str
    revision: int
    action: str
    device_id: int
    hostname: str | None = None
    ip_address: str | None = None
    role: str | None = None
    labels: Mapping[str, str] | None = None
    error: str | None = None


def door_of(knock: Knock | None, device: Device) -> str:
    if knock is not None:
        if knock.door is Source.ENROLL:
            return "site" if knock.machine_uid else "agent"
        return _DOOR_OF_SOURCE.get(knock.door.value, knock.door.value)
    if device.source == Source.ENROLL.value:
        return "site" if device.machine_uid else "agent"
    return _DOOR_OF_SOURCE.get(device.source, device.source)


# -- the spec: validated once, stored normalised -------------------------------------------------------


def _as_list(value: Any, field: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValidationFailed("a text or a non-empty list of texts", field)


def _subnets(value: Any, field: str) -> list[str]:
    out = []
    for text in _as_list(value, field):
        try:
            out.append(str(ipaddress.ip_network(text.strip(), strict=False)))
        except ValueError:
            raise ValidationFailed(f"{text[:60]!r} is not a network such as 10.0.5.0/24", field) from None
    return out


def _mac_prefixes(value: Any, field: str) -> list[str]:
    out = []
    for text in _as_list(value, field):
        raw = re.sub(r"[^0-9a-fA-F]", "", text)
        if not 2 <= len(raw) <= 12 or len(raw) % 2:
            raise ValidationFailed(f"{text[:40]!r} is not a MAC prefix such as 52:54:00", field)
        out.append(":".join(raw[i : i + 2] for i in range(0, len(raw), 2)).lower())
    return out


def normalize_match(match: Any) -> dict[str, Any]:
    if match is None:
        return {}
    if not isinstance(match, dict):
        raise ValidationFailed("match is a mapping of conditions", "match")
    unknown = set(match) - set(MATCH_FIELDS)
    if unknown:
        raise ValidationFailed(
            f"unknown condition {sorted(unknown)[0]!r}; a rule matches on {', '.join(MATCH_FIELDS)}", "match"
        )
    out: dict[str, Any] = {}
    if "macPrefix" in match:
        out["macPrefix"] = _mac_prefixes(match["macPrefix"], "match.macPrefix")
    for key in ("sourceSubnet", "leaseSubnet"):
        if key in match:
            out[key] = _subnets(match[key], f"match.{key}")
    if "door" in match:
        doors = [d.strip().lower() for d in _as_list(match["door"], "match.door")]
        bad = [d for d in doors if d not in DOORS]
        if bad:
            raise ValidationFailed(f"door {bad[0]!r} is not one of {', '.join(DOORS)}", "match.door")
        out["door"] = doors
    if "kind" in match:
        kinds = [k.strip().lower() for k in _as_list(match["kind"], "match.kind")]
        if any(k not in {m.value for m in MachineKind} for k in kinds):
            raise ValidationFailed("kind is talos or agent", "match.kind")
        out["kind"] = kinds
    if "facts" in match:
        facts = match["facts"]
        if not isinstance(facts, dict) or not facts:
            raise ValidationFailed(f"facts is a mapping of {', '.join(FACT_FIELDS)}", "match.facts")
        unknown = set(facts) - set(FACT_FIELDS)
        if unknown:
            raise ValidationFailed(
                f"unknown fact {sorted(unknown)[0]!r}; rules match on {', '.join(FACT_FIELDS)}", "match.facts"
            )
        checked = {}
        for key, value in facts.items():
            if not isinstance(value, str) or not value or len(value) > 200:
                raise ValidationFailed("a fact is matched by a text of at most 200 characters", f"match.facts.{key}")
            if key == "serial":
                try:
                    re.compile(value)
                except re.error as exc:
                    raise ValidationFailed(f"not a regular expression: {exc}", "match.facts.serial") from None
            checked[key] = value
        out["facts"] = checked
    if "site" in match:
        out["site"] = [s.strip().lower() for s in _as_list(match["site"], "match.site")]
    return out


def normalize_spec(spec: Any, author: Actor) -> dict[str, Any]:
    """A rule's spec, checked field by field (``ValidationFailed`` names the field) and normalised, so that an
    export of it applies as unchanged."""
    if not isinstance(spec, dict):
        raise ValidationFailed("a rule's spec is a mapping", "spec")
    unknown = set(spec) - set(SPEC_FIELDS)
    if unknown:
        raise ValidationFailed(f"unknown field {sorted(unknown)[0]!r}; a rule has {', '.join(SPEC_FIELDS)}", "spec")
    out: dict[str, Any] = {}
    priority = spec.get("priority", 100)
    if not isinstance(priority, int) or isinstance(priority, bool) or not -10000 <= priority <= 10000:
        raise ValidationFailed("priority is a whole number from -10000 to 10000", "priority")
    out["priority"] = priority
    enabled = spec.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ValidationFailed("enabled is true or false", "enabled")
    out["enabled"] = enabled
    out["match"] = normalize_match(spec.get("match"))
    action = spec.get("action")
    if action not in ("approve", "reject"):
        raise ValidationFailed("action is approve or reject", "action")
    out["action"] = action
    if action == "approve":
        if spec.get("role") is not None:
            try:
                out["role"] = Role(str(spec["role"]).strip().lower()).value
            except ValueError:
                raise ValidationFailed("role is controlplane or worker", "role") from None
            if out["role"] == Role.CONTROLPLANE.value and author.role is not UserRole.ADMIN:
                raise PermissionDenied(
                    "a rule approving control planes must be written by an admin (their configs carry the cluster's "
                    "CA keys)"
                )
        if spec.get("hostnamePattern"):
            try:
                out["hostnamePattern"] = _pattern_text(HostnamePattern.parse(str(spec["hostnamePattern"])))
            except ValidationFailed as exc:
                raise ValidationFailed(exc.message, "hostnamePattern") from None
        if spec.get("ipRange"):
            try:
                out["ipRange"] = str(AddressRange.parse(str(spec["ipRange"])))
            except ValidationFailed as exc:
                raise ValidationFailed(exc.message, "ipRange") from None
        if spec.get("labels"):
            out["labels"] = normalize_labels(spec["labels"], "labels")
    else:
        stray = [k for k in ("role", "hostnamePattern", "ipRange", "labels") if spec.get(k)]
        if stray:
            raise ValidationFailed(f"a rejecting rule sets nothing: remove {stray[0]}", stray[0])
    if spec.get("notes"):
        out["notes"] = validate_changes({"notes": spec["notes"]})["notes"]
    if spec.get("maxCount") is not None:
        count = spec["maxCount"]
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 1_000_000:
            raise ValidationFailed("maxCount is a whole number from 1 to 1000000", "maxCount")
        out["maxCount"] = count
    return out


def check_name(name: Any) -> str:
    text = str(name or "").strip().lower()
    if not _NAME.fullmatch(text):
        raise ValidationFailed("a rule name is 1-63 lower-case letters, digits, '.', '_', '-'", "metadata.name")
    return text


def _pattern_text(pattern: HostnamePattern) -> str:
    spec = "" if pattern.spec == "d" else f":{pattern.spec}"
    return f"{pattern.prefix}{{n{spec}}}{pattern.suffix}"


def spec_of(rule: Rule) -> dict[str, Any]:
    """The rule as its document's spec (the same normal form ``normalize_spec`` makes)."""
    spec: dict[str, Any] = {"priority": rule.priority, "enabled": rule.enabled, "match": dict(rule.match or {})}
    spec["action"] = rule.action
    spec.update(rule.settings or {})
    if rule.max_count is not None:
        spec["maxCount"] = rule.max_count
    return spec


# -- matching ----------------------------------------------------------------------------------------------


def _in_subnets(address: str | None, subnets: Iterable[str]) -> bool:
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("/")[0])
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(net) for net in subnets)


def _fact(facts: Mapping[str, Any], *names: str) -> str | None:
    for name in names:
        value = facts.get(name)
        if value not in (None, ""):
            return str(value)
    return None


def mismatches(match: Mapping[str, Any], seen: Facts) -> list[str]:
    """The conditions of ``match`` the machine does not meet (empty: it matches). Every condition must hold; a
    list within one condition is any of its values."""
    failed = []
    if "macPrefix" in match and not (seen.mac and any(seen.mac.startswith(p) for p in match["macPrefix"])):
        failed.append("macPrefix")
    if "sourceSubnet" in match and not _in_subnets(seen.source_ip, match["sourceSubnet"]):
        failed.append("sourceSubnet")
    if "leaseSubnet" in match and not _in_subnets(seen.lease_ip, match["leaseSubnet"]):
        failed.append("leaseSubnet")
    if "door" in match and seen.door not in match["door"]:
        failed.append("door")
    if "kind" in match and seen.kind not in match["kind"]:
        failed.append("kind")
    if "site" in match and (seen.site or "") not in match["site"]:
        failed.append("site")
    for key, wanted in (match.get("facts") or {}).items():
        if key == "serial":
            serial = seen.serial or _fact(seen.facts, "serial")
            if serial is None or re.fullmatch(wanted, serial) is None:
                failed.append("facts.serial")
            continue
        names = {
            "manufacturer": ("manufacturer", "vendor", "sys_vendor"),
            "product": ("product", "model", "product_name"),
            "arch": ("arch", "architecture", "platform"),
        }[key]
        value = _fact(seen.facts, *names)
        if value is None or not fnmatch.fnmatchcase(value.lower(), wanted.lower()):
            failed.append(f"facts.{key}")
    return failed


class RuleEngine:
    """Decides machines by the rules: at first contact (``decide``, from the doors) and, for an administrator's
    look ahead, without deciding (``dry_run``)."""

    def __init__(self, db: Database, devices: DeviceService) -> None:
        self.db = db
        self.devices = devices

    # -- rules as objects (documents are applied through ``apply_in``) -------------------------------------

    def list(self) -> list[Rule]:
        with self.db.read() as s:
            return list(s.scalars(select(Rule).order_by(Rule.priority, Rule.name)).all())

    def get(self, name: str) -> Rule:
        with self.db.read() as s:
            return self._get(s, name)

    @staticmethod
    def _get(s: Session, name: str, *, lock: bool = False) -> Rule:
        stmt = select(Rule).where(Rule.name == str(name).strip().lower())
        rule = s.scalar(stmt.with_for_update() if lock else stmt)
        if rule is None:
            raise NotFound(f"no rule named {str(name)[:63]!r}; `ktizo rules list` shows them")
        return rule

    def apply_in(self, s: Session, actor: Actor, name: str, spec: Any) -> str:
        """Create or change the rule ``name`` from its document's spec, in the caller's transaction. Returns
        ``created``, ``configured`` or ``unchanged``. Operators write rules for workers and agents; a rule that
        approves control planes needs an admin."""
        actor.require(UserRole.OPERATOR)
        name = check_name(name)
        values = normalize_spec(spec, actor)
        rule = s.scalar(select(Rule).where(Rule.name == name).with_for_update())
        settings = {k: values[k] for k in ("role", "hostnamePattern", "ipRange", "labels", "notes") if k in values}
        row = {
            "priority": values["priority"],
            "enabled": values["enabled"],
            "match": values["match"],
            "action": values["action"],
            "settings": settings,
            "max_count": values.get("maxCount"),
        }
        if rule is None:
            if (s.scalar(select(Rule.id).order_by(Rule.id.desc()).offset(MAX_RULES - 1).limit(1))) is not None:
                raise ValidationFailed(f"there are {MAX_RULES} rules already; delete some first", "metadata.name")
            rule = Rule(name=name, author=actor.name, author_role=_role(actor), **row)
            s.add(rule)
            s.flush()
            audit.record(s, actor, "rule_create", None, {"rule": name, "revision": 1, **_shown(values)})
            return "created"
        if all(getattr(rule, k) == v for k, v in row.items()):
            return "unchanged"
        for key, value in row.items():
            setattr(rule, key, value)
        rule.revision += 1
        rule.author, rule.author_role, rule.updated_at = actor.name, _role(actor), utcnow()
        audit.record(s, actor, "rule_update", None, {"rule": name, "revision": rule.revision, **_shown(values)})
        return "configured"

    def apply(self, actor: Actor, name: str, spec: Any) -> tuple[Rule, str]:
        with self.db.write() as s:
            result = self.apply_in(s, actor, name, spec)
            return self._get(s, name), result

    def delete_in(self, s: Session, actor: Actor, name: str) -> None:
        actor.require(UserRole.OPERATOR)
        rule = self._get(s, name, lock=True)
        audit.record(s, actor, "rule_delete", None, {"rule": rule.name, "revision": rule.revision})
        s.delete(rule)

    def delete(self, actor: Actor, name: str) -> None:
        with self.db.write() as s:
            self.delete_in(s, actor, name)

    def export(self) -> builtins.list[tuple[str, dict[str, Any]]]:
        return [(rule.name, spec_of(rule)) for rule in self.list()]

    # -- deciding ------------------------------------------------------------------------------------------

    def decide(self, s: Session, device: Device, knock: Knock | None = None) -> Outcome | None:
        """Let the rules decide a pending machine, inside the door's transaction (the device row is locked by
        it). Returns what the deciding rule did, or None when no rule took the machine."""
        if device.status != DeviceStatus.PENDING.value:
            return None
        if device.approve_on_arrival:
            return self._on_arrival(s, device)
        candidates = list(
            s.scalars(select(Rule).where(Rule.enabled.is_(True)).order_by(Rule.priority, Rule.name)).all()
        )
        if not candidates:
            return None
        seen = self._facts(s, device, knock)
        for candidate in candidates:
            if mismatches(candidate.match or {}, seen) or not _may_act(candidate, device):
                continue
            rule = s.get(Rule, candidate.id, with_for_update=True, populate_existing=True)
            if rule is None or not rule.enabled or (rule.max_count is not None and rule.matched >= rule.max_count):
                continue  # changed, exhausted or deleted meanwhile: the next rule may still take it
            outcome = self._act(s, rule, device)
            if outcome is not None:
                return outcome
        return None

    def _on_arrival(self, s: Session, device: Device) -> Outcome | None:
        """A machine pre-registered with ``status: approved`` (``ktizo apply``) arrived with its identity."""
        actor = Actor.user(device.approve_on_arrival or "apply", UserRole.OPERATOR)
        savepoint = s.begin_nested()
        try:
            self.devices.approve_in(s, actor, device, DeviceChanges(), details={"on_arrival": True})
            device.approve_on_arrival = None
            savepoint.commit()
        except (KtizoError, IntegrityError) as exc:
            savepoint.rollback()
            why = exc.message if isinstance(exc, KtizoError) else "a hostname or address was taken meanwhile"
            audit.record(s, actor, "rule_failed", device, {"on_arrival": True, "reason": why})
            return None
        return Outcome("apply", 0, "approve", device.id, device.hostname, device.ip_address, device.role)

    def _act(self, s: Session, rule: Rule, device: Device) -> Outcome | None:
        actor = Actor.rule(rule.name, UserRole(rule.author_role))
        details = {"rule": rule.name, "rule_revision": rule.revision}
        settings = rule.settings or {}
        savepoint = s.begin_nested()
        try:
            if rule.action == "reject":
                self.devices.reject_in(s, actor, device, settings.get("notes"), details=details)
                outcome = Outcome(rule.name, rule.revision, "reject", device.id)
            else:
                changes = self._changes(s, rule, device, {device.id})
                self.devices.approve_in(s, actor, device, changes, details=details)
                outcome = Outcome(
                    rule.name,
                    rule.revision,
                    "approve",
                    device.id,
                    device.hostname,
                    device.ip_address,
                    device.role,
                    dict(device.labels or {}),
                )
            rule.matched += 1
            savepoint.commit()
            return outcome
        except (KtizoError, IntegrityError) as exc:
            savepoint.rollback()
            why = exc.message if isinstance(exc, KtizoError) else "a hostname or address was taken meanwhile"
            audit.record(s, actor, "rule_failed", device, {**details, "reason": why})
            return None

    @staticmethod
    def _changes(s: Session, rule: Rule, device: Device, exclude: set[int], planned: int = 0) -> DeviceChanges:
        settings = rule.settings or {}
        changes = DeviceChanges()
        if device.kind == MachineKind.TALOS.value and settings.get("role"):
            changes.role = settings["role"]
        if settings.get("hostnamePattern"):
            pattern = HostnamePattern.parse(settings["hostnamePattern"])
            changes.hostname = pattern.render(highest_number(s, pattern, exclude) + 1 + planned)
        if settings.get("ipRange"):
            if not device.mac_address:
                raise ValidationFailed("a static address needs a MAC (Talos selects the NIC by it)", "ipRange")
            addresses = AddressRange.parse(settings["ipRange"])
            taken = taken_addresses(s, exclude)
            free = (a for a in addresses if a not in taken)
            picked = next((a for i, a in enumerate(free) if i == planned), None)
            if picked is None:
                raise ValidationFailed(f"the range {addresses} has no free address left", "ipRange")
            changes.ip_address = f"{picked}/{addresses.network.prefixlen}"
        if settings.get("labels"):
            changes.labels = {**(device.labels or {}), **settings["labels"]}
        if settings.get("notes"):
            changes.notes = settings["notes"]
        return changes

    def dry_run(self, name: str, limit: int = 1000) -> tuple[Rule, builtins.list[Outcome], int]:
        """Which pending machines the rule would take now, and what each would get, as if they knocked again in
        order (numbers and addresses handed out one after another). Returns the rule, the outcomes (a rule with
        ``maxCount`` stops where it would) and how many pending machines it passes over."""
        with self.db.read() as s:
            rule = self._get(s, name)
            pending = s.scalars(
                select(Device).where(Device.status == DeviceStatus.PENDING.value).order_by(Device.id).limit(50_000)
            ).all()
            room = None if rule.max_count is None else max(0, rule.max_count - rule.matched)
            outcomes: builtins.list[Outcome] = []
            skipped = 0
            takes = [d for d in pending if not mismatches(rule.match or {}, self._facts(s, d, None))]
            skipped = len(pending) - len(takes)
            exclude = {d.id for d in takes}
            for device in takes:
                if len(outcomes) >= limit or (room is not None and len(outcomes) >= room):
                    break
                if not _may_act(rule, device):
                    outcomes.append(Outcome(rule.name, rule.revision, rule.action, device.id, error=_CONTROLPLANE))
                    continue
                if rule.action == "reject":
                    outcomes.append(Outcome(rule.name, rule.revision, "reject", device.id))
                    continue
                planned = sum(1 for o in outcomes if o.error is None)
                try:
                    changes = self._changes(s, rule, device, exclude, planned)
                except ValidationFailed as exc:
                    outcomes.append(Outcome(rule.name, rule.revision, "approve", device.id, error=exc.message))
                    continue
                role = changes.role if isinstance(changes.role, str) else device.role
                outcomes.append(
                    Outcome(
                        rule.name,
                        rule.revision,
                        "approve",
                        device.id,
                        changes.hostname if isinstance(changes.hostname, str) else device.hostname,
                        changes.ip_address if isinstance(changes.ip_address, str) else device.ip_address,
                        role,
                        changes.labels if isinstance(changes.labels, dict) else dict(device.labels or {}),
                    )
                )
            return rule, outcomes, skipped

    @staticmethod
    def _facts(s: Session, device: Device, knock: Knock | None) -> Facts:
        site = None
        if device.site_id is not None:
            site = s.scalar(select(Site.site_code).where(Site.id == device.site_id))
        return Facts(
            mac=device.mac_address,
            kind=device.kind,
            door=door_of(knock, device),
            source_ip=knock.source_ip if knock is not None and knock.source_ip else device.last_ip,
            lease_ip=(knock.lease_ip if knock is not None else None) or device.lease_ip,
            facts=device.facts or {},
            serial=device.serial,
            site=site,
            role=device.role,
        )


_CONTROLPLANE = "a control plane: only a rule saying role: controlplane, written by an admin, approves it"


def _may_act(rule: Rule, device: Device) -> bool:
    """Rules never release a control plane's secrets unless an admin wrote a rule saying so."""
    if rule.action == "reject":
        return True
    says = (rule.settings or {}).get("role")
    becomes = says or device.role
    if becomes != Role.CONTROLPLANE.value and device.role != Role.CONTROLPLANE.value:
        return True
    return says == Role.CONTROLPLANE.value and rule.author_role == UserRole.ADMIN.value


def _role(actor: Actor) -> str:
    return (actor.role or UserRole.VIEWER).value


def _shown(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k in ("priority", "enabled", "action", "maxCount")}
