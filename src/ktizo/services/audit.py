"""The audit trail: written inside the transaction of the change it records, so neither exists without the other."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ktizo.db import Database
from ktizo.db.batch import insert_many, table_of
from ktizo.db.models import AuditEvent, Event, Refusal, Webhook
from ktizo.db.types import utcnow
from ktizo.domain.bounds import as_utc, is_possible_id
from ktizo.services import events, metrics
from ktizo.services.context import Actor

# Re-exported: the values of this service (they live apart so that the CLI starts fast).
from ktizo.services.queries import AuditEntry as AuditEntry
from ktizo.services.queries import AuditQuery as AuditQuery

BATCH = 1000  # rows per statement in record_batch
_AUDIT_INSERT = table_of(AuditEvent).insert()

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
    "bind",
    "secrets_release",
    "audit_prune",
    "user_disable",
    "user_enable",
    "user_role",
    "password_reset",
    "enroll",
    "enroll_refused",
    "cert_issue",
    "cert_pickup",
    "cert_revoke",
    "ca_create",
    "checkin",
    "probe",
    "purge",
    "enrollment_expired",
    "enroll.attempt",
    "agent.collision",
    "agent.collision_rejected",
    "agent.replaced",
    "agent.site_moved",
    "site_key.rotated",
    "site_create",
    "site_update",
    "site_delete",
    "rule_create",
    "rule_update",
    "rule_delete",
    "rule_failed",
    "webhook_create",
    "webhook_update",
    "webhook_delete",
    "apply",
    "gitops_sync",
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
    *,
    refusal_id: int | None = None,
) -> None:
    details = details or {}
    # A Core insert run now, not an ORM object flushed later: a boot storm's first contacts each write an audit
    # row and an event in a savepoint of the group commit, and the ORM flush of those two objects was a third of
    # a first contact. The values are read now, as the ORM object's constructor read them.
    session.execute(
        _AUDIT_INSERT,
        {
            "at": utcnow(),
            "actor": actor.name,
            "actor_type": actor.kind,
            "action": action,
            "device_id": device.id if device is not None else None,
            "device_mac": device.mac_address if device is not None else None,
            "source_ip": actor.source_ip,
            "details": details,
            "refusal_id": refusal_id,
        },
    )
    who = {"name": actor.name, "kind": actor.kind, "source_ip": actor.source_ip}
    events.outbox(session, action, who, device, _scrub_patches(details))
    metrics.audited(session, action, actor.kind, details)  # counted once committed (services/metrics.py)


@dataclass(frozen=True)
class Entry:
    """One audit row of a batch: what ``record`` takes, with the device as a mapping of its columns."""

    actor: Actor
    action: str
    device: Mapping[str, Any]
    details: dict[str, Any]


def record_batch(session: Session, entries: Sequence[Entry], *, at: dt.datetime | None = None) -> None:
    """``record`` for thousands of rows: the audit rows and their events in one statement per ``BATCH``."""
    if not entries:
        return
    now = at or utcnow()
    audits, outbox = [], []
    # An outbox row only for an event someone takes: GitOps, or an enabled webhook (read in this transaction, so a
    # subscription committed before it is seen). A boot storm's download events are otherwise written and at once
    # cleared by the dispatcher, for nobody.
    subscribed: set[str] = set()
    for names in session.scalars(select(Webhook.events).where(Webhook.enabled.is_(True))):
        subscribed.update(names or ())
    for e in entries:
        who = {"name": e.actor.name, "kind": e.actor.kind, "source_ip": e.actor.source_ip}
        audits.append(
            {
                "at": now,
                "actor": e.actor.name,
                "actor_type": e.actor.kind,
                "action": e.action,
                "device_id": e.device["id"],
                "device_mac": e.device.get("mac_address"),
                "source_ip": e.actor.source_ip,
                "details": e.details,
            }
        )
        name = events.event_for(e.action, e.details)
        if name is not None and (name in events.GITOPS_EVENTS or events.wants(subscribed, name)):
            outbox.append(
                {
                    "at": now,
                    "event": name,
                    "action": e.action,
                    "device_id": e.device["id"],
                    "actor": e.actor.name,
                    "actor_type": e.actor.kind,
                    "payload": {
                        "machine": {k: e.device.get(k) for k in events.MACHINE_FIELDS},
                        "actor": who,
                        "details": _scrub_patches(e.details),
                    },
                    "webhooks_pending": True,
                    "gitops_pending": name in events.GITOPS_EVENTS,
                }
            )
        metrics.audited(session, e.action, e.actor.kind, e.details)
    for start in range(0, len(audits), BATCH):
        insert_many(session, table_of(AuditEvent), audits[start : start + BATCH])
    for start in range(0, len(outbox), BATCH):
        insert_many(session, table_of(Event), outbox[start : start + BATCH])


def patch_summary(text: str | None) -> str | None:
    """What the audit log keeps of a patch: never its text (patches can hold secrets), only that it changed."""
    if not text:
        return None
    digest = hashlib.sha256(text.encode()).hexdigest()
    return f"patch ({len(text.encode())} bytes, sha256 {digest[:16]}…)"


class AuditService:
    def __init__(self, db: Database) -> None:
        self.db = db

    def list(self, q: AuditQuery) -> tuple[list[AuditEntry], int]:
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
            rows = list(s.scalars(stmt.order_by(AuditEvent.id.desc()).limit(q.limit).offset(q.offset)).all())
            ids = {r.refusal_id for r in rows if r.refusal_id is not None}
            counts = dict(s.execute(select(Refusal.id, Refusal.count).where(Refusal.id.in_(ids))).all()) if ids else {}
        return [_shown(row, counts) for row in rows], total


def _scrub_patches(details: dict[str, Any]) -> dict[str, Any]:
    value = details.get("patch")
    if isinstance(value, str) and not value.startswith("patch ("):
        details = {**details, "patch": patch_summary(value)}
    elif isinstance(value, dict) and {"from", "to"} <= set(value):
        scrubbed = {
            k: patch_summary(v) if isinstance(v, str) and not v.startswith("patch (") else v for k, v in value.items()
        }
        details = {**details, "patch": scrubbed}
    return details


def _shown(row: AuditEvent, counts: dict[int, int]) -> AuditEntry:
    return AuditEntry(
        id=row.id,
        at=row.at,
        actor=row.actor,
        actor_type=row.actor_type,
        action=row.action,
        device_id=row.device_id,
        device_mac=row.device_mac,
        source_ip=row.source_ip,
        details=_scrub_patches(dict(row.details or {})),
        count=counts.get(row.refusal_id, 1) if row.refusal_id is not None else 1,
    )
