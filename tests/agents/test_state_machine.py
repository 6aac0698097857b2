"""A hypothesis state machine over agents' enrollments (enrollment.md §4.9): hosts enroll, operators approve,
reject, revoke and purge, hosts poll and check in, time passes. After every step:

- nothing is minted while an agent is pending;
- a bundle is picked up at most once, and only for an approved agent;
- a poll answers 202 pending, 200 approved (once), 403 rejected, 404 unknown, purged, expired or picked up;
- after a purge (or a rejection or revocation) no credential of that agent works: its token gets 404 (purge) or
  403 (rejection), its certificates are revoked and refused at check-in.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from ktizo.app.asgi import create_app
from ktizo.app.wiring import build_services
from ktizo.domain.clock import use as use_clock
from ktizo.domain.errors import KtizoError
from ktizo.services.context import Actor
from ktizo.services.registry import Services
from ktizo.settings import Settings
from tests.agents.support import body, machine_id
from tests.clock import ManualClock

TTL_HOURS = 168  # KTIZO_ENROLLMENT_TTL_HOURS's default


@dataclass
class Host:
    """What the model expects of one host."""

    machine_id: str
    token: str
    expires: int  # model hours at which its enrollment dies
    status: str = "pending"  # pending | approved | rejected | purged | expired (never approved, record gone)
    live: bool = True  # its enrollment (and token) exists
    issued: bool = False  # its enrollment's certificate was issued (approval)
    certs: list[bytes] = field(default_factory=list)  # DER of every certificate it picked up


class Enrollments(RuleBasedStateMachine):
    services: Services
    client: TestClient
    clock: ManualClock

    hosts = Bundle("hosts")

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.all_hosts: list[Host] = []

    @rule(target=hosts)
    def enroll(self) -> Host:
        mid = machine_id()
        payload = body(mid, hostname=f"host-{mid[:12]}")  # approved hostnames are unique
        r = self.client.post("/api/v1/enroll", json=payload)
        assert r.status_code == 202, r.text
        host = Host(payload["machine_id"], r.json()["polling_token"], expires=self.now + TTL_HOURS)
        self.all_hosts.append(host)
        return host

    @rule(host=hosts)
    def approve(self, host: Host) -> None:
        may = host.status in ("pending", "rejected") and host.live and not host.issued
        try:
            self.services.agents.approve(Actor.cli(), host.machine_id)
        except KtizoError:
            assert not may, host
            return
        assert may, host
        host.status, host.issued, host.expires = "approved", True, self.now + TTL_HOURS

    @rule(host=hosts)
    def reject(self, host: Host) -> None:
        try:
            self.services.agents.reject(Actor.cli(), host.machine_id)
        except KtizoError:
            assert host.status != "pending", host
            return
        assert host.status == "pending", host
        host.status = "rejected"

    @rule(host=hosts)
    def revoke(self, host: Host) -> None:
        try:
            self.services.agents.revoke(Actor.cli(), host.machine_id)
        except KtizoError:
            assert host.status != "approved", host
            return
        assert host.status == "approved", host
        host.status = "rejected"

    @rule(host=hosts)
    def purge(self, host: Host) -> None:
        try:
            self.services.agents.purge(Actor.cli(), host.machine_id)
        except KtizoError:
            assert host.status in ("purged", "expired"), host
            return
        assert host.status not in ("purged", "expired"), host
        host.status, host.live = "purged", False

    @rule(host=hosts)
    def poll(self, host: Host) -> None:
        r = self.client.get(f"/api/v1/enroll/status/{host.token}")
        if not host.live:
            assert r.status_code == 404, (host, r.text)
        elif host.status == "rejected":
            assert r.status_code == 403, (host, r.text)
        elif host.status == "pending":
            assert r.status_code == 202, (host, r.text)
        else:
            assert host.status == "approved" and host.issued
            assert r.status_code == 200, (host, r.text)
            cert = x509.load_pem_x509_certificate(r.json()["server_crt"].encode())
            host.certs.append(cert.public_bytes(serialization.Encoding.DER))
            host.live = False  # picked up: the token dies with it

    @rule(host=hosts)
    def check_in(self, host: Host) -> None:
        for der in host.certs:
            r = self.client.post(
                "/api/v1/agent/checkin",
                json={"facts": {}},
                headers={"Client-Cert": ":" + base64.b64encode(der).decode() + ":"},  # from the trusted proxy
            )
            assert r.status_code == (200 if host.status == "approved" else 403), (host, r.text)

    @rule(hours=st.sampled_from([1, 100, 200]))
    def time_passes(self, hours: int) -> None:
        self.now += hours
        self.clock.advance(hours=hours)
        self.services.agents.expire()  # the job, as serve runs it every minute
        for host in self.all_hosts:
            if host.live and host.expires <= self.now:
                host.live = False
                if host.status == "pending":
                    host.status = "expired"

    @invariant()
    def nothing_minted_while_pending_and_nothing_valid_once_rejected(self) -> None:
        for agent in self.services.agents.list():
            certs = self.services.agents.certificates(agent.id)
            if agent.status == "pending":
                assert certs == []
            if agent.status == "rejected":
                assert all(c.revoked_at is not None for c in certs)
            assert sum(c.revoked_at is None for c in certs) <= 1


@pytest.fixture
def machine(tmp_path: Path, database_url: str) -> Iterator[type[Enrollments]]:
    clock = ManualClock()
    with use_clock(clock):
        config = Settings(
            data_dir=tmp_path / "data",
            database_url=database_url,
            last_seen_interval=0,
            long_poll_seconds=0,
            trusted_proxies=["10.0.0.0/24"],
            new_devices_per_minute=0,  # every host here comes from one address, and the test's clock stands still
        )
        services = build_services(config)
        with TestClient(create_app(config, services), client=("10.0.0.9", 4000)) as client:
            Enrollments.services, Enrollments.client, Enrollments.clock = services, client, clock
            yield Enrollments
        services.db.dispose()


def test_enrollment_state_machine(machine: type[Enrollments]) -> None:
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=25,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )
