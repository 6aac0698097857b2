"""The seed's device API: list, create, get, update, delete, approve, reject — with roles enforced."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.support import bearer


def _create(client: TestClient, headers: dict[str, str], **body: object) -> dict[str, object]:
    r = client.post("/api/v1/devices", json=body, headers=headers)
    assert r.status_code == 201, r.text
    data: dict[str, object] = r.json()
    return data


def test_preregistered_device_is_pending_and_listed_by_status(client: TestClient, ops: dict[str, str]) -> None:
    dev = _create(client, ops, mac_address="AA-BB-CC-00-00-01", hostname="Node-01", notes="rack 3")
    assert dev["mac_address"] == "aa:bb:cc:00:00:01"
    assert dev["hostname"] == "node-01"
    assert dev["status"] == "pending"
    assert dev["role"] == "worker"
    assert dev["source"] == "manual"

    pending = client.get("/api/v1/devices?status=pending", headers=ops)
    assert [d["id"] for d in pending.json()] == [dev["id"]]
    assert pending.headers["x-total-count"] == "1"
    assert client.get("/api/v1/devices?status=approved", headers=ops).json() == []


def test_approve_sets_fields_and_records_who_and_when(
    client: TestClient, ops: dict[str, str], admin: dict[str, str]
) -> None:
    dev = _create(client, ops, mac_address="aa:bb:cc:00:00:02")
    r = client.post(
        f"/api/v1/devices/{dev['id']}/approve",
        json={"hostname": "cp-1", "ip_address": "10.0.5.100/24", "role": "controlplane", "notes": "first"},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["status"], body["hostname"], body["ip_address"], body["role"], body["notes"]) == (
        "approved",
        "cp-1",
        "10.0.5.100/24",
        "controlplane",
        "first",
    )
    assert body["approved_by"] == "root"
    assert body["approved_at"] is not None


def test_approve_without_role_defaults_to_worker(client: TestClient, ops: dict[str, str]) -> None:
    dev = _create(client, ops, mac_address="aa:bb:cc:00:00:03")
    body = client.post(f"/api/v1/devices/{dev['id']}/approve", headers=ops).json()
    assert (body["status"], body["role"]) == ("approved", "worker")


def test_transitions_reject_revoke_reapprove_and_refuse_the_rest(client: TestClient, ops: dict[str, str]) -> None:
    dev = _create(client, ops, mac_address="aa:bb:cc:00:00:04")
    url = f"/api/v1/devices/{dev['id']}"
    assert client.post(f"{url}/reject", headers=ops).json()["status"] == "rejected"
    again = client.post(f"{url}/reject", headers=ops)
    assert again.status_code == 409
    assert "already rejected" in again.json()["detail"]
    assert client.post(f"{url}/approve", json={}, headers=ops).json()["status"] == "approved"  # re-approval
    twice = client.post(f"{url}/approve", json={}, headers=ops)
    assert twice.status_code == 409
    assert "already approved" in twice.json()["detail"]
    revoked = client.post(f"{url}/reject", json={"notes": "decommissioned"}, headers=ops).json()
    assert (revoked["status"], revoked["notes"], revoked["rejected_by"]) == (
        "rejected",
        "decommissioned",
        "ops",
    )


def test_put_changes_only_the_fields_given_and_null_clears(
    client: TestClient, ops: dict[str, str], admin: dict[str, str]
) -> None:
    dev = _create(client, ops, mac_address="aa:bb:cc:00:00:05", hostname="old", ip_address="10.1.0.5/16")
    url = f"/api/v1/devices/{dev['id']}"
    body = client.put(url, json={"hostname": "new"}, headers=ops).json()
    assert (body["hostname"], body["ip_address"]) == ("new", "10.1.0.5/16")
    body = client.put(url, json={"ip_address": None, "role": "controlplane"}, headers=admin).json()
    assert (body["hostname"], body["ip_address"], body["role"]) == ("new", None, "controlplane")
    assert client.get(url, headers=ops).json()["revision"] == body["revision"]


def test_delete_removes_the_device_but_keeps_its_history(client: TestClient, ops: dict[str, str]) -> None:
    dev = _create(client, ops, mac_address="aa:bb:cc:00:00:06")
    assert client.delete(f"/api/v1/devices/{dev['id']}", headers=ops).status_code == 204
    missing = client.get(f"/api/v1/devices/{dev['id']}", headers=ops)
    assert missing.status_code == 404
    assert missing.json()["detail"] == f"no device with id {dev['id']}"
    actions = [e["action"] for e in client.get(f"/api/v1/audit?device_id={dev['id']}", headers=ops).json()["items"]]
    assert actions == ["delete", "create"]


def test_duplicate_mac_is_a_conflict(client: TestClient, ops: dict[str, str]) -> None:
    _create(client, ops, mac_address="aa:bb:cc:00:00:07")
    r = client.post("/api/v1/devices", json={"mac_address": "AABBCC000007"}, headers=ops)
    assert r.status_code == 409
    assert "aa:bb:cc:00:00:07 already exists" in r.json()["detail"]


def test_no_credentials_is_401_and_weak_roles_are_403(
    client: TestClient, viewer_token: str, operator_token: str
) -> None:
    r = client.get("/api/v1/devices")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/api/v1/devices", headers={"Authorization": "Bearer ktz_forged"}).status_code == 401
    viewer = bearer(viewer_token)
    assert client.get("/api/v1/devices", headers=viewer).status_code == 200
    r = client.post("/api/v1/devices", json={"mac_address": "aa:bb:cc:00:00:08"}, headers=viewer)
    assert r.status_code == 403
    assert "operator role" in r.json()["detail"]
    r = client.put("/api/v1/cluster/base/worker", content=b"x", headers=bearer(operator_token))
    assert r.status_code == 403
    assert "admin role" in r.json()["detail"]


def test_login_gives_a_token_that_works_and_is_audited(client: TestClient, services, admin) -> None:  # type: ignore[no-untyped-def]
    from ktizo.domain.users import UserRole
    from ktizo.services.context import Actor

    services.users.create(Actor.system(), "alice", UserRole.VIEWER, "correct horse battery")
    bad = client.post("/api/v1/auth/login", json={"username": "alice", "password": "wrong password!"})
    assert bad.status_code == 401
    r = client.post("/api/v1/auth/login", json={"username": "alice", "password": "correct horse battery"})
    assert r.status_code == 200
    token = r.json()["access_token"]
    assert client.get("/api/v1/auth/me", headers=bearer(token)).json() == {
        "username": "alice",
        "role": "viewer",
    }
    actions = [(e["actor"], e["action"]) for e in client.get("/api/v1/audit", headers=admin).json()["items"]]
    assert ("alice", "login") in actions
    assert ("alice", "login_failed") in actions
