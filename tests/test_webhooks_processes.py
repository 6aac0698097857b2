"""Webhooks across real processes: ``ktizo serve`` killed in the middle of a delivery and restarted (the delivery
re-sent once, with the same id, after its lease; an event written while no server ran delivered too; a receiver
that is down and comes up later gets it), and two processes on one PostgreSQL delivering each event once.

A restarted server runs on the wall clock, which the test cannot move: where the test would otherwise wait out a
35 s lease or a 20 s backoff, it moves ``claimed_until`` / ``next_attempt_at`` to now, saying so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select, update

from ktizo.db.models import WebhookDelivery
from ktizo.db.types import utcnow
from ktizo.services.context import Actor
from ktizo.services.queries import DeviceChanges
from ktizo.services.registry import Services
from tests.agents.test_mtls import Server, start
from tests.factories import approved, next_mac
from tests.webhook_receiver import Receiver, free_port, verify

SECRET = "s3cret-s3cret-s3cret"


def rows(services: Services) -> list[WebhookDelivery]:
    with services.db.read() as s:
        return list(s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


def until(what: Callable[[], bool], timeout: float = 30.0, message: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return
        time.sleep(0.1)
    raise AssertionError(message or "timed out")


def stop(server: Server, sig: int = signal.SIGTERM) -> None:
    server.proc.send_signal(sig)
    try:
        server.proc.wait(15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(5)


@pytest.mark.slow
def test_serve_killed_mid_delivery_and_restarted_delivers_each_event_once(tmp_path: Path, database_url: str) -> None:
    port = free_port()
    receiver = Receiver(port)
    receiver.release.clear()  # the receiver takes the request and holds its answer
    first = start(tmp_path / "one", database_url)
    try:
        first.services.webhooks.create(Actor.system(), "ops", receiver.url, ["device.approved"], secret=SECRET)
        approved(first.services, hostname="node-01")
        receiver.wait_for(1)
        # The server sent it and waits for the answer: killed now, it never records the outcome.
        stop(first, signal.SIGKILL)
    except BaseException:
        stop(first, signal.SIGKILL)
        raise
    finally:
        receiver.release.set()
    services = first.services
    (row,) = rows(services)
    assert (row.status, row.attempts) == ("pending", 0) and row.claimed_until is not None
    killed_id = receiver.requests[0].delivery
    assert row.delivery_id == killed_id
    receiver.stop()  # and now the receiver is down too
    approved(services, hostname="node-02")  # an event written while no server runs
    with services.db.write() as s:  # the 35 s lease runs out (the killed server's claim)
        s.execute(update(WebhookDelivery).values(claimed_until=utcnow()))

    second = start(tmp_path / "two", database_url)
    try:
        until(lambda: [r.attempts for r in rows(services)] == [1, 1], message=f"{rows(services)}")
        assert all("refused" in (r.last_error or "").lower() for r in rows(services))
        receiver = Receiver(port)  # the receiver comes back
        with services.db.write() as s:  # the 20 s backoff passes
            s.execute(update(WebhookDelivery).values(next_attempt_at=utcnow()))
        until(lambda: [r.status for r in rows(services)] == ["delivered", "delivered"], message=f"{rows(services)}")
        time.sleep(4.5)  # two more rounds of the job: nothing more may arrive
        got = receiver.by_delivery()
        assert got[killed_id] == 1 and len(got) == 2 and set(got.values()) == {1}
        assert rows(services)[0].delivery_id == killed_id  # the same id as the killed server's send
        for request in receiver.requests:
            assert verify(SECRET, request.headers["x-ktizo-signature"], request.body)
    finally:
        stop(second)
        second.services.db.dispose()
        receiver.stop()
        services.db.dispose()


_DELIVERER = """
import sys, time
from pathlib import Path
from ktizo.app import build_services
from ktizo.settings import Settings
services = build_services(Settings(data_dir=Path(sys.argv[2]), database_url=sys.argv[1]))
stop = Path(sys.argv[3])
while not stop.exists():
    services.webhooks.run()
    time.sleep(0.01)
"""


@pytest.mark.slow
@pytest.mark.postgres_only  # two processes on one PostgreSQL
def test_two_processes_on_one_postgresql_deliver_each_event_once(
    tmp_path: Path, database_url: str, services: Services
) -> None:
    receiver = Receiver()
    services.webhooks.create(Actor.system(), "all", receiver.url, ["*"], secret=SECRET)
    services.webhooks.create(Actor.system(), "created", receiver.url + "/c", ["device.created"], secret=SECRET)
    flag = tmp_path / "stop"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DELIVERER, database_url, str(tmp_path / f"d{n}"), str(flag)],
            env=env,
            stdout=(tmp_path / f"p{n}.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        for n in range(2)
    ]
    try:
        for _ in range(60):  # events arrive while both dispatch and deliver
            services.devices.create(Actor.system(), DeviceChanges(mac_address=next_mac()))
        receiver.wait_for(120, timeout=60)
        until(lambda: {r.status for r in rows(services)} == {"delivered"} and len(rows(services)) == 120)
        time.sleep(1.0)
        flag.touch()
        for p in procs:
            p.wait(30)
            assert p.returncode == 0, (tmp_path / "p0.log").read_text() + (tmp_path / "p1.log").read_text()
    finally:
        flag.touch()
        for p in procs:
            if p.poll() is None:
                p.kill()
        receiver.stop()
    counts = receiver.by_delivery()
    assert len(counts) == 120 and set(counts.values()) == {1}
    assert len(receiver.requests) == 120
