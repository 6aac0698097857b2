"""A rack nobody has seen before powers on at once: every machine's first iPXE request registers it.

The iPXE door registers the new machines that arrive together in one batch (``FirstContact.register_all``).
What a machine and an operator notice must be what first contact writes for one machine alone: one pending row
with the facts iPXE reported, one ``register`` audit row and one ``device.discovered`` event each, the
new-machine budget per address, rules deciding a machine as it arrives, a machine pre-registered by UUID getting
its MAC, a machine knocking twice at once still one row."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any
from urllib.parse import urlencode

import httpx
from sqlalchemy import select

from ktizo.app import build_services, create_app
from ktizo.db.batch import insert_many, table_of
from ktizo.db.models import Device, Event
from ktizo.db.types import utcnow
from ktizo.domain.users import UserRole
from ktizo.services.audit import AuditQuery
from ktizo.services.context import Actor
from ktizo.services.queries import DeviceChanges, DeviceQuery
from ktizo.services.registry import Services
from ktizo.settings import Settings

ADMIN = Actor.user("root", UserRole.ADMIN)
RACK = "10.7.0.1"


def query(mac: str, n: int, **extra: str) -> str:
    facts = {
        "mac": mac,
        "uuid": f"4c4c4544-0000-4000-8000-{n:012x}",
        "serial": f"SN-{n}",
        "manufacturer": "Dell Inc.",
        "product": "PowerEdge R650",
        "arch": "x86_64",
        "platform": "efi",
        "ip": f"10.7.1.{n % 250 + 1}",
    }
    return "/api/v1/boot/ipxe?" + urlencode(facts | extra)


def boot_all(services: Services, settings: Settings, urls: list[tuple[str, str]]) -> list[str]:
    """Every (url, client address) at once through the whole app, as a rack's iPXE does: the scripts, in order."""
    app = create_app(settings, services)

    async def storm() -> list[str]:
        clients: dict[str, httpx.AsyncClient] = {}
        try:
            for address in {a for _, a in urls}:
                transport = httpx.ASGITransport(app=app, client=(address, 40000))
                clients[address] = httpx.AsyncClient(transport=transport, base_url="http://ktizo")
            answers = await asyncio.gather(*(clients[address].get(url) for url, address in urls))
        finally:
            for c in clients.values():
                await c.aclose()
        assert [a.status_code for a in answers] == [200] * len(urls)
        return [a.text for a in answers]

    return asyncio.run(storm())


def address(n: int) -> str:
    """Each machine's own address, as in a real rack (one address is held to KTIZO_NEW_DEVICES_PER_MINUTE)."""
    return f"10.7.{n // 250}.{n % 250 + 1}"


def macs(n: int, rack: int = 0) -> list[str]:
    return [f"52:54:00:7{rack}:{i // 256:02x}:{i % 256:02x}" for i in range(n)]


def devices(services: Services) -> dict[str, Any]:
    return {d.mac_address: d for d in services.devices.list(DeviceQuery(limit=10_000))[0]}


def registrations(services: Services) -> Counter[int]:
    rows = services.audit.list(AuditQuery(action="register", limit=10_000))[0]
    return Counter(row.device_id for row in rows if row.device_id is not None)


def test_a_rack_of_new_machines_is_registered_each_once_with_its_facts(services: Services, settings: Settings) -> None:
    n = 150
    rack = macs(n)
    scripts = boot_all(services, settings, [(query(mac, i), address(i)) for i, mac in enumerate(rack)])
    assert all("this machine is pending" in s and "kernel " in s for s in scripts)

    found = devices(services)
    assert set(found) == set(rack)
    for i, mac in enumerate(rack):
        d = found[mac]
        assert (d.status, d.source, d.kind, d.role, d.uuid, d.serial) == (
            "pending",
            "ipxe",
            "talos",
            "worker",
            f"4c4c4544-0000-4000-8000-{i:012x}",
            f"SN-{i}",
        )
        assert d.facts == {
            "manufacturer": "Dell Inc.",
            "product": "PowerEdge R650",
            "arch": "x86_64",
            "platform": "efi",
            "ipxe_ip": f"10.7.1.{i % 250 + 1}",
        }
        assert (d.first_ip, d.last_ip, d.labels, d.notes) == (address(i), address(i), {}, "")
        assert d.first_seen is not None and d.last_seen == d.first_seen
    by_id = {d.id: d for d in found.values()}
    assert registrations(services) == Counter(dict.fromkeys(by_id, 1))
    rows = services.audit.list(AuditQuery(action="register", limit=10_000))[0]
    assert {(r.actor_type, r.source_ip, r.device_mac) for r in rows} == {
        ("device", d.first_ip, d.mac_address) for d in by_id.values()
    }
    assert {repr(r.details) for r in rows} == {repr({"source": "ipxe", "kind": "talos"})}
    with services.db.read() as s:
        discovered = s.execute(select(Event.device_id, Event.payload).where(Event.event == "device.discovered")).all()
    assert Counter(device_id for device_id, _ in discovered) == Counter(dict.fromkeys(by_id, 1))
    for device_id, payload in discovered:
        assert payload["machine"]["mac_address"] == by_id[device_id].mac_address
        assert payload["machine"]["status"] == "pending" and payload["machine"]["id"] == device_id
    # Registered in batches, not one transaction each: what this path is for.
    assert len({r.at for r in rows}) < n

    # Each boots again with nothing new: the same machine, no second registration.
    again = boot_all(services, settings, [(query(mac, i), address(i)) for i, mac in enumerate(rack)])
    assert again == scripts
    assert registrations(services) == Counter(dict.fromkeys(by_id, 1))


def test_a_batch_registers_what_first_contact_alone_registers(services: Services, settings: Settings) -> None:
    """One machine through the batch and one through ``arrive`` (a rule that takes no machine is enabled, so the
    batch leaves it to arrive): the two rows and their audit rows differ only in what names them."""
    alone, batched = "52:54:00:7e:00:01", "52:54:00:7e:00:02"
    services.rules.apply(ADMIN, "nobody", {"match": {"sourceSubnet": "192.0.2.0/24"}, "action": "approve"})
    boot_all(services, settings, [(query(alone, 1), RACK)])
    services.rules.apply(
        ADMIN, "nobody", {"enabled": False, "match": {"sourceSubnet": "192.0.2.0/24"}, "action": "approve"}
    )
    boot_all(services, settings, [(query(batched, 1), RACK)])

    found = devices(services)
    skip = {"id", "mac_address", "first_seen", "last_seen", "updated_at", "created_at"}
    columns = [c.key for c in Device.__table__.columns if c.key not in skip]
    assert {c: getattr(found[batched], c, None) for c in columns} == {
        c: getattr(found[alone], c, None) for c in columns
    }
    audit = {
        r.device_mac: (r.actor, r.actor_type, r.source_ip, r.details)
        for r in services.audit.list(AuditQuery(action="register", limit=10))[0]
    }
    assert audit[alone] == audit[batched]


def test_the_new_machine_budget_holds_within_a_batch(tmp_path: Any, settings: Settings) -> None:
    """Five new machines a minute from one address: a storm of twelve from behind one NAT gets five registered
    (the others boot, unrecorded, and register as Talos retries); another address has its own five."""
    limited = settings.model_copy(update={"new_devices_per_minute": 5})
    services = build_services(limited)
    try:
        nat, other = macs(12, 1), macs(3, 2)
        urls = [(query(m, i), "10.7.0.2") for i, m in enumerate(nat)] + [
            (query(m, 100 + i), "10.7.0.3") for i, m in enumerate(other)
        ]
        scripts = boot_all(services, limited, urls)
        assert all("kernel " in s for s in scripts)  # every machine boots, registered or not
        found = devices(services)
        assert len([m for m in nat if m in found]) == 5
        assert all(m in found for m in other)
        assert sum(registrations(services).values()) == 8
    finally:
        services.db.dispose()


def test_a_rule_still_decides_each_new_machine_as_it_arrives(services: Services, settings: Settings) -> None:
    services.rules.apply(
        ADMIN, "rack", {"match": {"sourceSubnet": "10.7.0.0/24"}, "action": "approve", "hostnamePattern": "r{n}"}
    )
    rack = macs(20, 3)
    scripts = boot_all(services, settings, [(query(mac, i), RACK) for i, mac in enumerate(rack)])
    assert all("this machine is approved" in s for s in scripts)
    found = devices(services)
    assert {found[m].status for m in rack} == {"approved"}
    assert len({found[m].hostname for m in rack}) == 20


def test_a_machine_knocking_twice_at_once_is_one_row_and_one_registration(
    services: Services, settings: Settings
) -> None:
    mac = "52:54:00:7f:00:01"
    scripts = boot_all(services, settings, [(query(mac, 7), RACK)] * 6)
    assert len(set(scripts)) == 1 and "pending" in scripts[0]
    found = devices(services)
    assert list(found) == [mac]
    assert registrations(services) == Counter({found[mac].id: 1})


def test_a_machine_pre_registered_by_uuid_gets_its_mac_not_a_second_row(services: Services, settings: Settings) -> None:
    uuid = "4c4c4544-0000-4000-8000-000000000009"
    made = services.devices.create(ADMIN, DeviceChanges(uuid=uuid, hostname="known-by-uuid"))
    mac = "52:54:00:7f:00:09"
    boot_all(services, settings, [(query(mac, 9), RACK), (query("52:54:00:7f:00:0a", 10), RACK)])
    found = devices(services)
    assert found[mac].id == made.id and found[mac].hostname == "known-by-uuid"
    assert registrations(services)[made.id] == 0  # it was registered by the operator, not by its knock
    assert registrations(services)[found["52:54:00:7f:00:0a"].id] == 1


def test_rows_a_unique_constraint_refuses_are_left_out_not_the_batch(services: Services) -> None:
    """``insert_many(ignore_conflicts=True)``: a row for a MAC another transaction made meanwhile is skipped, the
    batch's other rows are made (and on PostgreSQL only those are returned)."""
    services.devices.create(ADMIN, DeviceChanges(mac_address="52:54:00:7f:01:01"))
    rows = [
        {"mac_address": mac, "kind": "talos", "role": "worker", "status": "pending", "source": "ipxe", "notes": ""}
        | {"facts": {}, "first_seen": utcnow()}
        for mac in ("52:54:00:7f:01:01", "52:54:00:7f:01:02")
    ]
    with services.db.write() as s:
        made = insert_many(s, table_of(Device), rows, returning=("id", "mac_address"), ignore_conflicts=True)
        returned = {r.mac_address for r in made}
    assert "52:54:00:7f:01:02" in returned
    if services.db.dialect == "postgresql":
        assert returned == {"52:54:00:7f:01:02"}
    assert set(devices(services)) == {"52:54:00:7f:01:01", "52:54:00:7f:01:02"}
