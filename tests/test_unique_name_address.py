"""Two approved machines never share a static IP or a hostname (they would break each other, and etcd);
a rejected machine frees both, so a failed machine is replaced by rejecting it and approving the new one."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from ktizo.web.session import CSRF_FIELD, SESSION_COOKIE, csrf_token


def _create(client: TestClient, ops: dict[str, str], mac: str) -> int:
    r = client.post("/api/v1/devices", json={"mac_address": mac}, headers=ops)
    assert r.status_code == 201, r.text
    device_id: int = r.json()["id"]
    return device_id


def _approve(client: TestClient, ops: dict[str, str], device_id: int, **body: str):  # type: ignore[no-untyped-def]
    return client.post(f"/api/v1/devices/{device_id}/approve", json=body, headers=ops)


def test_an_address_or_name_in_use_is_refused_with_the_holder_named(client: TestClient, ops: dict[str, str]) -> None:
    first = _create(client, ops, "52:54:00:00:10:01")
    second = _create(client, ops, "52:54:00:00:10:02")
    assert _approve(client, ops, first, hostname="node-01", ip_address="10.0.5.100/24").status_code == 200

    r = _approve(client, ops, second, hostname="node-02", ip_address="10.0.5.100/25")  # same host, other prefix
    assert r.status_code == 409
    assert r.json()["detail"] == (
        f"10.0.5.100 is already the static IP of approved device {first} (52:54:00:00:10:01): "
        "pick another address, or change or revoke that device first"
    )
    r = _approve(client, ops, second, hostname="NODE-01", ip_address="10.0.5.101/24")
    assert r.status_code == 409
    assert r.json()["detail"].startswith(f"node-01 is already the hostname of approved device {first} ")
    # Nothing half-written: the refused device is still pending without the fields.
    dev = client.get(f"/api/v1/devices/{second}", headers=ops).json()
    assert (dev["status"], dev["hostname"], dev["ip_address"]) == ("pending", None, None)

    assert _approve(client, ops, second, hostname="node-02", ip_address="10.0.5.101/24").status_code == 200
    r = client.put(f"/api/v1/devices/{second}", json={"ip_address": "10.0.5.100/24"}, headers=ops)
    assert r.status_code == 409 and "10.0.5.100" in r.json()["detail"]
    r = client.put(f"/api/v1/devices/{second}", json={"hostname": "node-01"}, headers=ops)
    assert r.status_code == 409 and "node-01" in r.json()["detail"]
    assert client.get(f"/api/v1/devices/{second}", headers=ops).json()["hostname"] == "node-02"


def test_replacing_a_failed_machine_reuses_its_name_and_address(client: TestClient, ops: dict[str, str]) -> None:
    old = _create(client, ops, "52:54:00:00:20:01")
    new = _create(client, ops, "52:54:00:00:20:02")
    assert _approve(client, ops, old, hostname="cp-1", ip_address="10.0.5.10/24").status_code == 200
    assert client.post(f"/api/v1/devices/{old}/reject", json={}, headers=ops).status_code == 200
    assert _approve(client, ops, new, hostname="cp-1", ip_address="10.0.5.10/24").status_code == 200
    # The old one cannot come back with the same fields while the new one holds them.
    r = _approve(client, ops, old)
    assert r.status_code == 409 and "10.0.5.10" in r.json()["detail"]


def test_a_deleted_devices_id_is_never_given_to_another(client: TestClient, ops: dict[str, str]) -> None:
    """Its audit history stays under that id, so a new machine must not inherit it."""
    first = _create(client, ops, "52:54:00:00:30:01")
    gone = _create(client, ops, "52:54:00:00:30:02")
    assert client.delete(f"/api/v1/devices/{gone}", headers=ops).status_code == 204
    newcomer = _create(client, ops, "52:54:00:00:30:03")
    assert newcomer > gone > first
    history = client.get(f"/api/v1/audit?device_id={gone}", headers=ops).json()["items"]
    assert {e["device_mac"] for e in history} == {"52:54:00:00:30:02"}


def test_the_approve_form_shows_the_clash_next_to_the_field(client: TestClient, ops: dict[str, str]) -> None:
    first = _create(client, ops, "52:54:00:00:40:01")
    second = _create(client, ops, "52:54:00:00:40:02")
    assert _approve(client, ops, first, hostname="edge-1", ip_address="10.0.7.5/24").status_code == 200
    session = ops["Authorization"].removeprefix("Bearer ")
    client.cookies.set(SESSION_COOKIE, session, path="/ui")
    form = {CSRF_FIELD: csrf_token(session), "hostname": "edge-2", "ip_address": "10.0.7.5/24", "role": "worker"}
    r = client.post(f"/ui/devices/{second}/approve", data=form, headers={"HX-Request": "true"})
    assert r.status_code == 422
    field = re.search(r'<input[^>]*id="d\d+-ip"[^>]*aria-invalid="true"', r.text)
    assert field is not None, "the IP field is marked invalid"
    said = re.search(r'<p class="field-error"[^>]*>.*?</svg> ([^<]*)</p>', r.text)
    assert said is not None and said.group(1).startswith("10.0.7.5 is already the static IP of approved device")
    assert client.get(f"/api/v1/devices/{second}", headers=ops).json()["status"] == "pending"
