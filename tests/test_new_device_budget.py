"""One address cannot flood the pending list with invented machines: each source address may register
KTIZO_NEW_DEVICES_PER_MINUTE unknown machines a minute through the unauthenticated doors; more get 429 with
Retry-After (Talos retries), known machines are never refused for it, and other addresses are unaffected."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from fastapi.testclient import TestClient
from sqlalchemy import update

from ktizo.db.models import Device
from ktizo.db.types import utcnow
from ktizo.services.devices import DeviceQuery
from ktizo.services.registry import Services
from tests.support import TALOS_HEADERS, talos_url

Make = Callable[..., tuple[TestClient, Services]]


def mac(i: int) -> str:
    return f"52:54:00:0b:{i // 256:02x}:{i % 256:02x}"


def count(services: Services) -> int:
    return services.devices.list(DeviceQuery())[1]


def test_the_doors_share_one_budget_per_address(make_client: Make) -> None:
    client, services = make_client(new_devices_per_minute=4)
    assert client.get(talos_url(mac=mac(1)), headers=TALOS_HEADERS).status_code == 403
    assert client.post("/api/v1/devices/register", json={"mac_address": mac(2)}).status_code == 201
    assert client.post("/api/v1/config/download", json={"mac_address": mac(3)}).status_code == 403
    assert client.get("/api/v1/boot/ipxe", params={"mac": mac(4), "arch": "x86_64"}).status_code == 200
    assert count(services) == 4

    r = client.get(talos_url(mac=mac(5)), headers=TALOS_HEADERS)
    assert r.status_code == 429
    assert r.text.startswith("too many new machines from 10.0.0.9 in the last minute (4); this one is registered")
    assert 1 <= int(r.headers["Retry-After"]) <= 61
    r = client.post("/api/v1/devices/register", json={"mac_address": mac(6)})
    assert r.status_code == 429 and r.json()["detail"].startswith("too many new machines from 10.0.0.9")
    assert "Retry-After" in r.headers
    r = client.post("/api/v1/config/download", json={"mac_address": mac(7)})
    assert r.status_code == 429 and "Retry-After" in r.headers
    # iPXE still boots the machine (nothing secret in the script), without recording it.
    script = client.get("/api/v1/boot/ipxe", params={"mac": mac(8), "arch": "x86_64"})
    assert script.status_code == 200 and "kernel " in script.text
    assert count(services) == 4

    # Known machines keep being answered as before.
    assert client.get(talos_url(mac=mac(1)), headers=TALOS_HEADERS).status_code == 403
    assert client.post("/api/v1/devices/register", json={"mac_address": mac(2)}).status_code == 200

    # Another address has its own budget.
    other = TestClient(client.app, client=("10.0.0.10", 40000))
    assert other.get(talos_url(mac=mac(9)), headers=TALOS_HEADERS).status_code == 403

    # A minute later the refused machine gets in when it asks again, as Talos does.
    with services.db.write() as s:
        s.execute(update(Device).values(first_seen=utcnow() - dt.timedelta(minutes=2)))
    assert client.get(talos_url(mac=mac(5)), headers=TALOS_HEADERS).status_code == 403
    assert services.devices.resolve(mac(5)).status == "pending"


def test_the_device_flow_answers_429_in_oauth_form(make_client: Make) -> None:
    client, _ = make_client(new_devices_per_minute=1, oauth_enabled=True)
    form = {"client_id": "ktizo", "scope": "openid"}
    assert client.post("/device/code", data={**form, "mac": mac(1)}).status_code == 200
    r = client.post("/device/code", data={**form, "mac": mac(2)})
    assert r.status_code == 429
    assert r.json()["error"] == "temporarily_unavailable"
    assert "too many new machines" in r.json()["error_description"]


def test_zero_means_no_budget(make_client: Make) -> None:
    client, services = make_client(new_devices_per_minute=0)
    for i in range(30):
        assert client.get(talos_url(mac=mac(i)), headers=TALOS_HEADERS).status_code == 403
    assert count(services) == 30
