"""Device groups: config templates (a strategic-merge patch plus network defaults) per group of devices."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from ktizo.db import Database
from ktizo.db.models import Device, DeviceGroup, GroupMember
from ktizo.db.types import utcnow
from ktizo.domain.bounds import is_possible_id, parse_id
from ktizo.domain.devices import Role
from ktizo.domain.errors import Conflict, NotFound, NotReady, ValidationFailed
from ktizo.domain.identity import normalize_ip
from ktizo.domain.users import UserRole
from ktizo.services import audit, state
from ktizo.services.context import Actor
from ktizo.services.render import ConfigSource, Snapshot
from ktizo.talos import Patch, apply_patches, check_patch_result, load_patch, machine_type

_NAME = re.compile(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?")
_LABEL_KEY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,126}[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?")
GROUP_FIELDS = ("name", "priority", "selector", "patch", "gateway", "nameservers", "description")


def normalize_labels(labels: dict[str, Any], field: str = "labels") -> dict[str, str]:
    if not isinstance(labels, dict) or len(labels) > 64:
        raise ValidationFailed("labels are a mapping of at most 64 key: value pairs", field)
    out = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
            raise ValidationFailed(
                f"label key {str(key)[:40]!r} must be 1-128 letters, digits, '.', '_', '-', '/'", field
            )
        if not isinstance(value, str) or not _LABEL_VALUE.fullmatch(value):
            raise ValidationFailed(f"label value for {key!r} must be up to 63 letters, digits, '.', '_', '-'", field)
        out[key] = value
    return out


def check_patch_on_bases(source: ConfigSource, snap: Snapshot, roles: list[Role], patches: list[Patch]) -> None:
    """Apply ``patches`` to the base of each role that has one and check the result as Talos would: a patch that
    breaks a config is refused when it is saved, never at download time. A patch may not change machine.type:
    that is the device's role, decided by the operator, not by a template."""
    for role in roles:
        try:
            base = source.base(snap, role)
        except NotReady:
            continue  # nothing to check against yet; a base that arrives later is checked against the patches
        try:
            result = apply_patches(base.documents, patches)
            check_patch_result(result)
        except ValidationFailed as exc:
            field = exc.field if exc.field and exc.field.startswith("patch") else f"patch.{exc.field or ''}".rstrip(".")
            raise ValidationFailed(f"on the {role.value} base: {exc.message}", field) from None
        if machine_type(result) != machine_type(base.documents):
            raise ValidationFailed(
                f"a patch may not change machine.type (the {role.value} base says {machine_type(base.documents)}); "
                "set the device's role instead",
                "patch.machine.type",
            )


class GroupService:
    def __init__(self, db: Database, source: ConfigSource) -> None:
        self.db = db
        self.source = source

    def all(self) -> list[tuple[DeviceGroup, list[int]]]:
        with self.db.read() as s:
            groups = s.scalars(select(DeviceGroup).order_by(DeviceGroup.priority, DeviceGroup.id)).all()
            members: dict[int, list[int]] = {}
            for gid, did in s.execute(
                select(GroupMember.group_id, GroupMember.device_id).order_by(GroupMember.device_id)
            ):
                members.setdefault(gid, []).append(did)
        return [(g, members.get(g.id, [])) for g in groups]

    def get(self, ref: str | int) -> tuple[DeviceGroup, list[int]]:
        with self.db.read() as s:
            group = self._get(s, ref)
            members = list(
                s.scalars(
                    select(GroupMember.device_id)
                    .where(GroupMember.group_id == group.id)
                    .order_by(GroupMember.device_id)
                )
            )
        return group, members

    @staticmethod
    def _get(s: Session, ref: str | int, *, lock: bool = False) -> DeviceGroup:
        if isinstance(ref, int) or (ref.isascii() and ref.isdigit()):  # a name is never all digits (_normalise)
            group_id = ref if isinstance(ref, int) else parse_id(ref)
            if group_id is None or not is_possible_id(group_id):  # no row has it; as a parameter, a driver error
                raise NotFound(f"no device group {ref}")
            stmt = select(DeviceGroup).where(DeviceGroup.id == group_id)
        else:
            stmt = select(DeviceGroup).where(DeviceGroup.name == ref)
        if lock:
            stmt = stmt.with_for_update()
        group = s.scalar(stmt)
        if group is None:
            raise NotFound(f"no device group {ref}")
        return group

    def _normalise(self, values: dict[str, Any]) -> dict[str, Any]:
        out = dict(values)
        if "name" in values:
            name = str(values["name"]).strip().lower()
            if not _NAME.fullmatch(name) or name.isdigit():
                raise ValidationFailed("a group name is 1-63 lower-case letters, digits, '.', '_', '-'", "name")
            out["name"] = name
        if "priority" in values and not (isinstance(values["priority"], int) and -10000 <= values["priority"] <= 10000):
            raise ValidationFailed("priority is a whole number from -10000 to 10000", "priority")
        if "selector" in values:
            out["selector"] = normalize_labels(values["selector"] or {}, "selector")
        if values.get("gateway"):
            out["gateway"] = normalize_ip(values["gateway"], "gateway")
        if "nameservers" in values:
            out["nameservers"] = [normalize_ip(n, "nameservers") for n in values["nameservers"] or ()]
        if values.get("patch"):
            patch = load_patch(values["patch"])
            check_patch_on_bases(self.source, self.source.snapshot(), list(Role), [patch])
        elif "patch" in values:
            out["patch"] = None
        return out

    def create(self, actor: Actor, values: dict[str, Any]) -> DeviceGroup:
        actor.require(UserRole.ADMIN)
        if not values.get("name"):
            raise ValidationFailed("a group needs a name", "name")
        clean = self._normalise({k: v for k, v in values.items() if k in GROUP_FIELDS})
        with self.db.write() as s:
            if s.scalar(select(DeviceGroup.id).where(DeviceGroup.name == clean["name"])) is not None:
                raise Conflict(f"a group named {clean['name']} already exists")
            group = DeviceGroup(**clean)
            s.add(group)
            s.flush()
            state.bump(s)
            audit.record(s, actor, "group_create", None, {"group": group.name, **_summary(clean)})
        return group

    def update(self, actor: Actor, ref: str | int, values: dict[str, Any]) -> DeviceGroup:
        actor.require(UserRole.ADMIN)
        clean = self._normalise({k: v for k, v in values.items() if k in GROUP_FIELDS})
        with self.db.write() as s:
            group = self._get(s, ref, lock=True)
            if (
                "name" in clean
                and clean["name"] != group.name
                and s.scalar(select(DeviceGroup.id).where(DeviceGroup.name == clean["name"])) is not None
            ):
                raise Conflict(f"a group named {clean['name']} already exists")
            for key, value in clean.items():
                setattr(group, key, value)
            group.revision += 1
            group.updated_at = utcnow()
            state.bump(s)
            audit.record(s, actor, "group_update", None, {"group": group.name, **_summary(clean)})
        return group

    def delete(self, actor: Actor, ref: str | int) -> None:
        actor.require(UserRole.ADMIN)
        with self.db.write() as s:
            group = self._get(s, ref, lock=True)
            members = list(s.scalars(select(GroupMember.device_id).where(GroupMember.group_id == group.id)))
            s.execute(update(Device).where(Device.id.in_(members)).values(revision=Device.revision + 1))
            s.delete(group)
            state.bump(s)
            audit.record(s, actor, "group_delete", None, {"group": group.name})

    def set_members(self, actor: Actor, ref: str | int, add: list[int], remove: list[int]) -> list[int]:
        """Add and remove explicit members. Only those devices' renders change (their revision moves)."""
        actor.require(UserRole.OPERATOR)
        with self.db.write() as s:
            group = self._get(s, ref, lock=True)
            # Ids no row can have stay out of the query (a driver error as parameters) and so are reported missing.
            possible = [d for d in add + remove if is_possible_id(d)]
            known = set(s.scalars(select(Device.id).where(Device.id.in_(possible))))
            missing = sorted(set(add + remove) - known)
            if missing:
                raise NotFound(f"no device with id {missing[0]}")
            current = set(s.scalars(select(GroupMember.device_id).where(GroupMember.group_id == group.id)))
            to_add = sorted(set(add) - current)
            to_remove = sorted(set(remove) & current)
            if to_add:
                s.add_all(GroupMember(group_id=group.id, device_id=d) for d in to_add)
            if to_remove:
                s.execute(
                    delete(GroupMember).where(GroupMember.group_id == group.id, GroupMember.device_id.in_(to_remove))
                )
            changed = to_add + to_remove
            if changed:
                s.execute(update(Device).where(Device.id.in_(changed)).values(revision=Device.revision + 1))
                state.bump(s)
                audit.record(
                    s, actor, "group_members", None, {"group": group.name, "added": to_add, "removed": to_remove}
                )
            result = sorted((current | set(to_add)) - set(to_remove))
        return result


def _summary(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (audit.patch_summary(v) if k == "patch" else v) for k, v in values.items()}
