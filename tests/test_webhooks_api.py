"""``/api/v1/webhooks`` and ``ktizo webhooks``: admins manage subscriptions (the secret shown once, on create),
operators read them (the target's path hidden) and their delivery log, a test send reports the receiver's answer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ktizo.services.registry import Services
from tests.factories import approved
from tests.webhook_receiver import Receiver, free_port, verify

SECRET = "s3cret-s3cret-s3cret"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def test_admins_create_and_the_secret_is_shown_once(
    client: TestClient, admin: dict[str, str], ops: dict[str, str], receiver: Receiver
) -> None:
    r = client.post(
        "/api/v1/webhooks",
        json={"name": "chat", "url": receiver.url + "?token=abc", "events": ["device.approved", "cert.issued"]},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["secret"].startswith("whsec_") and r.headers["cache-control"] == "no-store"
    assert made["events"] == ["cert.issued", "device.approved"] and made["format"] == "json" and made["enabled"]
    assert made["deliveries"] == {"pending": 0, "delivered": 0, "failed": 0} and made["created_by"] == "root"
    listed = client.get("/api/v1/webhooks", headers=admin).json()
    assert [h["name"] for h in listed] == ["chat"] and "secret" not in listed[0]
    assert listed[0]["url"] == receiver.url + "?token=abc"
    as_ops = client.get("/api/v1/webhooks/chat", headers=ops).json()
    assert as_ops["url"] == f"http://127.0.0.1:{receiver.port}/…" and "secret" not in as_ops
    assert made["secret"] not in client.get("/api/v1/audit", headers=admin).text


def test_refusals(client: TestClient, admin: dict[str, str], ops: dict[str, str]) -> None:
    body: dict[str, Any] = {"name": "x", "url": "https://example.com/", "events": ["*"], "secret": SECRET}
    assert client.post("/api/v1/webhooks", json=body, headers=ops).status_code == 403
    r = client.post("/api/v1/webhooks", json={**body, "url": "file:///etc/passwd"}, headers=admin)
    assert r.status_code == 422 and "only http:// and https://" in r.text
    r = client.post("/api/v1/webhooks", json={**body, "events": ["device.exploded"]}, headers=admin)
    assert r.status_code == 422 and "unknown event 'device.exploded'" in r.text
    assert client.post("/api/v1/webhooks", json={**body, "secret": "short"}, headers=admin).status_code in (400, 422)
    assert client.post("/api/v1/webhooks", json={**body, "extra": 1}, headers=admin).status_code in (400, 422)
    assert client.post("/api/v1/webhooks", json=body, headers=admin).status_code == 201
    assert client.post("/api/v1/webhooks", json=body, headers=admin).status_code == 409
    assert client.get("/api/v1/webhooks/nope", headers=ops).status_code == 404
    assert client.put("/api/v1/webhooks/x", json={"enabled": False}, headers=ops).status_code == 403
    assert client.post("/api/v1/webhooks/x/test", headers=ops).status_code == 403
    assert client.get("/api/v1/webhooks").status_code == 401


def test_update_test_deliveries_delete(
    client: TestClient, services: Services, admin: dict[str, str], ops: dict[str, str], receiver: Receiver
) -> None:
    body = {"name": "ops", "url": f"http://127.0.0.1:{free_port()}/", "events": ["*"], "secret": SECRET}
    assert client.post("/api/v1/webhooks", json=body, headers=admin).status_code == 201
    r = client.post("/api/v1/webhooks/ops/test", headers=admin)
    assert r.status_code == 200 and r.json()["ok"] is False and "refused" in r.json()["error"].lower()
    r = client.put("/api/v1/webhooks/ops", json={"url": receiver.url, "events": ["device.approved"]}, headers=admin)
    assert r.status_code == 200 and r.json()["revision"] == 2 and r.json()["events"] == ["device.approved"]
    r = client.post("/api/v1/webhooks/ops/test", headers=admin)
    assert r.json() == {"ok": True, "delivery_id": receiver.requests[0].delivery, "status": 200, "error": None}
    assert verify(SECRET, receiver.requests[0].headers["x-ktizo-signature"], receiver.requests[0].body)
    device = approved(services, hostname="node-07")
    services.webhooks.run()
    got = receiver.requests[-1]
    assert json.loads(got.body)["machine"]["hostname"] == "node-07"
    log = client.get("/api/v1/webhooks/ops/deliveries", headers=ops).json()
    assert len(log) == 1
    assert log[0]["delivery_id"] == got.delivery and log[0]["event"] == "device.approved"
    assert (log[0]["status"], log[0]["attempts"], log[0]["last_status"], log[0]["last_error"]) == (
        "delivered",
        1,
        200,
        None,
    )
    assert client.get("/api/v1/webhooks/ops/deliveries?status=failed", headers=ops).json() == []
    assert client.get("/api/v1/webhooks/ops/deliveries?status=nope", headers=ops).status_code in (400, 422)
    assert client.get("/api/v1/webhooks/ops", headers=ops).json()["deliveries"]["delivered"] == 1
    assert device.id
    assert client.delete("/api/v1/webhooks/ops", headers=ops).status_code == 403
    assert client.delete("/api/v1/webhooks/ops", headers=admin).status_code == 204
    assert client.get("/api/v1/webhooks", headers=admin).json() == []


def test_the_cli(cli: Any, services: Services, receiver: Receiver) -> None:
    out = cli(
        "webhooks",
        "create",
        "chat",
        "--url",
        receiver.url,
        "--event",
        "device.approved",
        "--event",
        "device.rejected",
        "--format",
        "slack",
    ).output
    assert "created webhook chat: device.approved, device.rejected" in out and "(slack)" in out
    secret = out.split("secret (shown once): ")[1].strip()
    assert secret.startswith("whsec_")
    out = cli("webhooks", "create", "mine", "--url", receiver.url, "--event", "*", "--secret", SECRET).output
    assert "shown once" not in out and SECRET not in out
    refused = cli("webhooks", "create", "bad", "--url", "ftp://x/", "--event", "*", ok=False)
    assert refused.exit_code == 2 and "url: only http:// and https://" in refused.output
    listed = json.loads(cli("webhooks", "list", "--json").output)
    assert [(h["name"], h["format"], h["events"]) for h in listed] == [
        ("chat", "slack", ["device.approved", "device.rejected"]),
        ("mine", "json", ["*"]),
    ]
    assert secret not in cli("webhooks", "list").output and secret not in cli("webhooks", "show", "chat").output
    assert "format      slack" in cli("webhooks", "show", "chat").output
    out = cli("webhooks", "test", "mine").output
    assert out.startswith("delivered: HTTP 200 (X-Ktizo-Delivery ")
    assert verify(SECRET, receiver.requests[0].headers["x-ktizo-signature"], receiver.requests[0].body)
    approved(services, hostname="node-01")
    services.webhooks.run()
    log = json.loads(cli("webhooks", "deliveries", "--json").output)
    assert sorted((d["webhook"], d["event"], d["status"]) for d in log) == [
        ("chat", "device.approved", "delivered"),
        ("mine", "device.approved", "delivered"),
        ("mine", "device.created", "delivered"),
    ]
    table = cli("webhooks", "deliveries", "chat").output
    assert "device.approved" in table and "delivered" in table and "device.created" not in table
    assert json.loads(cli("webhooks", "deliveries", "--status", "pending", "--json").output) == []
    cli("webhooks", "delete", "chat")
    assert [h["name"] for h in json.loads(cli("webhooks", "list", "--json").output)] == ["mine"]
    missing = cli("webhooks", "test", "chat", ok=False)
    assert missing.exit_code == 1 and "no webhook 'chat'" in missing.output
    cli("webhooks", "update-url", ok=False)


def test_the_cli_test_fails_when_the_receiver_does(cli: Any) -> None:
    cli("webhooks", "create", "down", "--url", f"http://127.0.0.1:{free_port()}/", "--event", "*", "--secret", SECRET)
    result = cli("webhooks", "test", "down", ok=False)
    assert result.exit_code == 1 and "not delivered" in result.output and "refused" in result.output.lower()
