"""Bulk approval: names continue a pattern, addresses come in order from a range skipping those in use,
the preview is exactly what is applied, and one transaction makes one audit event per device."""

from __future__ import annotations

import dataclasses
from ipaddress import ip_address

import pytest
from sqlalchemy import update

from ktizo.db.models import Device
from ktizo.domain.devices import Role
from ktizo.domain.errors import Conflict, InvalidTransition, PermissionDenied, ValidationFailed
from ktizo.domain.users import UserRole
from ktizo.services.audit import AuditQuery
from ktizo.services.bulk import AddressRange, BulkApproval, HostnamePattern
from ktizo.services.context import Actor
from ktizo.services.devices import DeviceChanges
from ktizo.services.registry import Services

OPS = Actor.user("ops", UserRole.OPERATOR, "10.0.0.9")


def pending(services: Services, count: int, start: int = 1) -> list[int]:
    ids = []
    for i in range(start, start + count):
        device, _ = services.devices.register(f"52:54:00:00:10:{i:02x}", "10.0.0.50")
        ids.append(device.id)
    return ids


def approved(services: Services, mac: str, hostname: str, ip: str | None = None) -> None:
    device = services.devices.create(Actor.system(), DeviceChanges(mac_address=mac, hostname=hostname, ip_address=ip))
    services.devices.approve(Actor.system(), device.id, DeviceChanges())


def test_names_continue_after_the_highest_number_and_addresses_skip_those_in_use(services: Services) -> None:
    approved(services, "52:54:00:00:20:01", "worker-07", "10.0.5.101/24")
    approved(services, "52:54:00:00:20:02", "worker-2", "10.0.5.103/24")  # other padding, same pattern
    approved(services, "52:54:00:00:20:03", "worker-99x")  # not the pattern
    services.cluster.update(Actor.system(), {"gateway": "10.0.5.102", "endpoint": "https://10.0.5.104:6443"})
    ids = pending(services, 4)
    plan = services.bulk.preview(
        OPS, BulkApproval(tuple(ids), "worker-{n:02d}", "10.0.5.100-10.0.5.120/24", role=Role.CONTROLPLANE)
    )
    assert [(a.hostname, a.ip_address, a.role) for a in plan.assignments] == [
        ("worker-08", "10.0.5.100/24", "controlplane"),
        ("worker-09", "10.0.5.105/24", "controlplane"),
        ("worker-10", "10.0.5.106/24", "controlplane"),
        ("worker-11", "10.0.5.107/24", "controlplane"),
    ]
    assert (plan.first_number, plan.skipped_addresses) == (8, 4)  # .101 .103 devices, .102 gateway, .104 VIP


def test_a_fresh_pattern_starts_at_one_and_a_network_from_its_first_host(services: Services) -> None:
    ids = pending(services, 3)
    plan = services.bulk.preview(OPS, BulkApproval(tuple(ids), "cp{n}.rack3", "10.9.0.0/29"))
    assert [(a.hostname, a.ip_address, a.role) for a in plan.assignments] == [
        ("cp1.rack3", "10.9.0.1/29", "worker"),
        ("cp2.rack3", "10.9.0.2/29", "worker"),
        ("cp3.rack3", "10.9.0.3/29", "worker"),
    ]
    plan = services.bulk.preview(OPS, BulkApproval(tuple(ids), "n{n:03d}", "10.9.0.0/24", ip_start="10.9.0.250"))
    assert [a.ip_address for a in plan.assignments] == ["10.9.0.250/24", "10.9.0.251/24", "10.9.0.252/24"]
    assert [a.hostname for a in plan.assignments] == ["n001", "n002", "n003"]
    plan = services.bulk.preview(OPS, BulkApproval(tuple(ids), "w-{n}", "10.9.0.7-9/24"))
    assert [a.ip_address for a in plan.assignments] == ["10.9.0.7/24", "10.9.0.8/24", "10.9.0.9/24"]
    plan = services.bulk.preview(OPS, BulkApproval(tuple(ids), "w-{n}"))  # no range: DHCP
    assert [a.ip_address for a in plan.assignments] == [None, None, None]


def test_an_exhausted_range_is_refused_naming_the_field(services: Services) -> None:
    approved(services, "52:54:00:00:20:01", "db-1", "10.0.5.11/24")
    ids = pending(services, 3)
    with pytest.raises(ValidationFailed) as caught:
        services.bulk.preview(OPS, BulkApproval(tuple(ids), "w{n}", "10.0.5.10-10.0.5.12/24"))
    assert caught.value.field == "ip_range"
    assert "2 free address(es) for 3 devices" in caught.value.message
    # A /30 has two host addresses: network and broadcast are never handed out.
    with pytest.raises(ValidationFailed, match="2 free address"):
        services.bulk.preview(OPS, BulkApproval(tuple(ids), "w{n}", "10.7.0.0/30"))


@pytest.mark.parametrize(
    ("pattern", "ip_range", "field"),
    [
        ("worker", None, "hostname_pattern"),
        ("worker-{n}-{n}", None, "hostname_pattern"),
        ("worker-{n.__class__}", None, "hostname_pattern"),
        ("Wörker-{n}", None, "hostname_pattern"),
        ("{n}", None, "hostname_pattern"),
        ("w{n}", "10.0.5.10-10.0.5.20", "ip_range"),
        ("w{n}", "10.0.5.20-10.0.5.10/24", "ip_range"),
        ("w{n}", "10.0.5.10-10.0.6.20/24", "ip_range"),
        ("w{n}", "banana/24", "ip_range"),
        ("w{n}", "10.0.0.0/0", "ip_range"),
    ],
)
def test_bad_input_names_its_field(services: Services, pattern: str, ip_range: str | None, field: str) -> None:
    ids = pending(services, 1)
    with pytest.raises(ValidationFailed) as caught:
        services.bulk.preview(OPS, BulkApproval(tuple(ids), pattern, ip_range))
    assert caught.value.field == field


def test_apply_gives_exactly_the_preview_in_one_transaction_with_one_event_each(services: Services) -> None:
    ids = pending(services, 5)
    request = BulkApproval(tuple(ids), "worker-{n:02d}", "10.0.5.100-10.0.5.150/24", role=Role.WORKER, notes="rack 3")
    preview = services.bulk.preview(OPS, request)
    applied = services.bulk.approve(OPS, request, expected=preview.fingerprint)
    assert applied == preview
    for a in preview.assignments:
        device = services.devices.get(a.device_id)
        assert (device.status, device.hostname, device.ip_address, device.notes, device.approved_by) == (
            "approved",
            a.hostname,
            a.ip_address,
            "rack 3",
            "ops",
        )
    events, total = services.audit.list(AuditQuery(action="approve"))
    assert total == 5
    assert {e.device_id for e in events} == set(ids)
    assert all(e.actor == "ops" and e.source_ip == "10.0.0.9" and e.details["bulk"] == 5 for e in events)
    # The next batch goes on where this one stopped.
    more = pending(services, 2, start=20)
    plan = services.bulk.preview(OPS, dataclasses.replace(request, device_ids=tuple(more)))
    assert [(a.hostname, a.ip_address) for a in plan.assignments] == [
        ("worker-06", "10.0.5.105/24"),
        ("worker-07", "10.0.5.106/24"),
    ]


def test_apply_refuses_when_the_world_changed_since_the_preview(services: Services) -> None:
    ids = pending(services, 2)
    request = BulkApproval(tuple(ids), "worker-{n:02d}", "10.0.5.100-10.0.5.150/24")
    preview = services.bulk.preview(OPS, request)
    approved(services, "52:54:00:00:30:01", "other", "10.0.5.100/24")  # someone takes the first address
    with pytest.raises(Conflict, match="preview again"):
        services.bulk.approve(OPS, request, expected=preview.fingerprint)
    assert {services.devices.get(i).status for i in ids} == {"pending"}
    assert services.audit.list(AuditQuery(action="approve", actor="ops"))[1] == 0


def test_nothing_is_half_done_when_one_device_is_not_pending(services: Services) -> None:
    ids = pending(services, 3)
    services.devices.approve(OPS, ids[1], DeviceChanges(hostname="taken"))
    with pytest.raises(InvalidTransition, match="pending devices only"):
        services.bulk.approve(OPS, BulkApproval(tuple(ids), "w{n}"))
    with pytest.raises(InvalidTransition):
        services.bulk.reject(OPS, ids)
    assert [services.devices.get(i).status for i in ids] == ["pending", "approved", "pending"]


def test_a_static_ip_needs_a_mac(services: Services) -> None:
    ids = pending(services, 1)
    with services.db.write() as s:
        s.execute(
            update(Device).where(Device.id == ids[0]).values(mac_address=None, uuid="4c4c4544-0000-0000-0000-0001")
        )
    with pytest.raises(ValidationFailed, match="no MAC address") as caught:
        services.bulk.preview(OPS, BulkApproval(tuple(ids), "w{n}", "10.0.5.0/24"))
    assert caught.value.field == "ip_range"


def test_bulk_reject_is_one_event_per_device_and_roles_are_enforced(services: Services) -> None:
    ids = pending(services, 3)
    viewer = Actor.user("eve", UserRole.VIEWER)
    with pytest.raises(PermissionDenied):
        services.bulk.preview(viewer, BulkApproval(tuple(ids), "w{n}"))
    with pytest.raises(PermissionDenied):
        services.bulk.reject(viewer, ids)
    with pytest.raises(ValidationFailed) as caught:
        services.bulk.reject(OPS, [])
    assert caught.value.field == "devices"
    assert services.bulk.reject(OPS, ids, notes="wrong rack") == ids
    assert {(d.status, d.notes) for d in map(services.devices.get, ids)} == {("rejected", "wrong rack")}
    events, total = services.audit.list(AuditQuery(action="reject"))
    assert total == 3 and {e.device_id for e in events} == set(ids)


def test_pattern_and_range_parsing() -> None:
    pattern = HostnamePattern.parse("Worker-{n:03}")
    assert pattern.render(7) == "worker-007"
    assert (pattern.number_of("worker-012"), pattern.number_of("worker-x")) == (12, None)
    assert list(AddressRange.parse("192.168.1.254/31")) == [ip_address("192.168.1.254"), ip_address("192.168.1.255")]
    assert str(AddressRange.parse("fd00::10-fd00::12/64")) == "fd00::10-fd00::12/64"
    assert len(list(AddressRange.parse("fd00::10-fd00::12/64"))) == 3
