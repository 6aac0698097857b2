"""Prometheus metrics: what the fleet looks like (read from the database at scrape time, so every replica reports
the same truth) and what happened in this process (counters fed by the audit log through ``services.metrics``,
which imports no prometheus_client so that the CLI starts fast; request latency by route template).

Each app owns a ``Metrics`` with a private registry (tests build many apps in one process); ``metrics.install``
makes it the one the audit hook feeds for its database. Counters are per process, but the workers of one
``ktizo serve --workers N`` report their sum (``render``); across replicas Prometheus sums them (``sum by (…)``).
Label values are bounded sets (actor kinds, results, route templates), never a MAC, a hostname or a token."""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ktizo.db import Database
from ktizo.db.models import Device, Event, WebhookDelivery
from ktizo.db.types import utcnow

log = logging.getLogger(__name__)

ACTOR_KINDS = ("user", "rule", "site", "system", "device")
ENROLL_RESULTS = ("pending", "active", "refused")
DELIVERY_OUTCOMES = ("delivered", "retry", "failed")
MACHINE_KINDS = ("talos", "agent")
MACHINE_STATUSES = ("pending", "approved", "rejected")
DELIVERY_STATUSES = ("pending", "delivered", "failed")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Seconds. Held config requests (long poll) last up to KTIZO_LONG_POLL_SECONDS, hence the long tail.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """One app's metrics: a private registry holding the process counters, the latency histogram and the collector
    that reads the database (cached for ``cache_seconds``, so a scrape storm is a query storm only once)."""

    def __init__(
        self,
        db: Database,
        held: HeldSource | None = None,
        *,
        version: str,
        cache_seconds: float = 2.0,
        gitops: bool = True,
    ):
        self.db = db
        self.registry = CollectorRegistry()
        r = self.registry
        self.approvals = Counter(
            "ktizo_approvals", "Machines approved, by who approved them", ["actor_kind"], registry=r
        )
        self.rejections = Counter(
            "ktizo_rejections", "Machines rejected (or revoked), by who rejected them", ["actor_kind"], registry=r
        )
        self.downloads = Counter("ktizo_config_downloads", "Talos configs handed to an approved machine", registry=r)
        self.enrollments = Counter(
            "ktizo_enrollments", "Agent enrollments (both doors), by result", ["result"], registry=r
        )
        self.mismatches = Counter(
            "ktizo_identity_mismatches",
            "Audited identity mismatches: the first of each minute per machine and source address",
            registry=r,
        )
        self.deliveries = Counter(
            "ktizo_webhook_deliveries", "Webhook delivery attempts, by outcome", ["outcome"], registry=r
        )
        self.latency = Histogram(
            "ktizo_http_request_duration_seconds",
            "HTTP request latency by route template (held config requests included)",
            ["method", "route", "status_class"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        for kind in ACTOR_KINDS:  # every series exists from the start: a rate over a missing series is no data
            self.approvals.labels(kind)
            self.rejections.labels(kind)
        for result in ENROLL_RESULTS:
            self.enrollments.labels(result)
        for outcome in DELIVERY_OUTCOMES:
            self.deliveries.labels(outcome)
        self._children: dict[tuple[str, str, int], Any] = {}
        self.state = StateCollector(db, held, version=version, cache_seconds=cache_seconds, gitops=gitops)
        r.register(self.state)

    def render(self) -> bytes:
        """The Prometheus text format. Under ``ktizo serve --workers N`` (prometheus_client's multiprocess mode,
        ``PROMETHEUS_MULTIPROC_DIR``), the counters and histograms of every worker, added up: a scrape reaches one
        worker, and must not show only that one's share."""
        shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not shared:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=shared)  # type: ignore[no-untyped-call]
        registry.register(self.state)
        return generate_latest(registry)

    def observe(self, action: str, actor_kind: str, details: dict[str, Any]) -> None:
        """Count one committed audit row."""
        if action == "approve":
            self.approvals.labels(_bounded(actor_kind, ACTOR_KINDS)).inc()
        elif action == "reject":
            self.rejections.labels(_bounded(actor_kind, ACTOR_KINDS)).inc()
        elif action == "config_download":
            self.downloads.inc()
        elif action == "identity_mismatch":
            self.mismatches.inc()
        elif action == "enroll":
            self.enrollments.labels("pending").inc()
        elif action == "enroll_refused":
            if details.get("reason") != "unknown token":  # a poll with a dead token is not an enrollment
                self.enrollments.labels("refused").inc()
        elif action == "enroll.attempt":
            self.enrollments.labels(_bounded(str(details.get("result")), ENROLL_RESULTS)).inc()

    def observe_delivery(self, outcome: str) -> None:
        self.deliveries.labels(_bounded(outcome, DELIVERY_OUTCOMES)).inc()

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status // 100)
        child = self._children.get(key)
        if child is None:
            child = self.latency.labels(method if method in METHODS else "other", route, f"{status // 100}xx")
            self._children[key] = child
        child.observe(seconds)


class HeldSource(Protocol):
    """Anything with a ``held`` count (``ConfigDownload``): read at scrape time, it is this process's own."""

    @property
    def held(self) -> int: ...


def _bounded(value: str, known: tuple[str, ...]) -> str:
    return value if value in known else "other"


# -- state from the database ---------------------------------------------------------------------------------


@dataclass
class _Snapshot:
    machines: dict[tuple[str, str], int] = field(default_factory=dict)
    deliveries: dict[str, int] = field(default_factory=dict)
    oldest_delivery: dt.datetime | None = None
    gitops_pending: int = 0
    oldest_gitops: dt.datetime | None = None


class StateCollector(Collector):
    """Gauges read at scrape time: machines by kind and status, the webhook queue and the GitOps backlog (from the
    database, a few aggregate queries cached for ``cache_seconds``), held config requests (this process)."""

    def __init__(
        self, db: Database, held: HeldSource | None, *, version: str, cache_seconds: float, gitops: bool = True
    ) -> None:
        self.db = db
        self.gitops = gitops  # without a GitOps repository nobody takes those events: no backlog to report
        self.held = held
        self.version = version
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._snapshot: _Snapshot | None = None
        self._taken = 0.0

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration; collect() must not query the database then

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("ktizo_build_info", "Ktizo's version", labels=["version"])
        info.add_metric([self.version], 1)
        yield info
        if self.held is not None:
            yield GaugeMetricFamily(
                "ktizo_held_long_polls", "Config requests held open in this process (long poll)", value=self.held.held
            )
        snapshot = self._read()
        yield GaugeMetricFamily(
            "ktizo_database_up", "Whether this scrape could read the database", value=int(snapshot is not None)
        )
        if snapshot is None:
            return
        now = utcnow()
        machines = GaugeMetricFamily("ktizo_machines", "Machines in the registry", labels=["kind", "status"])
        for (kind, status), n in sorted(snapshot.machines.items()):
            machines.add_metric([kind, status], n)
        yield machines
        deliveries = GaugeMetricFamily("ktizo_webhook_deliveries", "Webhook deliveries by status", labels=["status"])
        for status, n in sorted(snapshot.deliveries.items()):
            deliveries.add_metric([status], n)
        yield deliveries
        yield GaugeMetricFamily(
            "ktizo_webhook_queue_oldest_seconds",
            "Age of the oldest webhook delivery still pending (0: none)",
            value=_age(now, snapshot.oldest_delivery),
        )
        yield GaugeMetricFamily(
            "ktizo_gitops_pending_events",
            "Events not yet written to the GitOps repository",
            value=snapshot.gitops_pending,
        )
        yield GaugeMetricFamily(
            "ktizo_gitops_lag_seconds",
            "Age of the oldest event not yet written to the GitOps repository (0: none)",
            value=_age(now, snapshot.oldest_gitops),
        )

    def _read(self) -> _Snapshot | None:
        with self._lock:  # concurrent scrapes wait for one query, not one each
            if self._snapshot is not None and time.monotonic() - self._taken < self.cache_seconds:
                return self._snapshot
            try:
                with self.db.read() as s:
                    snapshot = _query(s, gitops=self.gitops)
            except Exception:  # a scrape still answers (with ktizo_database_up 0) when the database does not
                log.warning("metrics: the database could not be read", exc_info=True)
                self._snapshot = None
                return None
            self._snapshot, self._taken = snapshot, time.monotonic()
            return snapshot


def _query(s: Session, *, gitops: bool = True) -> _Snapshot:
    snap = _Snapshot()
    snap.machines = {(k, st): 0 for k in MACHINE_KINDS for st in MACHINE_STATUSES}
    for kind, status, n in s.execute(
        select(Device.kind, Device.status, func.count()).group_by(Device.kind, Device.status)
    ):
        snap.machines[(kind, status)] = int(n)
    snap.deliveries = dict.fromkeys(DELIVERY_STATUSES, 0)
    for status, n in s.execute(select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)):
        snap.deliveries[status] = int(n)
    snap.oldest_delivery = s.scalar(
        select(func.min(WebhookDelivery.created_at)).where(WebhookDelivery.status == "pending")
    )
    if gitops:
        pending = select(func.count(), func.min(Event.at)).where(Event.gitops_pending.is_(True))
        count, oldest = s.execute(pending).one()
        snap.gitops_pending, snap.oldest_gitops = int(count), oldest
    return snap


def _age(now: dt.datetime, then: dt.datetime | None) -> float:
    if then is None:
        return 0.0
    if then.tzinfo is None:
        then = then.replace(tzinfo=dt.UTC)
    return max(0.0, (now - then).total_seconds())
