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
from tests.support import TALOS_HEADERS, bearer, make_token, talos_url

MAC = "52:54:00:12:34:56"
UUID = "4c4c4544-0042-3510-8051-b4c04f4e3132"


@dataclass
class Held:
    """A config GET running in a thread, as Talos would make it."""

    started: float = 0.0
    finished: float = 0.0
    response: httpx.Response | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def elapsed(self) -> float:
        return self.finished - self.started

    def join(self, timeout: float = 15) -> httpx.Response:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the held request never returned"
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


def talos_get_in_thread(client: TestClient, **query: str) -> Held:
    held = Held()

    def run() -> None:
        held.started = time.monotonic()
        try:
            held.response = client.get(talos_url(**query), headers=TALOS_HEADERS)
        except BaseException as exc:
            held.error = exc
        held.finished = time.monotonic()

    held.thread = threading.Thread(target=run, daemon=True)
    held.thread.start()
    return held


def wait_until_held(services: Services, held: Held, count: int = 1, timeout: float = 5) -> None:
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
def make_site(tmp_path: Path, database_url: str, bases: Path) -> Iterator[Callable[..., Site]]:
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


def test_approval_answers_the_held_request_at_once(make_site: Callable[..., Site]) -> None:
    site = make_site(5)
    device_id = pending_device(site)
    held = talos_get_in_thread(site.client, mac=MAC, uuid=UUID)
    wait_until_held(site.services, held)
    time.sleep(0.3)  # held for a while, not just slow
    assert held.thread is not None and held.thread.is_alive()

    approved_at = time.monotonic()
    r = site.client.post(f"/api/v1/devices/{device_id}/approve", json={"hostname": "node-lp"}, headers=site.ops)
    assert r.status_code == 200
    response = held.join()

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/yaml"
    docs = {d.get("kind", "v1alpha1"): d for d in load_documents(response.content)}
    assert docs["HostnameConfig"]["hostname"] == "node-lp"
    assert held.finished >= approved_at, "answered before the approval"
    assert held.finished - approved_at < 1.5, f"approval took {held.finished - approved_at:.2f} s to arrive"
    assert held.elapsed < 4.0  # well before the 5 s long poll would have ended
    assert site.services.watcher.waiting == 0
    dev = site.client.get(f"/api/v1/devices/{device_id}", headers=site.ops).json()
    assert dev["last_config_download"] is not None and dev["uuid"] == UUID


def test_first_contact_is_registered_and_held_until_approved(make_site: Callable[..., Site]) -> None:
    site = make_site(5)
    held = talos_get_in_thread(site.client, mac=MAC)
    wait_until_held(site.services, held)
    [dev] = site.client.get("/api/v1/devices", headers=site.ops).json()
    assert (dev["status"], dev["source"]) == ("pending", "config_fetch")  # visible to operators while held
    approved_at = time.monotonic()
    site.client.post(f"/api/v1/devices/{dev['id']}/approve", json={"hostname": "first"}, headers=site.ops)
    response = held.join()
    assert response.status_code == 200 and "first" in response.text
    assert approved_at <= held.finished < approved_at + 1.5


def test_nobody_approves_then_403_pending_when_the_wait_ends(make_site: Callable[..., Site]) -> None:
    site = make_site(1)
    pending_device(site)
    held = talos_get_in_thread(site.client, mac=MAC)
    response = held.join()
    assert response.status_code == 403
    assert response.text.strip() == "Device not approved. Current status: pending"
    assert 0.9 <= held.elapsed < 3.0, held.elapsed
    assert site.services.watcher.waiting == 0


def test_rejected_device_is_not_held(make_site: Callable[..., Site]) -> None:
    site = make_site(5)
    device_id = pending_device(site)
    site.services.devices.reject(Actor.system(), device_id)
    held = talos_get_in_thread(site.client, mac=MAC)
    response = held.join()
    assert response.status_code == 403 and "rejected" in response.text
    assert held.elapsed < 1.0


def test_rejection_while_held_answers_403_at_once(make_site: Callable[..., Site]) -> None:
    site = make_site(5)
    device_id = pending_device(site)
    held = talos_get_in_thread(site.client, mac=MAC)
    wait_until_held(site.services, held)
    rejected_at = time.monotonic()
    site.client.post(f"/api/v1/devices/{device_id}/reject", headers=site.ops)
    response = held.join()
    assert response.status_code == 403
    assert response.text.strip() == "Device not approved. Current status: rejected"
    assert rejected_at <= held.finished < rejected_at + 1.5


def test_approval_by_another_replica_is_noticed_within_a_couple_of_seconds(
    make_site: Callable[..., Site],
) -> None:
    site = make_site(5)
    device_id = pending_device(site)
    held = talos_get_in_thread(site.client, mac=MAC)
    wait_until_held(site.services, held)
    # Another Ktizo process on the same database: its approval cannot wake this process's waiters directly.
    replica = build_services(site.settings)
    try:
        approved_at = time.monotonic()
        replica.devices.approve(Actor.system(), device_id, DeviceChanges(hostname="replica"))
        response = held.join()
    finally:
        replica.db.dispose()
    assert response.status_code == 200 and "replica" in response.text
    assert approved_at <= held.finished < approved_at + 2.5, held.finished - approved_at


def test_several_machines_are_held_and_only_the_approved_one_answers(make_site: Callable[..., Site]) -> None:
    site = make_site(2)
    ids = [site.services.devices.register(f"52:54:00:00:00:0{i}", None)[0].id for i in range(1, 4)]
    helds = [talos_get_in_thread(site.client, mac=f"52:54:00:00:00:0{i}") for i in range(1, 4)]
    for n, held in enumerate(helds, start=1):
        wait_until_held(site.services, held, count=n)
    approved_at = time.monotonic()
    site.client.post(f"/api/v1/devices/{ids[1]}/approve", headers=site.ops)
    answered = helds[1].join()
    assert answered.status_code == 200 and helds[1].finished - approved_at < 1.5
    assert all(h.thread is not None and h.thread.is_alive() for h in (helds[0], helds[2]))
    for held in (helds[0], helds[2]):
        assert held.join().status_code == 403
        assert held.elapsed >= 1.8


def test_long_poll_off_answers_at_once(client: TestClient, services: Services, bases: Path) -> None:
    services.devices.register(MAC, None)
    started = time.monotonic()
    r = client.get(talos_url(mac=MAC), headers=TALOS_HEADERS)
    assert r.status_code == 403 and time.monotonic() - started < 0.5
