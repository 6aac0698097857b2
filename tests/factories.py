"""Small factories for tests: machines at the door, approved machines, users with a token, unique MACs.

Every factory goes through the services (the same use cases the API, the UI and the CLI call), so what it makes is
what a real request would have made: audited, validated, normalised."""

from __future__ import annotations

import itertools
from typing import Any

from ktizo.db.models import Device
from ktizo.domain.devices import Source
from ktizo.domain.identity import normalize_mac, normalize_serial, normalize_uuid
from ktizo.domain.users import UserRole
from ktizo.services.context import Actor
from ktizo.services.first_contact import Knock
from ktizo.services.queries import DeviceChanges
from ktizo.services.registry import Services

# 52:54:00 is QEMU's prefix; the counter starts high so its MACs never meet the constants tests spell out.
_macs = itertools.count(0xA00001)


def next_mac() -> str:
    """A MAC no other call in this test process returned: ``52:54:00:xx:xx:xx``."""
    n = next(_macs)
    return f"52:54:00:{(n >> 16) & 0xFF:02x}:{(n >> 8) & 0xFF:02x}:{n & 0xFF:02x}"


def pending(
    services: Services,
    mac: str | None = None,
    *,
    uuid: str | None = None,
    serial: str | None = None,
    source_ip: str | None = "10.0.0.9",
) -> Device:
    """A machine that knocked and waits as pending. With ``uuid``/``serial`` it reported them at first contact
    (and is bound to them), as Talos's config request does; without, it registered by MAC alone."""
    mac = normalize_mac(mac or next_mac())
    if uuid is None and serial is None:
        device, _ = services.devices.register(mac, source_ip)
        return device
    knock = Knock(
        door=Source.CONFIG_FETCH,
        mac=mac,
        uuid=normalize_uuid(uuid) if uuid else None,
        serial=normalize_serial(serial) if serial else None,
        source_ip=source_ip,
    )
    with services.db.write() as s:
        return services.devices.first_contact.arrive(s, knock).device


def approved(services: Services, mac: str | None = None, *, actor: Actor | None = None, **fields: Any) -> Device:
    """A machine pre-registered (by the system) with ``fields`` (hostname, ip_address, role, notes, uuid, patch…)
    and then approved by ``actor`` (the system unless given)."""
    created = services.devices.create(Actor.system(), DeviceChanges(mac_address=mac or next_mac(), **fields))
    return services.devices.approve(actor or Actor.system(), created.id, DeviceChanges())


def user(services: Services, name: str, role: UserRole, password: str | None = None) -> str:
    """A user with ``role`` (and ``password`` to sign in with, if given); returns a bearer token of theirs."""
    services.users.create(Actor.system(), name, role, password)
    return services.users.create_token(Actor.system(), name, name="test")
