"""Answers given again from memory (``ConfigDownload.recall``): a machine repeating the same config request from the
same address gets the answer decided for it before, while the row it was decided from is unchanged; a change made
anywhere else (another worker, another replica: here a second set of services on the same database, which this
app hears nothing from) reaches the very next request, and every download is still recorded."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from ktizo.app import build_services, create_app
from ktizo.domain.users import UserRole
from ktizo.services.audit import AuditQuery
from ktizo.services.boot import BootService
from ktizo.services.context import Actor
from ktizo.services.queries import DeviceChanges
from ktizo.services.registry import Services
from ktizo.settings import Settings
from tests import factories
from tests.clock import ManualClock
from tests.support import TALOS_HEADERS, talos_url

pytestmark = pytest.mark.sqlite_only  # memory is for SQLite's reads on the event loop; PostgreSQL always decides


def eventually(check: Callable[[], bool], seconds: float = 5) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


MAC, UUID, SERIAL = "52:54:00:7e:00:01", "4c4c4544-0042-3510-8051-00000000007e", "SN-7E"
URL = talos_url(mac=MAC, uuid=UUID, serial=SERIAL)


@dataclass
class World:
    client: TestClient
    services: Services  # the app's own
    elsewhere: Services  # another worker's, on the same database
    decisions: list[str]  # one entry per config request the app decided (not answered from memory)

    def get(self, ip: str = "10.0.0.9") -> tuple[int, str]:
        client = self.client if ip == "10.0.0.9" else TestClient(self.client.app, client=(ip, 40000))
        r = client.get(URL, headers=TALOS_HEADERS)
        return r.status_code, r.text


@pytest.fixture
def world(settings: Settings, bases: object, clock: ManualClock, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    settings = settings.model_copy(update={"last_seen_interval": 15})
    decisions: list[str] = []
    decide = BootService.decide

    def counted(self: BootService, claim: object) -> object:
        decisions.append(str(claim))
        return decide(self, claim)  # type: ignore[arg-type]

    monkeypatch.setattr(BootService, "decide", counted)
    with ExitStack() as stack:
        services, elsewhere = build_services(settings), build_services(settings)
        stack.callback(services.db.dispose)
        stack.callback(elsewhere.db.dispose)
        client = stack.enter_context(TestClient(create_app(settings, services), client=("10.0.0.9", 40000)))
        yield World(client, services, elsewhere, decisions)


def test_a_polling_pending_machine_is_answered_from_memory_until_approved_elsewhere(world: World) -> None:
    device = factories.pending(world.services, MAC, uuid=UUID, serial=SERIAL)
    assert world.get() == (403, "Device not approved. Current status: pending\n")
    decided = len(world.decisions)
    for _ in range(3):
        assert world.get() == (403, "Device not approved. Current status: pending\n")
    assert len(world.decisions) == decided  # the same poll, the same answer: no decision made

    world.elsewhere.devices.approve(Actor.system(), device.id, DeviceChanges(hostname="n-7e"))
    status, body = world.get()
    assert status == 200 and "hostname: n-7e" in body


def test_a_remembered_pending_answer_still_writes_last_seen_once_an_interval(world: World, clock: ManualClock) -> None:
    device = factories.pending(world.services, MAC, uuid=UUID, serial=SERIAL)
    world.get()
    first = world.services.devices.get(device.id).last_seen
    clock.advance(10)
    world.get()
    assert world.services.devices.get(device.id).last_seen == first  # within the interval: no write
    clock.advance(6)  # 16 s since: a write is owed, the memory must not hide it
    world.get()
    # Written just after the answer went out (services.download_log.TouchLog).
    assert eventually(lambda: world.services.devices.get(device.id).last_seen == first + dt.timedelta(seconds=16))


def test_the_same_poll_from_another_address_is_decided_and_recorded(world: World) -> None:
    device = factories.pending(world.services, MAC, uuid=UUID, serial=SERIAL)
    world.get()
    world.get()
    assert world.get("10.0.0.10")[0] == 403
    assert eventually(lambda: world.services.devices.get(device.id).last_ip == "10.0.0.10")


def test_a_rule_still_decides_a_polling_machine_at_its_next_write(world: World, clock: ManualClock) -> None:
    """With a rule enabled a knock's write is first contact's (which lets the rules decide), not a mere touch."""
    device = factories.pending(world.services, MAC, uuid=UUID, serial=SERIAL)
    world.get()
    operator = Actor.user("oscar", UserRole.OPERATOR)
    world.elsewhere.rules.apply(operator, "lab", {"match": {"macPrefix": "52:54:00"}, "action": "approve"})
    clock.advance(16)
    assert world.get()[0] == 200
    assert world.services.devices.get(device.id).status == "approved"


def test_every_download_answered_from_memory_is_recorded(world: World) -> None:
    device = factories.approved(world.services, MAC, uuid=UUID, serial=SERIAL, hostname="n-7e")
    bodies = {world.get()[1] for _ in range(5)}
    assert len(bodies) == 1 and "n-7e" in bodies.pop()
    assert len(world.decisions) < 5  # some answered from memory
    rows = world.services.audit.list(AuditQuery(device_id=device.id, action="config_download", limit=100))[0]
    assert len(rows) == 5
    assert world.services.devices.get(device.id).installed_at is not None


def test_an_edit_or_a_rejection_made_elsewhere_reaches_the_next_download(world: World) -> None:
    device = factories.approved(world.services, MAC, uuid=UUID, serial=SERIAL, hostname="before")
    world.get()
    assert "before" in world.get()[1]
    world.elsewhere.devices.update(Actor.system(), device.id, DeviceChanges(hostname="after"))
    status, body = world.get()
    assert status == 200 and "after" in body and "before" not in body
    world.elsewhere.devices.reject(Actor.system(), device.id)
    assert world.get() == (403, "Device not approved. Current status: rejected\n")


def test_a_cluster_change_made_elsewhere_reaches_the_next_download(world: World) -> None:
    factories.approved(world.services, MAC, uuid=UUID, serial=SERIAL, hostname="n-7e", ip_address="10.0.5.20/24")
    world.get()
    assert "10.0.5.254" not in world.get()[1]
    world.elsewhere.cluster.update(Actor.system(), {"gateway": "10.0.5.254"})
    assert "10.0.5.254" in world.get()[1]


def test_an_approved_answer_is_decided_anew_after_a_while(world: World, clock: ManualClock) -> None:
    """What the row does not show (a base config read from a file on disk) is looked at again within seconds."""
    factories.approved(world.services, MAC, uuid=UUID, serial=SERIAL)
    world.get()
    world.get()
    decided = len(world.decisions)
    clock.advance(11)
    world.get()
    assert len(world.decisions) == decided + 1
