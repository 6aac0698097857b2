"""DHCP discovery: what dnsmasq's lease hook reports with the token only the local dnsmasq has, and the
lease IP as a second identity factor for the config download."""

from __future__ import annotations

import datetime as dt
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from ktizo.db.models import Device
from ktizo.domain.devices import IDENTITY_REFUSED
from ktizo.domain.users import UserRole
from ktizo.services.registry import Services
from ktizo.settings import Settings
from tests.support import TALOS_HEADERS, bearer, make_token, talos_url

MAC = "52:54:00:aa:bb:01"
EVENTS = "/api/v1/dhcp/events"


@pytest.fixture
def dhcp_token(services: Services, settings: Settings) -> str:
    return services.dhcp.issue_token(settings.pxe_dir / "dhcp-token")


def event(client: TestClient, token: str | None, action: str, mac: str = MAC, ip: str = "10.0.0.50", **extra: str):  # type: ignore[no-untyped-def]
    headers = bearer(token) if token is not None else {}
    return client.post(EVENTS, json={"action": action, "mac": mac, "ip": ip, **extra}, headers=headers)


def devices(client: TestClient, ops: dict[str, str]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = client.get("/api/v1/devices", headers=ops).json()
    return out


def audit(client: TestClient, ops: dict[str, str], **query: str) -> list[dict[str, object]]:
    items: list[dict[str, object]] = client.get("/api/v1/audit", params=query, headers=ops).json()["items"]
    return items


# -- the token ------------------------------------------------------------------------------------------


def test_issued_token_is_written_for_dnsmasq_only(services: Services, tmp_path: Path) -> None:
    path = tmp_path / "pxe" / "sub" / "dhcp-token"
    token = services.dhcp.issue_token(path)
    assert token.startswith("ktzdhcp_") and len(token) > 40
    assert path.read_text() == token + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Re-issuing over an existing (say, too open) file keeps it private and replaces the token.
    path.chmod(0o600)
    again = services.dhcp.issue_token(path)
    assert again != token and path.read_text() == again + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_wrong_or_missing_token_is_401_and_records_nothing(
    client: TestClient, ops: dict[str, str], dhcp_token: str
) -> None:
    for headers in [
        {},
        {"Authorization": "Bearer ktzdhcp_not-the-token"},
        {"Authorization": "Bearer " + dhcp_token[:-1]},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic a3R6ZGhjcDp4"},
        {"Authorization": dhcp_token},
    ]:
        r = client.post(EVENTS, json={"action": "add", "mac": MAC, "ip": "10.0.0.50"}, headers=headers)
        assert r.status_code == 401, headers
        assert "DHCP event token" in r.json()["detail"]
    assert devices(client, ops) == []
    assert audit(client, ops, action="register") == []


def test_an_operator_token_is_not_the_dhcp_token(client: TestClient, ops: dict[str, str], dhcp_token: str) -> None:
    r = client.post(EVENTS, json={"action": "add", "mac": MAC, "ip": "10.0.0.50"}, headers=ops)
    assert r.status_code == 401
    assert devices(client, ops) == []


def test_a_reissued_token_invalidates_the_old_one(
    client: TestClient, ops: dict[str, str], services: Services, settings: Settings, dhcp_token: str
) -> None:
    new = services.dhcp.issue_token(settings.pxe_dir / "dhcp-token")
    assert event(client, dhcp_token, "add").status_code == 401
    assert devices(client, ops) == []
    assert event(client, new, "add").json() == {"result": "registered"}


# -- what the events do -----------------------------------------------------------------------------------


def test_add_for_an_unknown_mac_registers_a_pending_device_with_its_lease(
    client: TestClient, ops: dict[str, str], dhcp_token: str
) -> None:
    r = event(client, dhcp_token, "add", mac="52-54-00-AA-BB-01", hostname="node-a")
    assert (r.status_code, r.json()) == (200, {"result": "registered"})
    [dev] = devices(client, ops)
    assert (dev["mac_address"], dev["status"], dev["source"], dev["lease_ip"], dev["last_ip"]) == (
        MAC,
        "pending",
        "dhcp",
        "10.0.0.50",
        "10.0.0.50",
    )
    assert dev["facts"] == {"lease_ip": "10.0.0.50", "dhcp_hostname": "node-a"}
    [reg] = audit(client, ops, action="register")
    assert (reg["actor"], reg["actor_type"], reg["device_id"], reg["device_mac"]) == (
        "dnsmasq",
        "system",
        dev["id"],
        MAC,
    )
    assert reg["details"] == {"source": "dhcp", "kind": "talos", "lease_ip": "10.0.0.50"}


@pytest.mark.parametrize("action", ["old", "add"])
def test_renewal_of_a_known_mac_updates_lease_and_last_seen(
    client: TestClient, ops: dict[str, str], services: Services, dhcp_token: str, action: str
) -> None:
    services.devices.register(MAC, "10.0.0.9")  # known already (here: Talos's register call)
    long_ago = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    with services.db.write() as s:
        s.execute(update(Device).values(last_seen=long_ago))
    r = event(client, dhcp_token, action, ip="10.0.0.77")
    assert r.json() == {"result": "updated"}
    [dev] = devices(client, ops)
    assert (dev["source"], dev["lease_ip"]) == ("register", "10.0.0.77")
    last_seen = dt.datetime.fromisoformat(str(dev["last_seen"]))
    assert last_seen.replace(tzinfo=last_seen.tzinfo or dt.UTC) > long_ago + dt.timedelta(days=365)
    # An update is not a registration.
    assert [e["actor"] for e in audit(client, ops, action="register")] == ["device"]


def test_del_clears_the_lease(client: TestClient, ops: dict[str, str], dhcp_token: str) -> None:
    event(client, dhcp_token, "add", ip="10.0.0.50")
    # A release of an address the device no longer holds leaves the current lease alone.
    assert event(client, dhcp_token, "del", ip="10.0.0.49").json() == {"result": "lease released"}
    assert devices(client, ops)[0]["lease_ip"] == "10.0.0.50"
    assert event(client, dhcp_token, "del", ip="10.0.0.50").json() == {"result": "lease released"}
    [dev] = devices(client, ops)
    assert dev["lease_ip"] is None and dev["status"] == "pending"


def test_del_for_an_unknown_mac_registers_nothing(client: TestClient, ops: dict[str, str], dhcp_token: str) -> None:
    r = event(client, dhcp_token, "del")
    assert r.status_code == 200 and r.json()["result"].startswith("ignored")
    assert devices(client, ops) == []


def test_malformed_event_is_422_naming_the_field(client: TestClient, ops: dict[str, str], dhcp_token: str) -> None:
    for body, field in [
        ({"action": "add", "mac": "zz:zz:zz:zz:zz:zz", "ip": "10.0.0.50"}, "mac"),
        ({"action": "add", "mac": "52:54:00:aa:bb:01\nx", "ip": "10.0.0.50"}, "mac"),
        ({"action": "add", "mac": MAC, "ip": "10.0.0.500"}, "ip"),
        ({"action": "add", "mac": MAC, "ip": "not-an-ip"}, "ip"),
        ({"action": "add", "mac": MAC, "ip": "10.0.0.50/24"}, "ip"),
        ({"action": "renew", "mac": MAC, "ip": "10.0.0.50"}, "action"),
        ({"action": "add", "mac": MAC, "ip": "10.0.0.50", "extra": "x"}, "extra"),
    ]:
        r = client.post(EVENTS, json=body, headers=bearer(dhcp_token))
        assert r.status_code == 422, r.text
        locs = [e["loc"] for e in r.json()["detail"]]
        assert ["body", field] in locs, (body, locs)
    assert devices(client, ops) == []


def test_a_hostile_dhcp_hostname_is_not_kept(client: TestClient, ops: dict[str, str], dhcp_token: str) -> None:
    event(client, dhcp_token, "add", hostname="x\nchain http://evil")
    [dev] = devices(client, ops)
    assert dev["facts"] == {"lease_ip": "10.0.0.50"}


def test_ipv6_leases_are_recorded(client: TestClient, ops: dict[str, str], dhcp_token: str) -> None:
    assert event(client, dhcp_token, "add", ip="FD00::0050").json() == {"result": "registered"}
    assert devices(client, ops)[0]["lease_ip"] == "fd00::50"


def test_discovery_subnets_limit_what_registers(
    make_client: Callable[..., tuple[TestClient, Services]], settings: Settings
) -> None:
    client, services = make_client(discovery_subnets=["10.0.0.0/24", "fd00::/64"])
    token = services.dhcp.issue_token(settings.pxe_dir / "dhcp-token")
    ops = bearer(make_token(services, "ops", UserRole.OPERATOR))
    r = event(client, token, "add", ip="192.168.1.5")
    assert r.status_code == 200 and "outside the discovery subnets" in r.json()["result"]
    assert event(client, token, "add", mac="52:54:00:aa:bb:02", ip="10.0.1.5").json()["result"].startswith("ignored")
    assert devices(client, ops) == []
    assert audit(client, ops, action="register") == []
    assert event(client, token, "add", mac="52:54:00:aa:bb:03", ip="10.0.0.7").json() == {"result": "registered"}
    assert event(client, token, "add", mac="52:54:00:aa:bb:04", ip="fd00::7").json() == {"result": "registered"}
    assert sorted(str(d["lease_ip"]) for d in devices(client, ops)) == ["10.0.0.7", "fd00::7"]


# -- the lease IP as a second identity factor --------------------------------------------------------------


def test_config_download_must_come_from_the_lease_ip(
    make_client: Callable[..., tuple[TestClient, Services]], settings: Settings, bases: Path
) -> None:
    client, services = make_client(require_lease_ip=True)
    token = services.dhcp.issue_token(settings.pxe_dir / "dhcp-token")
    ops = bearer(make_token(services, "ops", UserRole.OPERATOR))
    event(client, token, "add", ip="10.0.0.50")
    [dev] = devices(client, ops)
    client.post(f"/api/v1/devices/{dev['id']}/approve", json={"hostname": "node-lease"}, headers=ops)

    # client is 10.0.0.9: a spoofed MAC on another port
    r = client.get(talos_url(mac=MAC), headers=TALOS_HEADERS)
    assert r.status_code == 403
    # The same answer as any unproven identity: nothing says that the lease is what failed, nor which it is.
    assert r.text.strip() == IDENTITY_REFUSED and "10.0.0.50" not in r.text
    r = client.post("/api/v1/config/download", json={"mac_address": MAC})
    assert (r.status_code, r.json()) == (403, {"detail": IDENTITY_REFUSED})
    mismatches = client.get(f"/api/v1/audit?device_id={dev['id']}&action=identity_mismatch", headers=ops).json()
    assert mismatches["items"][0]["details"]["lease_ip"] == {"bound": "10.0.0.50", "claimed": "10.0.0.9"}
    assert devices(client, ops)[0]["last_config_download"] is None

    from_lease = TestClient(client.app, client=("10.0.0.50", 1234))
    r = from_lease.get(talos_url(mac=MAC), headers=TALOS_HEADERS)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/yaml" and "node-lease" in r.text

    # Once the lease is released there is no address the request could come from.
    event(client, token, "del", ip="10.0.0.50")
    r = from_lease.get(talos_url(mac=MAC), headers=TALOS_HEADERS)
    assert (r.status_code, r.text.strip()) == (403, IDENTITY_REFUSED)


def test_without_the_setting_any_address_may_download(
    client: TestClient, ops: dict[str, str], dhcp_token: str, bases: Path
) -> None:
    event(client, dhcp_token, "add", ip="10.0.0.50")
    [dev] = devices(client, ops)
    client.post(f"/api/v1/devices/{dev['id']}/approve", headers=ops)
    assert client.get(talos_url(mac=MAC), headers=TALOS_HEADERS).status_code == 200
