"""Auto-approval rules: each condition matched and not, decisions at the real doors in their own transaction, the
control-plane guard, maxCount, dry runs, and a rule racing an operator."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ktizo.domain.errors import PermissionDenied, ValidationFailed
from ktizo.domain.users import UserRole
from ktizo.services.audit import AuditQuery
from ktizo.services.context import Actor
from ktizo.services.devices import DeviceChanges
from ktizo.services.registry import Services
from ktizo.services.rules import Facts, mismatches, normalize_match
from tests.agents.support import body
from tests.factories import next_mac, pending
from tests.support import TALOS_HEADERS, talos_url

ADMIN = Actor.user("root", UserRole.ADMIN)
OPERATOR = Actor.user("ops", UserRole.OPERATOR)
UUID = "4c4c4544-0042-3510-8052-b4c04f4e3032"


def seen(**over: Any) -> Facts:
    values: dict[str, Any] = {
        "mac": "52:54:00:12:34:56",
        "kind": "talos",
        "door": "config",
        "source_ip": "10.0.5.17",
        "lease_ip": "10.0.5.17",
        "facts": {"manufacturer": "Dell Inc.", "product": "PowerEdge R650", "arch": "x86_64"},
        "serial": "CN7792",
        "site": None,
        "role": "worker",
    }
    values.update(over)
    return Facts(**values)


MATCHES = [
    ({"macPrefix": "52:54:00"}, {}, {"mac": "52:54:01:12:34:56"}),
    ({"macPrefix": ["aa:bb", "52-54-00-12"]}, {}, {"mac": None}),
    ({"sourceSubnet": "10.0.5.0/24"}, {}, {"source_ip": "10.0.6.1"}),
    ({"leaseSubnet": "10.0.5.16/28"}, {}, {"lease_ip": "10.0.5.100"}),
    ({"leaseSubnet": "10.0.5.0/24"}, {}, {"lease_ip": None}),
    ({"door": ["ipxe", "config"]}, {}, {"door": "dhcp"}),
    ({"door": "agent"}, {"door": "agent", "kind": "agent"}, {"door": "site", "kind": "agent"}),
    ({"kind": "agent"}, {"kind": "agent"}, {"kind": "talos"}),
    ({"facts": {"manufacturer": "dell*"}}, {}, {"facts": {"manufacturer": "HPE"}}),
    ({"facts": {"product": "PowerEdge R6?0"}}, {}, {"facts": {"product": "PowerEdge R750"}}),
    ({"facts": {"serial": "CN7[0-9]+"}}, {}, {"serial": "XN7792"}),
    ({"facts": {"serial": "CN7.*"}}, {"serial": None, "facts": {"serial": "CN71"}}, {"serial": None, "facts": {}}),
    ({"facts": {"arch": "x86_64"}}, {}, {"facts": {"arch": "arm64"}}),
    ({"site": "fra-1"}, {"site": "fra-1"}, {"site": "ams-2"}),
]


@pytest.mark.parametrize(("match", "hit", "miss"), MATCHES)
def test_each_condition_matches_and_does_not(match: dict[str, Any], hit: dict[str, Any], miss: dict[str, Any]) -> None:
    normal = normalize_match(match)
    assert mismatches(normal, seen(**hit)) == []
    failed = mismatches(normal, seen(**{**hit, **miss}))
    assert len(failed) == 1 and failed[0].split(".")[0] in {*match, "facts"}


def test_every_condition_must_hold() -> None:
    match = normalize_match({"macPrefix": "52:54:00", "sourceSubnet": "10.0.5.0/24", "kind": "talos"})
    assert mismatches(match, seen()) == []
    assert mismatches(match, seen(source_ip="192.168.1.1", kind="agent")) == ["sourceSubnet", "kind"]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"action": "approve", "match": {"macPrefix": "zz"}}, "match.macPrefix"),
        ({"action": "approve", "match": {"sourceSubnet": "10.0.5/33"}}, "match.sourceSubnet"),
        ({"action": "approve", "match": {"door": "pxe"}}, "match.door"),
        ({"action": "approve", "match": {"facts": {"serial": "("}}}, "match.facts.serial"),
        ({"action": "approve", "match": {"facts": {"colour": "red"}}}, "match.facts"),
        ({"action": "approve", "match": {"mac": "52:54:00"}}, "match"),
        ({"action": "maybe"}, "action"),
        ({"action": "approve", "hostnamePattern": "worker"}, "hostnamePattern"),
        ({"action": "approve", "ipRange": "10.0.5.100-10.0.5.50/24"}, "ipRange"),
        ({"action": "reject", "role": "worker"}, "role"),
        ({"action": "approve", "maxCount": 0}, "maxCount"),
        ({"action": "approve", "priority": "high"}, "priority"),
        ({"action": "approve", "colour": "red"}, "spec"),
    ],
)
def test_a_bad_rule_is_refused_naming_the_field(services: Services, spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        services.rules.apply(ADMIN, "bad", spec)
    assert caught.value.field == field
    assert services.rules.list() == []


def config(client: TestClient, mac: str, source: str = "10.0.5.17") -> Any:
    with TestClient(client.app, client=(source, 40000)) as other:
        return other.get(talos_url(mac=mac, uuid=UUID), headers=TALOS_HEADERS)


def test_a_matching_machine_gets_its_config_on_its_first_request(
    client: TestClient, services: Services, bases: Path
) -> None:
    services.rules.apply(
        ADMIN,
        "rack-a",
        {
            "priority": 10,
            "match": {"macPrefix": "52:54:00", "sourceSubnet": "10.0.5.0/24", "door": "config"},
            "action": "approve",
            "role": "worker",
            "hostnamePattern": "worker-{n:02d}",
            "ipRange": "10.0.5.100-10.0.5.150/24",
            "labels": {"rack": "a"},
        },
    )
    mac = next_mac()
    r = config(client, mac)
    assert r.status_code == 200, r.text
    assert "hostname: worker-01" in r.text and "10.0.5.100/24" in r.text
    device = services.devices.resolve(mac)
    assert (device.status, device.hostname, device.ip_address, device.labels) == (
        "approved",
        "worker-01",
        "10.0.5.100/24",
        {"rack": "a"},
    )
    assert device.approved_by == "rule:rack-a"
    second = next_mac()
    assert config(client, second).status_code == 200
    assert services.devices.resolve(second).hostname == "worker-02"
    entries, _ = services.audit.list(AuditQuery(action="approve"))
    assert {(e.actor, e.actor_type, e.details["rule"], e.details["rule_revision"]) for e in entries} == {
        ("rule:rack-a", "rule", "rack-a", 1)
    }


def test_a_machine_outside_the_rule_stays_pending(client: TestClient, services: Services, bases: Path) -> None:
    services.rules.apply(ADMIN, "lab", {"match": {"sourceSubnet": "10.0.5.0/24"}, "action": "approve"})
    mac = next_mac()
    assert config(client, mac, source="10.9.9.9").status_code == 403
    assert services.devices.resolve(mac).status == "pending"


def test_a_disabled_rule_decides_nothing(client: TestClient, services: Services, bases: Path) -> None:
    services.rules.apply(ADMIN, "off", {"enabled": False, "action": "approve"})
    mac = next_mac()
    assert config(client, mac).status_code == 403
    assert services.devices.resolve(mac).status == "pending"


def test_rules_are_tried_in_priority_order(client: TestClient, services: Services, bases: Path) -> None:
    services.rules.apply(ADMIN, "z-approve", {"priority": 50, "action": "approve"})
    services.rules.apply(
        ADMIN, "a-quarantine", {"priority": 5, "match": {"sourceSubnet": "10.66.0.0/16"}, "action": "reject"}
    )
    bad, good = next_mac(), next_mac()
    assert config(client, bad, source="10.66.1.1").status_code == 403
    assert config(client, good).status_code == 200
    assert services.devices.resolve(bad).status == "rejected"
    assert services.devices.resolve(bad).rejected_by == "rule:a-quarantine"
    assert services.devices.resolve(good).approved_by == "rule:z-approve"


def test_max_count_stops_the_rule(client: TestClient, services: Services, bases: Path) -> None:
    services.rules.apply(ADMIN, "two", {"action": "approve", "hostnamePattern": "n{n}", "maxCount": 2})
    macs = [next_mac() for _ in range(3)]
    assert [config(client, m).status_code for m in macs] == [200, 200, 403]
    assert services.rules.get("two").matched == 2
    assert services.devices.resolve(macs[2]).status == "pending"


def test_an_exhausted_range_leaves_the_machine_pending_and_says_why(
    client: TestClient, services: Services, bases: Path
) -> None:
    services.rules.apply(ADMIN, "tiny", {"action": "approve", "ipRange": "10.0.5.100-10.0.5.100/24"})
    first, second = next_mac(), next_mac()
    assert config(client, first).status_code == 200
    assert config(client, second).status_code == 403
    entries, _ = services.audit.list(AuditQuery(action="rule_failed"))
    assert entries[0].device_mac == second and "no free address" in entries[0].details["reason"]


def test_only_an_admin_writes_a_rule_approving_control_planes(services: Services) -> None:
    with pytest.raises(PermissionDenied):
        services.rules.apply(OPERATOR, "cp", {"action": "approve", "role": "controlplane"})
    services.rules.apply(OPERATOR, "w", {"action": "approve", "role": "worker"})
    assert services.rules.get("w").author_role == "operator"


def test_a_rule_without_role_controlplane_never_approves_a_control_plane(
    client: TestClient, services: Services, bases: Path
) -> None:
    services.rules.apply(ADMIN, "any", {"action": "approve"})
    mac = next_mac()
    services.devices.create(ADMIN, DeviceChanges(mac_address=mac, role="controlplane"))
    assert config(client, mac).status_code == 403
    assert services.devices.resolve(mac).status == "pending"
    services.rules.apply(ADMIN, "cp", {"priority": 1, "action": "approve", "role": "controlplane"})
    assert config(client, mac).status_code == 200
    device = services.devices.resolve(mac)
    assert (device.status, device.role, device.approved_by) == ("approved", "controlplane", "rule:cp")
    released, _ = services.audit.list(AuditQuery(action="secrets_release"))
    assert [e.actor for e in released] == ["rule:cp"]


def test_the_ipxe_door_and_hardware_facts(client: TestClient, services: Services) -> None:
    services.rules.apply(
        ADMIN,
        "dell",
        {"match": {"door": "ipxe", "facts": {"manufacturer": "Dell*"}}, "action": "approve", "hostnamePattern": "d{n}"},
    )
    dell, hpe = next_mac(), next_mac()
    for mac, maker in ((dell, "Dell Inc."), (hpe, "HPE")):
        r = client.get("/api/v1/boot/ipxe", params={"mac": mac, "manufacturer": maker, "arch": "x86_64"})
        assert r.status_code == 200
    assert services.devices.resolve(dell).hostname == "d1"
    assert services.devices.resolve(hpe).status == "pending"


def test_an_agent_is_approved_by_a_rule_and_picks_up_its_certificate(client: TestClient, services: Services) -> None:
    services.rules.apply(
        ADMIN, "agents", {"match": {"door": "agent", "sourceSubnet": "10.0.0.0/24"}, "action": "approve"}
    )
    r = client.post("/api/v1/enroll", json=body(hostname="web-07"))
    assert r.status_code == 202, r.text
    token = r.json()["polling_token"]
    picked = client.get(f"/api/v1/enroll/status/{token}")
    assert picked.status_code == 200, picked.text
    assert "BEGIN CERTIFICATE" in picked.json()["server_crt"]
    approvals, _ = services.audit.list(AuditQuery(action="approve"))
    assert [(e.actor, e.details["rule"]) for e in approvals] == [("rule:agents", "agents")]


def test_a_rule_racing_an_operator_decides_once(services: Services) -> None:
    services.rules.apply(ADMIN, "racer", {"action": "approve", "hostnamePattern": "r{n}"})
    for _ in range(5):
        device = pending(services, next_mac())  # registering already ran the rule once: it approved it
        assert services.devices.get(device.id).status == "approved"
    services.rules.apply(ADMIN, "racer", {"action": "approve", "hostnamePattern": "r{n}", "enabled": False})
    targets = [pending(services, next_mac()) for _ in range(5)]
    services.rules.apply(ADMIN, "racer", {"action": "approve", "hostnamePattern": "r{n}"})
    errors: list[BaseException] = []

    def operator(device_id: int) -> None:
        try:
            services.devices.approve(OPERATOR, device_id, DeviceChanges(hostname=f"manual-{device_id}"))
        except Exception as exc:  # the loser of the race is told, not half-applied
            errors.append(exc)

    def machine(mac: str) -> None:
        try:
            pending(services, mac)
        except Exception as exc:
            errors.append(exc)

    threads = []
    for device in targets:
        threads.append(threading.Thread(target=operator, args=(device.id,)))
        threads.append(threading.Thread(target=machine, args=(device.mac_address,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for device in targets:
        approvals, _ = services.audit.list(AuditQuery(device_id=device.id, action="approve"))
        assert len(approvals) == 1  # exactly one of them decided
        final = services.devices.get(device.id)
        assert final.status == "approved"
        assert final.approved_by == approvals[0].actor
        assert final.hostname == (f"manual-{device.id}" if approvals[0].actor == "ops" else final.hostname)
    assert all("approved" in str(e) or "pending" in str(e) for e in errors), errors


def test_dry_run_shows_what_each_pending_machine_would_get(services: Services) -> None:
    waiting = [pending(services, next_mac(), source_ip="10.0.5.9") for _ in range(3)]
    elsewhere = pending(services, next_mac(), source_ip="10.7.7.7")
    services.rules.apply(
        ADMIN,
        "later",
        {
            "enabled": False,
            "match": {"sourceSubnet": "10.0.5.0/24"},
            "action": "approve",
            "hostnamePattern": "w-{n:03d}",
            "ipRange": "10.0.5.20-10.0.5.30/24",
            "maxCount": 2,
        },
    )
    rule, outcomes, passed = services.rules.dry_run("later")
    assert rule.name == "later" and passed == 1
    assert [(o.device_id, o.hostname, o.ip_address) for o in outcomes] == [
        (waiting[0].id, "w-001", "10.0.5.20/24"),
        (waiting[1].id, "w-002", "10.0.5.21/24"),
    ]
    assert services.devices.get(elsewhere.id).status == "pending"
    assert all(services.devices.get(d.id).status == "pending" for d in waiting)  # a dry run decides nothing
