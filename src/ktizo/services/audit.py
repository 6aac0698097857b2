"""The audit trail: written inside the transaction of the change it records, so neither exists without the other."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ktizo.db import Database
from ktizo.db.models import AuditEvent
from ktizo.domain.bounds import as_utc, is_possible_id
from ktizo.services.context import Actor

ACTIONS = (
    "register",
    "create",
    "approve",
    "reject",
    "update",
    "delete",
    "unbind",
    "config_download",
    "identity_mismatch",
    "login",
    "login_failed",
    "base_config_upload",
    "user_create",
    "token_create",
    "token_revoke",
    "cluster_update",
    "cluster_generate",
    "secrets_import",
    "secrets_export",
    "secrets_reseal",
    "talosconfig",
    "config_reveal",
    "group_create",
    "group_update",
    "group_delete",
    "group_members",
    "installed",
    "reinstall",
    "expire",
    "device_code",
    "device_code_miss",
    "device_token",
    "asset_fetch",
    "asset_import",
)


class DeviceRef(Protocol):
    """What the audit log keeps of a device: an ORM object or a Core row both fit."""

    @property
    def id(self) -> int: ...
    @property
    def mac_address(self) -> str | None: ...


def record(
    session: Session,
    actor: Actor,
    action: str,
    device: DeviceRef | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    session.add(
        AuditEvent(
            actor=actor.name,
            actor_type=actor.kind,
            action=action,
            device_id=device.id if device is not None else None,
            device_mac=device.mac_address if device is not None else None,
            source_ip=actor.source_ip,
            details=details or {},
        )
    )


@dataclass(frozen=True)
class AuditQuery:
    device_id: int | None = None
    actor: str | None = None
    action: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    limit: int = 100
    offset: int = 0


class AuditService:
    def __init__(self, db: Database) -> None:
        self.db = db

    def list(self, q: AuditQuery) -> tuple[list[AuditEvent], int]:
        stmt = select(AuditEvent)
        if q.device_id is not None:
            if not is_possible_id(q.device_id):  # no device ever had it; as a parameter it would be a driver error
                return [], 0
            stmt = stmt.where(AuditEvent.device_id == q.device_id)
        if q.actor:
            stmt = stmt.where(AuditEvent.actor == q.actor)
        if q.action:
            stmt = stmt.where(AuditEvent.action == q.action)
        # Adapters convert the times they parse already; this is the last check before the column converts them
        # at bind time, where an overflow would be a StatementError.
        if q.since:
            stmt = stmt.where(AuditEvent.at >= as_utc(q.since, "since"))
        if q.until:
            stmt = stmt.where(AuditEvent.at < as_utc(q.until, "until"))
        with self.db.read() as s:
            total = s.scalar(select(func.count()).select_from(stmt.subquery())) or 0
            rows = s.scalars(stmt.order_by(AuditEvent.id.desc()).limit(q.limit).offset(q.offset)).all()
        return list(rows), total
