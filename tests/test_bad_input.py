"""Bad input gets a clear 4xx naming the field, never a 500, and nothing is half-written."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ktizo.services.registry import Services
from tests.support import TALOS_FIXTURES, TALOS_HEADERS, talos_url


def _field_error(r, field: str) -> str:  # type: ignore[no-untyped-def]
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    matching = [e for e in errors if e["loc"][-1] == field]
    assert matching, errors
    msg: str = matching[0]["msg"]
    return msg


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"mac_address": "01:00:5e:00:00:01"}, "mac_address", "multicast"),
        ({"mac_address": "aa:bb:cc"}, "mac_address", "not a MAC address"),
        ({"mac_address": "aa:bb:cc:00:00:10", "hostname": "bad_host"}, "hostname", "RFC 1123"),
        (
            {"mac_address": "aa:bb:cc:00:00:10", "hostname": "<script>alert(1)</script>"},
            "hostname",
            "RFC 1123",
        ),
        ({"mac_address": "aa:bb:cc:00:00:10", "ip_address": "10.0.5.100"}, "ip_address", "no prefix"),
        ({"mac_address": "aa:bb:cc:00:00:10", "ip_address": "10.0.5.0/24"}, "ip_address", "network address"),
        ({"mac_address": "aa:bb:cc:00:00:10", "role": "master"}, "role", "controlplane"),
        ({"mac_address": "aa:bb:cc:00:00:10", "colour": "red"}, "colour", "Extra inputs"),
    ],
)
def test_malformed_device_fields_are_refused_by_name(
    client: TestClient, ops: dict[str, str], body: dict[str, str], field: str, says: str
) -> None:
    r = client.post("/api/v1/devices", json=body, headers=ops)
    assert says in _field_error(r, field)
    assert client.get("/api/v1/devices", headers=ops).json() == []


def test_failed_approval_leaves_the_device_untouched(client: TestClient, ops: dict[str, str]) -> None:
    dev = client.post("/api/v1/devices", json={"mac_address": "aa:bb:cc:00:00:11"}, headers=ops).json()
    r = client.post(
        f"/api/v1/devices/{dev['id']}/approve",
        json={"hostname": "ok", "ip_address": "300.1.1.1/24"},
        headers=ops,
    )
    assert "not an IP address" in _field_error(r, "ip_address")
    after = client.get(f"/api/v1/devices/{dev['id']}", headers=ops).json()
    assert (after["status"], after["hostname"]) == ("pending", None)
    assert [e["action"] for e in client.get(f"/api/v1/audit?device_id={dev['id']}", headers=ops).json()["items"]] == [
        "create"
    ]


def test_static_ip_without_a_mac_is_refused(client: TestClient, ops: dict[str, str]) -> None:
    r = client.post(
        "/api/v1/devices",
        json={"uuid": "4c4c4544-0042-3510-8051-b4c04f4e3132", "ip_address": "10.0.0.5/24"},
        headers=ops,
    )
    assert "MAC" in _field_error(r, "ip_address")


def test_unknown_device_is_404_and_non_numeric_id_is_422(client: TestClient, ops: dict[str, str]) -> None:
    r = client.post("/api/v1/devices/999/approve", headers=ops)
    assert (r.status_code, r.json()["detail"]) == (404, "no device with id 999")
    assert client.get("/api/v1/devices/abc", headers=ops).status_code == 422


def test_bodies_over_64_kib_are_refused_with_413(client: TestClient, ops: dict[str, str]) -> None:
    big = {"mac_address": "aa:bb:cc:00:00:12", "notes": "x" * (65 * 1024)}
    r = client.post("/api/v1/devices", json=big, headers=ops)
    assert r.status_code == 413
    assert "too large" in r.json()["detail"]

    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"mac_address": "aa:bb:cc:00:00:12", "notes": "'
        for _ in range(70):
            yield b"y" * 1024
        yield b'"}'

    # No Content-Length: the body is counted as it streams in.
    r = client.post("/api/v1/devices/register", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert client.get("/api/v1/devices", headers=ops).json() == []


def test_malformed_json_is_422_not_500(client: TestClient, ops: dict[str, str]) -> None:
    r = client.post("/api/v1/devices/register", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (b"machine: [unclosed", "line"),
        (b"- just\n- a list\n", "mapping"),
        (b"a: &x [1]\nb: *x\n", "anchor"),
        (b"version: v1alpha1\nmachine:\n  type: worker\n  instal: {}\n", "instal"),
        (b"apiVersion: v1alpha1\nkind: NoSuchKind\n", "NoSuchKind"),
    ],
)
def test_base_config_upload_refuses_what_talos_would_refuse(
    client: TestClient, admin: dict[str, str], payload: bytes, says: str
) -> None:
    r = client.put(
        "/api/v1/cluster/base/worker", content=payload, headers={**admin, "Content-Type": "application/yaml"}
    )
    assert r.status_code == 422, r.text
    assert says in str(r.json()["detail"])
    assert client.get("/api/v1/cluster/base", headers=admin).json()["worker"]["present"] is False


def test_base_config_upload_checks_the_role(client: TestClient, admin: dict[str, str]) -> None:
    worker = (TALOS_FIXTURES / "worker.yaml").read_bytes()
    r = client.put("/api/v1/cluster/base/controlplane", content=worker, headers=admin)
    assert r.status_code == 422
    assert "not a controlplane" in str(r.json()["detail"])
    ok = client.put("/api/v1/cluster/base/worker", content=worker, headers=admin)
    assert ok.status_code == 200
    assert ok.json()["present"] is True
    assert client.get("/api/v1/cluster/base/worker", headers=admin).content == worker


def test_fifty_concurrent_first_contacts_make_exactly_one_device(
    client: TestClient, ops: dict[str, str], services: Services, bases: Path
) -> None:
    barrier = threading.Barrier(50)

    def knock(_: int) -> tuple[int, str]:
        barrier.wait()
        r = client.get(
            talos_url(mac="52:54:00:aa:bb:cc", uuid="4c4c4544-0042-3510-8051-b4c04f4e3132"),
            headers=TALOS_HEADERS,
        )
        return r.status_code, r.text.strip()

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(knock, range(50)))
    assert answers == [(403, "Device not approved. Current status: pending")] * 50
    devices = client.get("/api/v1/devices", headers=ops).json()
    assert len(devices) == 1
    registrations = client.get("/api/v1/audit?action=register", headers=ops).json()
    assert registrations["total"] == 1


def test_concurrent_approve_and_reject_leave_one_consistent_outcome(client: TestClient, ops: dict[str, str]) -> None:
    dev = client.post("/api/v1/devices", json={"mac_address": "aa:bb:cc:00:00:13"}, headers=ops).json()
    barrier = threading.Barrier(10)

    def act(i: int) -> int:
        barrier.wait()
        verb = "approve" if i % 2 else "reject"
        return client.post(f"/api/v1/devices/{dev['id']}/{verb}", headers=ops).status_code

    with ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(act, range(10)))
    # Every success is one valid step of the state machine, in the order the database saw them.
    events = client.get(f"/api/v1/audit?device_id={dev['id']}", headers=ops).json()["items"][::-1]
    steps = [e for e in events if e["action"] in ("approve", "reject")]
    assert len(steps) == codes.count(200) >= 1
    assert codes.count(409) == 10 - codes.count(200)
    state = "pending"
    for step in steps:
        assert step["details"]["from"] == state
        state = {"approve": "approved", "reject": "rejected"}[step["action"]]
    assert client.get(f"/api/v1/devices/{dev['id']}", headers=ops).json()["status"] == state


def test_unicode_digits_in_a_reference_are_a_404_not_a_500(client: TestClient, admin: dict[str, str]) -> None:
    # "²".isdigit() is True but int("²") fails: references must be ASCII digits to be ids.
    r = client.get("/api/v1/groups/²", headers=admin)
    assert r.status_code == 404
    assert "no device group" in r.json()["detail"]
