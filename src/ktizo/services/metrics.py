"""The hook between the audit log and the metrics: ``audit.record`` calls ``audited`` for every row, and the rows
worth counting reach the installed ``Metrics`` (``services.prometheus``) once their transaction has committed.
Cheap to import (no prometheus_client) and a no-op until an app installs its metrics."""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any, Protocol

from sqlalchemy.orm import Session

from ktizo.db import Database
from ktizo.db.engine import after_commit

# The audit actions the counters count; every other action costs the hook one set lookup.
WATCHED = frozenset(
    {"approve", "reject", "config_download", "identity_mismatch", "enroll", "enroll_refused", "enroll.attempt"}
)


class Sink(Protocol):
    """What the hook feeds (``services.prometheus.Metrics``)."""

    db: Database

    def observe(self, action: str, actor_kind: str, details: dict[str, Any]) -> None: ...
    def observe_delivery(self, outcome: str) -> None: ...


# -- the audit hook ------------------------------------------------------------------------------------------

# Installed metrics by the identity of their database's write engine (the bind of every session that writes).
_installed: weakref.WeakValueDictionary[int, Sink] = weakref.WeakValueDictionary()


def install(metrics: Sink) -> None:
    """Feed ``metrics`` from the audit rows written to its database (until it is garbage)."""
    _installed[id(metrics.db.write_engine)] = metrics


def audited(session: Session, action: str, actor_kind: str, details: dict[str, Any]) -> None:
    """Called by ``audit.record`` for every audit row: counts it once its transaction has committed (a rolled-back
    approval was never an approval), or once the group commit holding it has (``db.writer.deferred_callbacks``)."""
    if action not in WATCHED or not _installed:
        return
    metrics = _installed.get(id(session.get_bind()))
    if metrics is None:
        return
    after_commit(lambda: metrics.observe(action, actor_kind, details))


def observe(action: str, actor_kind: str, details: dict[str, Any], db: Database | None = None) -> None:
    """Count one audit event now, in the metrics of ``db`` (or all installed ones)."""
    for metrics in _targets(db):
        metrics.observe(action, actor_kind, details)


def observe_delivery(outcome: str, db: Database | None = None) -> None:
    """A webhook delivery attempt ended: ``delivered``, ``retry`` (failed, will be retried) or ``failed`` (given up).
    Call it once per attempt, after the delivery's new state is committed."""
    for metrics in _targets(db):
        metrics.observe_delivery(outcome)


def _targets(db: Database | None) -> Iterable[Sink]:
    if db is not None:
        found = _installed.get(id(db.write_engine))
        return [found] if found is not None else []
    return list(_installed.values())
