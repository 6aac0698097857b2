"""Discovered records expire: pending machines nobody approved are removed after the discovery timeout, by a
background job, audited; approved, rejected and pre-registered machines stay."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from ktizo.app import build_services, create_app
from ktizo.db.models import AuditEvent, Device, DeviceCode, Event
from ktizo.db.types import utcnow
from ktizo.jobs.runner import Job, JobRunner, default_jobs
from ktizo.services.boot import Claim, NotApproved
from ktizo.services.context import Actor
from ktizo.services.devices import DeviceChanges
from ktizo.services.ipxe import BootFacts
from ktizo.services.registry import Services
from ktizo.settings import Settings
from tests.clock import ManualClock

DAY = dt.timedelta(hours=24)
DISCOVERED = {
    "config_fetch": "52:54:00:00:01:01",
    "dhcp": "52:54:00:00:01:02",
    "ipxe": "52:54:00:00:01:03",
    "register": "52:54:00:00:01:04",
    "device_code": "52:54:00:00:01:05",
}
KEPT = {
    "manual": "52:54:00:00:02:01",
    "approved": "52:54:00:00:02:02",
    "rejected": "52:54:00:00:02:03",
    "approved_manual": "52:54:00:00:02:04",
    "fresh": "52:54:00:00:02:05",
}


@pytest.fixture
def oauth_services(tmp_path: Path, database_url: str) -> Iterator[Services]:
    """Services with the device flow on, so a machine can be discovered through every door."""
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        last_seen_interval=0,
        long_poll_seconds=0,
        oauth_enabled=True,
    )
    services = build_services(settings)
    yield services
    services.db.dispose()


def discover_everywhere(services: Services) -> None:
    with pytest.raises(NotApproved):
        services.boot.fetch_config(Claim(mac=DISCOVERED["config_fetch"], source_ip="10.0.0.9"))
    assert services.dhcp.event("add", DISCOVERED["dhcp"], "10.0.0.50", None) == "registered"
    services.ipxe.machine_script(BootFacts(mac=DISCOVERED["ipxe"], arch="x86_64"), "http://ktizo", "10.0.0.11")
    services.devices.register(DISCOVERED["register"], "10.0.0.12")
    services.device_flow.start({"client_id": "ktizo", "mac": DISCOVERED["device_code"]}, "http://ktizo", "10.0.0.13")
    system = Actor.system()
    services.devices.create(system, DeviceChanges(mac_address=KEPT["manual"]))
    approved, _ = services.devices.register(KEPT["approved"], None)
    services.devices.approve(system, approved.id, DeviceChanges())
    rejected, _ = services.devices.register(KEPT["rejected"], None)
    services.devices.reject(system, rejected.id)
    manual = services.devices.create(system, DeviceChanges(mac_address=KEPT["approved_manual"]))
    services.devices.approve(system, manual.id, DeviceChanges())


def sources(services: Services) -> dict[str | None, tuple[str, str]]:
    with services.db.read() as s:
        return {d.mac_address: (d.source, d.status) for d in s.scalars(select(Device))}


def expire_events(services: Services) -> list[AuditEvent]:
    with services.db.read() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == "expire").order_by(AuditEvent.id)))


def test_discovered_pending_devices_expire_with_an_audit_event_each(
    oauth_services: Services, clock: ManualClock
) -> None:
    services = oauth_services
    discover_everywhere(services)
    assert {source for source, _ in sources(services).values()} >= set(DISCOVERED)
    clock.advance((DAY + dt.timedelta(minutes=1)).total_seconds())
    services.devices.register(KEPT["fresh"], None)  # discovered a moment ago

    assert services.housekeeping.expire_discovered(DAY) == len(DISCOVERED)

    left = sources(services)
    assert set(left) == set(KEPT.values())
    assert left[KEPT["manual"]] == ("manual", "pending")
    assert left[KEPT["fresh"]] == ("register", "pending")
    events = expire_events(services)
    assert sorted(str(e.device_mac) for e in events) == sorted(DISCOVERED.values())
    for e in events:
        assert (e.actor, e.actor_type) == ("expiry", "system")
        assert e.device_id is not None
        assert e.details["source"] == next(k for k, v in DISCOVERED.items() if v == e.device_mac)
        assert "first_seen" in e.details
    # The console code of an expired machine goes with it.
    with services.db.read() as s:
        assert s.scalar(select(func.count()).select_from(DeviceCode)) == 0

    # Nothing left to do: a second run removes nothing and audits nothing.
    assert services.housekeeping.expire_discovered(DAY) == 0
    assert len(expire_events(services)) == len(DISCOVERED)


def test_nothing_expires_before_the_timeout(oauth_services: Services, clock: ManualClock) -> None:
    discover_everywhere(oauth_services)
    clock.advance((DAY - dt.timedelta(minutes=5)).total_seconds())
    assert oauth_services.housekeeping.expire_discovered(DAY) == 0
    assert len(sources(oauth_services)) == len(DISCOVERED) + len(KEPT) - 1
    assert expire_events(oauth_services) == []


def test_an_expired_machine_that_boots_again_is_pending_anew(services: Services, clock: ManualClock) -> None:
    services.devices.register(DISCOVERED["register"], None)
    clock.advance((DAY * 2).total_seconds())
    assert services.housekeeping.expire_discovered(DAY) == 1
    device, created = services.devices.register(DISCOVERED["register"], None)
    assert created and device.status == "pending"


def test_the_job_runner_runs_expiry_until_stopped(services: Services, clock: ManualClock) -> None:
    services.devices.register(DISCOVERED["register"], None)
    clock.advance((DAY * 2).total_seconds())
    runs: list[int] = []

    def expire() -> int:
        done = services.housekeeping.expire_discovered(DAY)
        runs.append(done)
        return done

    failures = 0

    def flaky() -> int:
        nonlocal failures
        failures += 1
        if failures == 1:
            raise RuntimeError("database away")  # a failing job is retried next round, not fatal
        return 0

    async def main() -> None:
        runner = JobRunner([Job("expire-discovered", 0.05, expire), Job("flaky", 0.05, flaky)])
        runner.start()
        deadline = time.monotonic() + 5
        while (len(runs) < 3 or failures < 3) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await runner.stop()

    asyncio.run(main())
    assert runs[0] == 1 and all(n == 0 for n in runs[1:]) and len(runs) >= 3
    assert failures >= 3
    stopped_at = len(runs)
    time.sleep(0.2)
    assert len(runs) == stopped_at  # stopped means stopped
    assert [e.device_mac for e in expire_events(services)] == [DISCOVERED["register"]]


def test_default_jobs_expire_after_the_configured_timeout(settings: Settings, clock: ManualClock) -> None:
    services = build_services(settings.model_copy(update={"discovery_timeout_hours": 2}))
    try:
        services.devices.register(DISCOVERED["register"], None)
        clock.advance(hours=1)
        services.devices.register(DISCOVERED["dhcp"], None)
        clock.advance(hours=1, seconds=1)
        jobs = {job.name: job for job in default_jobs(services)}
        expected = {"expire-discovered", "expire-device-codes", "expire-enrollments", "prune-audit", "prune-events"}
        expected.add("webhooks")
        assert set(jobs) == expected
        assert jobs["expire-discovered"].every <= 300
        assert jobs["expire-discovered"].run() == 1  # two hours and a second old; the other is one hour old
        assert set(sources(services)) == {DISCOVERED["dhcp"]}
    finally:
        services.db.dispose()


def test_the_server_runs_the_expiry_job(
    tmp_path: Path, database_url: str, services: Services, clock: ManualClock
) -> None:
    services.devices.register(DISCOVERED["register"], None)
    clock.advance((dt.timedelta(hours=2)).total_seconds())
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url, discovery_timeout_hours=1)
    served = build_services(settings)
    try:
        with TestClient(create_app(settings, served)):
            deadline = time.monotonic() + 5
            while sources(services) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sources(services) == {}
    finally:
        served.db.dispose()
    assert [e.actor for e in expire_events(services)] == ["expiry"]


def test_concurrent_runs_remove_each_device_once(services: Services, settings: Settings) -> None:
    """Two replicas running the job at the same moment (PostgreSQL: SELECT … FOR UPDATE SKIP LOCKED)."""
    count = 150
    with services.db.write() as s:
        now = utcnow()
        for i in range(count):
            s.add(
                Device(
                    mac_address=f"52:54:00:10:{i // 256:02x}:{i % 256:02x}",
                    status="pending",
                    role="worker",
                    notes="",
                    source="dhcp",
                    facts={},
                    first_seen=now - DAY * 2,
                    last_seen=now,
                    revision=1,
                )
            )
    replicas = [build_services(settings) for _ in range(2)]
    try:
        barrier = threading.Barrier(len(replicas))
        results: list[int] = []
        errors: list[BaseException] = []

        def run(replica: Services) -> None:
            try:
                barrier.wait()
                results.append(replica.housekeeping.expire_discovered(DAY))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(r,)) for r in replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        for r in replicas:
            r.db.dispose()
    assert errors == []
    assert sum(results) == count
    events = expire_events(services)
    assert len(events) == count
    assert len({e.device_id for e in events}) == count
    assert sources(services) == {}


def test_events_handed_on_are_pruned_after_the_retention(services: Services, clock: ManualClock) -> None:
    device = services.devices.create(Actor.system(), DeviceChanges(mac_address="52:54:00:00:77:01"))
    services.devices.approve(Actor.system(), device.id, DeviceChanges())
    with services.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Event)) == 2  # device.created, device.approved
    assert services.housekeeping.prune_events() == 0  # not handed on to webhooks yet
    services.webhooks.dispatch()
    clock.advance(days=6)
    assert services.housekeeping.prune_events() == 0  # handed on, but younger than the 7 days kept
    clock.advance(days=1, seconds=1)
    assert services.housekeeping.prune_events() == 2
    with services.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Event)) == 0
        assert s.scalar(select(func.count()).select_from(AuditEvent)) == 2  # the audit log is kept apart
