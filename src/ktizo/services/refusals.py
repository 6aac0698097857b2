"""Refusals counted, not logged one by one: an attacker hammering a door (wrong passwords, a spoofed MAC, guessed
console codes) adds one to a counter per subject, address and minute. The first refusal of each minute is also an
audit row, which shows the count; the throttles sum the counters, in the database, so every replica agrees."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ktizo.db.models import Refusal
from ktizo.db.types import utcnow
from ktizo.services import audit
from ktizo.services.audit import DeviceRef
from ktizo.services.context import Actor


def minute_of(moment: dt.datetime) -> dt.datetime:
    return moment.replace(second=0, microsecond=0)


def refuse(
    s: Session,
    actor: Actor,
    action: str,
    subject: str,
    device: DeviceRef | None = None,
    details: dict[str, Any] | None = None,
) -> int:
    """Count one refusal of ``subject`` (a MAC, a user name, an operator) from the actor's address; the first of the
    minute is written to the audit log with ``details``. Returns how many there were this minute."""
    now = utcnow()
    values = {
        "action": action,
        "subject": subject[:200],
        "source_ip": actor.source_ip or "",
        "minute": minute_of(now),
        "count": 1,
        "first_at": now,
        "last_at": now,
        "device_id": device.id if device is not None else None,
    }
    insert = postgresql.insert if s.get_bind().dialect.name == "postgresql" else sqlite.insert
    new = insert(Refusal).values(**values)
    upsert = new.on_conflict_do_update(
        index_elements=["action", "subject", "source_ip", "minute"],
        set_={"count": Refusal.count + 1, "last_at": new.excluded.last_at},
    ).returning(Refusal.id, Refusal.count)
    refusal_id, count = s.execute(upsert).one()
    if count == 1:
        audit.record(s, actor, action, device, details, refusal_id=refusal_id)
    return int(count)


def count(
    s: Session, action: str, since: dt.datetime, *, subject: str | None = None, source_ip: str | None = None
) -> tuple[int, dt.datetime | None]:
    """How many refusals of ``action`` since ``since``, and when the oldest counted one happened. Counted by the
    minute: a minute's refusals count while its last one is within the window."""
    stmt = select(func.coalesce(func.sum(Refusal.count), 0), func.min(Refusal.last_at)).where(
        Refusal.action == action,
        Refusal.minute >= minute_of(since),  # the index's range; the next condition is the exact one
        Refusal.last_at >= since,
    )
    if subject is not None:
        stmt = stmt.where(Refusal.subject == subject[:200])
    if source_ip is not None:
        stmt = stmt.where(Refusal.source_ip == source_ip)
    total, oldest = s.execute(stmt).one()
    return int(total), oldest


def forgive(s: Session, action: str, subject: str, source_ip: str | None) -> None:
    """Wipe the slate of ``subject`` from this address (a successful sign-in forgives earlier typos)."""
    s.execute(
        delete(Refusal).where(
            Refusal.action == action, Refusal.subject == subject[:200], Refusal.source_ip == (source_ip or "")
        )
    )


def tally(s: Session, action: str, subject: str, source_ip: str | None) -> int:
    """Count one more of ``action`` for ``subject`` from this address this minute, with no audit row (a budget of
    requests, or failures a lockout sums); returns this minute's count."""
    now = utcnow()
    values = {
        "action": action,
        "subject": subject[:200],
        "source_ip": source_ip or "",
        "minute": minute_of(now),
        "count": 1,
        "first_at": now,
        "last_at": now,
        "device_id": None,
    }
    insert = postgresql.insert if s.get_bind().dialect.name == "postgresql" else sqlite.insert
    new = insert(Refusal).values(**values)
    upsert = new.on_conflict_do_update(
        index_elements=["action", "subject", "source_ip", "minute"],
        set_={"count": Refusal.count + 1, "last_at": new.excluded.last_at},
    ).returning(Refusal.count)
    return int(s.execute(upsert).scalar_one())
