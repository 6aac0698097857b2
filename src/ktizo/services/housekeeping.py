"""What the background jobs do: discovered machines nobody approved expire, used and expired console codes are
deleted, the audit log (with the refusal counters) is kept for ``KTIZO_AUDIT_RETENTION_DAYS``, and events the outbox
has handed on are kept for ``KTIZO_EVENT_RETENTION_DAYS`` (with their webhook delivery log).

Each is one transaction. On PostgreSQL several replicas may run the same job at once; ``FOR UPDATE SKIP LOCKED``
keeps them from doing the same rows twice (a row deleted twice is harmless, a row audited twice is not)."""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

from sqlalchemy import delete, or_, select, update
from sqlalchemy.engine import CursorResult

from ktizo.db import Database
from ktizo.db.models import AuditEvent, AuditRetention, Device, DeviceCode, Event, Refusal
from ktizo.db.types import utcnow
from ktizo.domain.devices import DeviceStatus, MachineKind, Source
from ktizo.services import audit
from ktizo.services.context import Actor
from ktizo.services.device_flow import ACCESS_TOKEN_TTL

BATCH = 1000


class Housekeeping:
    def __init__(
        self,
        db: Database,
        *,
        discovery_timeout: dt.timedelta,
        audit_retention: dt.timedelta,
        event_retention: dt.timedelta = dt.timedelta(days=7),
        gitops: bool = False,
    ) -> None:
        self.db = db
        self.discovery_timeout = discovery_timeout
        self.audit_retention = audit_retention
        self.event_retention = event_retention
        self.gitops = gitops  # whether the GitOps writer takes events (else nobody clears gitops_pending)

    def prune_events(self) -> int:
        """Delete outbox events older than the retention that every reader has handed on (their deliveries go with
        them: a delivery is retried for 24 hours, the retention is days)."""
        if self.event_retention <= dt.timedelta(0):
            return 0
        handed_on = [Event.webhooks_pending.is_(False)]
        if self.gitops:
            handed_on.append(Event.gitops_pending.is_(False))
        with self.db.write() as s:
            old = select(Event.id).where(Event.at < utcnow() - self.event_retention, *handed_on).limit(BATCH * 10)
            result = s.execute(delete(Event).where(Event.id.in_(old.scalar_subquery())))
            return int(cast("CursorResult[Any]", result).rowcount or 0)

    def expire_discovered(self, older_than: dt.timedelta | None = None) -> int:
        """Remove pending devices that were discovered (not pre-registered) and never approved in time."""
        cutoff = utcnow() - (older_than if older_than is not None else self.discovery_timeout)
        actor = Actor.system("expiry")
        with self.db.write() as s:
            stmt = (
                select(Device)
                .where(
                    Device.status == DeviceStatus.PENDING.value,
                    Device.source != Source.MANUAL.value,
                    Device.kind == MachineKind.TALOS.value,  # agents expire with their enrollment (services.agents)
                    Device.first_seen < cutoff,
                )
                .limit(BATCH)
            )
            if s.get_bind().dialect.name == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True)
            rows = list(s.scalars(stmt))
            for device in rows:
                audit.record(
                    s, actor, "expire", device, {"source": device.source, "first_seen": device.first_seen.isoformat()}
                )
            if rows:
                s.execute(delete(Device).where(Device.id.in_([d.id for d in rows])))
        return len(rows)

    def expire_device_codes(self) -> int:
        """Console codes past use: pending ones past their expiry become expired, and codes that can no longer
        matter (expired, denied, or consumed with a token past its life) are deleted."""
        now = utcnow()
        with self.db.write() as s:
            s.execute(
                update(DeviceCode)
                .where(DeviceCode.status.in_(("pending", "approved")), DeviceCode.expires_at <= now)
                .values(status="expired")
            )
            dead = or_(
                DeviceCode.status.in_(("expired", "denied")) & (DeviceCode.expires_at <= now),
                (DeviceCode.status == "consumed") & (DeviceCode.token_expires_at <= now),
            )
            ids = select(DeviceCode.id).where(dead, DeviceCode.created_at <= now - ACCESS_TOKEN_TTL).limit(BATCH)
            result = s.execute(delete(DeviceCode).where(DeviceCode.id.in_(ids.scalar_subquery())))
        return int(cast("CursorResult[Any]", result).rowcount or 0)

    def prune_audit(self) -> int:
        """Delete audit rows (and refusal counters) older than the retention. The audit log's triggers refuse
        every DELETE of a row newer than ``audit_retention.prune_before``, which only this moves."""
        if self.audit_retention <= dt.timedelta(0):
            return 0
        cutoff = utcnow() - self.audit_retention
        with self.db.write() as s:
            row = s.get(AuditRetention, 1, with_for_update=True)
            if row is None:
                s.add(AuditRetention(id=1, prune_before=cutoff))
            elif row.prune_before < cutoff:
                row.prune_before = cutoff
            s.flush()
            old = select(AuditEvent.id).where(AuditEvent.at < cutoff).limit(BATCH * 10)
            result = s.execute(delete(AuditEvent).where(AuditEvent.id.in_(old.scalar_subquery())))
            pruned = int(cast("CursorResult[Any]", result).rowcount or 0)
            s.execute(delete(Refusal).where(Refusal.last_at < cutoff))
            if pruned:
                audit.record(
                    s,
                    Actor.system("retention"),
                    "audit_prune",
                    None,
                    {"deleted": pruned, "before": cutoff.isoformat(), "retention_days": self.audit_retention.days},
                )
        return pruned
