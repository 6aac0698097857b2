"""Long poll: a pending machine's config request is held open and answered the moment an operator approves it,
so Talos's exponential backoff (1, 3, 7 … 4095 s) never stands between the click and the machine."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from ktizo.app import build_services, create_app
from ktizo.domain.users import UserRole
from ktizo.services.context import Actor
from ktizo.services.devices import DeviceChanges
from ktizo.services.registry import Services
from ktizo.settings import Settings
from ktizo.talos import load_documents
from tests.clock import ManualClock
from tests.support import TALOS_HEADERS, bearer, make_token, talos_url

MAC = "52:54:00:12:34:56"
UUID = "4c4c4544-0042-3510-8051-b4c04f4e3132"


@dataclass
class Held:
    """A config GET running in a thread, as Talos would make it."""

    response: httpx.Response | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = field(default=None, repr=False)

    def join(self, timeout: float = 15) -> httpx.Response:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the held request never returned"
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response

    @property
    def answered(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()


def talos_get_in_thread(client: TestClient, **query: str) -> Held:
    held = Held()

    def run() -> None:
        try:
            held.response = client.get(talos_url(**query), headers=TALOS_HEADERS)
        except BaseException as exc:
            held.error = exc

    held.thread = threading.Thread(target=run, daemon=True)
    held.thread.start()
    return held


def wait_until_held(services: Services, held: Held, count: int = 1, timeout: float = 10) -> None:
    # Not a bound on speed: how long to wait before calling the test a failure.
    deadline = time.monotonic() + timeout
    while services.watcher.waiting < count:
        assert held.thread is not None and held.thread.is_alive(), "the request was answered instead of held"
        assert time.monotonic() < deadline, "the request was never held"
        time.sleep(0.01)


@dataclass
class Site:
    client: TestClient
    services: Services
    settings: Settings
    ops: dict[str, str]


@pytest.fixture
def make_site(tmp_path: Path, database_url: str, bases: Path, clock: ManualClock) -> Iterator[Callable[..., Site]]:
    """Sites on the test's clock: a held request is answered by an approval while the clock stands still, or by
    its timeout when the test moves the clock past it; never by a wall clock."""
    made: list[Site] = []

    def make(long_poll_seconds: float, **overrides: object) -> Site:
        settings = Settings(
            data_dir=tmp_path / "data",
            database_url=database_url,
            last_seen_interval=0,
            long_poll_seconds=long_poll_seconds,
            **overrides,  # type: ignore[arg-type]
        )
        services = build_services(settings)
        client = TestClient(create_app(settings, services), client=("10.0.0.9", 40000))
        client.__enter__()
        ops = bearer(make_token(services, f"ops{len(made)}", UserRole.OPERATOR))
        site = Site(client, services, settings, ops)
        made.append(site)
        return site

    yield make
    for site in made:
        site.client.__exit__(None, None, None)
        site.services.db.dispose()


def pending_device(site: Site) -> int:
    device, _ = site.services.devices.register(MAC, "10.0.0.9")
    return device.id


def test_approval_answers_the_held_request_at_once(make_site: Callable[..., Site], clock: ManualClock) -> None:
    site = make_site(60)
    device_id = pending_device(site)
    held = talos_get_in_thread(site.client, mac=MAC, uuid=UUID)
    wait_until_held(site.services, held)
    assert not held.answered

    r = site.client.post(f"/api/v1/devices/{device_id}/approve", json={"hostname": "node-lp"}, headers=site.ops)
    assert r.status_code == 200
    response = held.join()

    # The clock never moved: the approval answered it, long before the 60 s long poll would have ended.
    assert clock.monotonic() == 0
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/yaml"
    docs = {d.get("kind", "v1alpha1"): d for d in load_documents(response.content)}
    assert docs["HostnameConfig"]["hostname"] == "node-lp"
    assert site.services.watcher.waiting == 0 and site.services.download.held == 0
    dev = site.client.get(f"/api/v1/devices/{device_id}", headers=site.ops).json()
    assert dev["last_config_download"] is not None and dev["uuid"] == UUID


def test_first_contact_is_registered_and_held_until_approved(
    make_site: Callable[..., Site], clock: ManualClock
) -> None:
    site = make_site(60)
    held = talos_get_in_thread(site.client, mac=MAC)
    wait_until_held(site.services, held)
    [dev] = site.client.get("/api/v1/devices", headers=site.ops).json()
    assert (dev["status"], dev["source"]) == ("pending", "config_fetch")  # visible to operators while held
    site.client.post(f"/api/v1/devices/{dev['id']}/approve", json={"hostname": "first"}, headers=site.ops)
    response = held.join()
    assert response.status_code == 200 and "first" in response.text
    assert clock.monotonic() == 0


def test_nobody_approves_then_403_pending_when_the_wait_ends(
    make_site: Callable[..., Site], clock: ManualClock
) -> None:
    site = make_site(60)
    pending_device(site)
    held = talos_get_in_thread(site.client, mac=MAC)
    wait_until_held(site.services, held)
    clock.advance(59)
    time.sleep(0.2)
    assert not held.answered  # a second before the end it is still held
    clock.advance(1)
    response = held.join()
    assert response.status_code == 403
    assert response.text.strip() == "Device not approved. Current status: pending"
    assert site.services.watcher.waiting == 0


def test_rejected_device_is_not_held(make_site: Callable[..., Site], clock: ManualClock) -> None:
    site = make_site(60)
    device_id = pending_device(site)
    site.services.devices.reject(Actor.system(), device_id)
    held = talos_get_in_thread(site.client, mac=MAC)
    response = held.join()
    assert response.status_code == 403 and "rejected" in response.text
    assert clock.monotonic() == 0 and site.services.watcher.waiting == 0


def test_rejection_while_held_answers_403_at_once(make_site: Callable[..., Site], clock: ManualClock) -> None:
    site = make_site(60)
    device_id = pending_device(site)
    held = talos_get_in_thread(site.client, mac=MAC)
    wait_until_held(site.services, held)
    site.client.post(f"/api/v1/devices/{device_id}/reject", headers=site.ops)
    response = held.join()
    assert response.status_code == 403
    assert response.text.strip() == "Device not approved. Current status: rejected"
    assert clock.monotonic() == 0


def test_approval_by_another_replica_wakes_the_held_request(make_site: Callable[..., Site], clock: ManualClock) -> None:
    """Another Ktizo process on the same database cannot wake this one's waiters directly: on PostgreSQL its
    commit's NOTIFY does at once, on SQLite this process's next look at the database (one poll later)."""
    site = make_site(60)
    device_id = pending_device(site)
    held = talos_get_in_thread(site.client, mac=MAC)
    wait_until_held(site.services, held)
    replica = build_services(site.settings)
    notified = site.services.db.dialect == "postgresql"
    try:
        if notified:
            listener = site.services.watcher.listener
            assert listener is not None and listener.connected.wait(10)
        replica.devices.approve(Actor.system(), device_id, DeviceChanges(hostname="replica"))
        if notified:
            response = held.join()
        else:
            time.sleep(0.2)
            assert not held.answered  # only the database tells this process, and it looks every poll_seconds
            clock.advance(site.services.watcher.poll_seconds)
            response = held.join()
    finally:
        replica.db.dispose()
    assert response.status_code == 200 and "replica" in response.text
    assert clock.monotonic() == (0 if notified else site.services.watcher.poll_seconds)


def test_several_machines_are_held_and_only_the_approved_one_answers(
    make_site: Callable[..., Site], clock: ManualClock
) -> None:
    site = make_site(30)
    ids = [site.services.devices.register(f"52:54:00:00:00:0{i}", None)[0].id for i in range(1, 4)]
    helds = [talos_get_in_thread(site.client, mac=f"52:54:00:00:00:0{i}") for i in range(1, 4)]
    for n, held in enumerate(helds, start=1):
        wait_until_held(site.services, held, count=n)
    site.client.post(f"/api/v1/devices/{ids[1]}/approve", headers=site.ops)
    assert helds[1].join().status_code == 200
    assert not helds[0].answered and not helds[2].answered
    clock.advance(30)
    for held in (helds[0], helds[2]):
        assert held.join().status_code == 403


def test_a_newer_request_for_the_same_machine_takes_over_the_wait(
    make_site: Callable[..., Site], clock: ManualClock
) -> None:
    """One held request per machine: thousands of requests naming one MAC cannot pile up, and only the request
    still held when it is approved gets the render."""
    site = make_site(60)
    device_id = pending_device(site)
    older = talos_get_in_thread(site.client, mac=MAC)
    wait_until_held(site.services, older)
    newer = talos_get_in_thread(site.client, mac=MAC)
    assert older.join().status_code == 403  # answered at once, as without long poll
    wait_until_held(site.services, newer)
    assert site.services.download.held == 1
    site.client.post(f"/api/v1/devices/{device_id}/approve", headers=site.ops)
    assert newer.join().status_code == 200
    downloads = site.client.get(f"/api/v1/audit?device_id={device_id}&action=config_download", headers=site.ops)
    assert downloads.json()["total"] == 1
    assert clock.monotonic() == 0


def test_long_poll_off_answers_at_once(client: TestClient, services: Services, bases: Path) -> None:
    services.devices.register(MAC, None)
    r = client.get(talos_url(mac=MAC), headers=TALOS_HEADERS)
    assert r.status_code == 403 and services.watcher.waiting == 0
