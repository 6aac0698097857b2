"""The audit trail: every change recorded with who, what, when and from where; rows can never be altered."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from ktizo.services.registry import Services


def test_every_operator_step_is_recorded_with_actor_and_source(client: TestClient, ops: dict[str, str]) -> None:
    dev = client.post("/api/v1/devices", json={"mac_address": "aa:bb:cc:00:01:01"}, headers=ops).json()
    url = f"/api/v1/devices/{dev['id']}"
    client.put(url, json={"hostname": "h1"}, headers=ops)
    client.post(f"{url}/approve", json={"ip_address": "10.0.0.7/24"}, headers=ops)
    client.post(f"{url}/reject", headers=ops)
    page = client.get(f"/api/v1/audit?device_id={dev['id']}", headers=ops).json()
    assert [e["action"] for e in page["items"]] == ["reject", "approve", "update", "create"]
    assert {(e["actor"], e["actor_type"], e["source_ip"], e["device_mac"]) for e in page["items"]} == {
        ("ops", "user", "10.0.0.9", "aa:bb:cc:00:01:01")
    }
    update = page["items"][2]
    assert update["details"] == {"hostname": {"from": None, "to": "h1"}}
    assert page["items"][0]["details"]["revoked"] is True


def test_audit_filters_and_paging(client: TestClient, ops: dict[str, str]) -> None:
    for i in range(5):
        client.post("/api/v1/devices", json={"mac_address": f"aa:bb:cc:00:02:0{i}"}, headers=ops)
    page = client.get("/api/v1/audit?action=create&limit=2&offset=1", headers=ops).json()
    assert (page["total"], len(page["items"]), page["limit"], page["offset"]) == (5, 2, 2, 1)
    assert [e["device_mac"] for e in page["items"]] == ["aa:bb:cc:00:02:03", "aa:bb:cc:00:02:02"]
    assert client.get("/api/v1/audit?actor=nobody", headers=ops).json()["total"] == 0
    assert client.get("/api/v1/audit?since=2999-01-01T00:00:00", headers=ops).json()["total"] == 0
    assert client.get("/api/v1/audit?action=create&until=2999-01-01T00:00:00Z", headers=ops).json()["total"] == 5


@pytest.mark.parametrize("statement", ["UPDATE audit_events SET actor = 'mallory'", "DELETE FROM audit_events"])
def test_the_database_refuses_to_rewrite_history(
    client: TestClient, ops: dict[str, str], services: Services, statement: str
) -> None:
    client.post("/api/v1/devices", json={"mac_address": "aa:bb:cc:00:03:01"}, headers=ops)
    with pytest.raises(DBAPIError, match="append-only"), services.db.write() as s:
        s.execute(text(statement))
    assert client.get("/api/v1/audit", headers=ops).json()["items"][0]["actor"] == "ops"
