"""Talos's OAuth2 device authorization grant (RFC 8628) exactly as Talos runs it: form-encoded POSTs to
/device/code and /token, the console code an operator approves, and the bearer token the config download
then requires (shared/research/talos.md §1.8)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from typer.testing import CliRunner

from ktizo.app import build_services, create_app
from ktizo.cli import app as cli_app
from ktizo.db.models import DeviceCode
from ktizo.db.types import utcnow
from ktizo.domain.users import UserRole
from ktizo.services.registry import Services
from ktizo.settings import Settings
from ktizo.talos import load_documents
from tests.clock import ManualClock
from tests.support import TALOS_HEADERS, bearer, make_token, talos_url

MAC = "52:54:00:12:34:56"
UUID = "4c4c4544-0042-3510-8051-b4c04f4e3132"
OTHER_MAC = "52:54:00:65:43:21"
OTHER_UUID = "11111111-2222-3333-4444-555555555555"
GRANT = "urn:ietf:params:oauth:grant-type:device_code"
USER_CODE = re.compile(r"[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}")


@dataclass
class Site:
    client: TestClient
    services: Services
    settings: Settings
    ops: dict[str, str]


@pytest.fixture
def site(tmp_path: Path, database_url: str, bases: Path) -> Iterator[Site]:
    """Ktizo with the device flow on (KTIZO_OAUTH_ENABLED), base configs installed, an operator."""
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        last_seen_interval=0,
        long_poll_seconds=0,
        oauth_enabled=True,
    )
    services = build_services(settings)
    with TestClient(create_app(settings, services), client=("10.0.0.9", 40000)) as client:
        yield Site(client, services, settings, bearer(make_token(services, "ops", UserRole.OPERATOR)))
    services.db.dispose()


def start(client: TestClient, mac: str = MAC, uuid: str = UUID, serial: str = "SN-1", **extra: str):  # type: ignore[no-untyped-def]
    """Talos's first request: client_id, scope, and the extra variables from talos.config.oauth.extra_variable."""
    form = {"client_id": "ktizo", "scope": "openid", "mac": mac, "uuid": uuid, "serial": serial, **extra}
    return client.post("/device/code", data=form)


def poll(client: TestClient, device_code: str, **extra: str):  # type: ignore[no-untyped-def]
    form = {"grant_type": GRANT, "device_code": device_code, "client_id": "ktizo", "mac": MAC, "uuid": UUID, **extra}
    return client.post("/token", data=form)


def started(site: Site, mac: str = MAC, uuid: str = UUID) -> dict[str, Any]:
    r = start(site.client, mac=mac, uuid=uuid)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def shift(services: Services, user_code: str, **ago: float) -> None:
    """Move the code's clock: ``last_poll_at=60`` means Talos last polled 60 s ago (no sleeping in tests)."""
    values = {name: utcnow() - dt.timedelta(seconds=seconds) for name, seconds in ago.items()}
    with services.db.write() as s:
        s.execute(update(DeviceCode).where(DeviceCode.user_code == user_code).values(**values))


def code_row(services: Services, user_code: str) -> DeviceCode:
    with services.db.read() as s:
        row = s.scalar(select(DeviceCode).where(DeviceCode.user_code == user_code))
    assert row is not None
    return row


def oauth_error(r, error: str, status: int = 400) -> str:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == error, body
    assert r.headers["cache-control"] == "no-store"
    description: str = body["error_description"]
    return description


def approve_code(site: Site, code: str, headers: dict[str, str] | None = None, **fields: str):  # type: ignore[no-untyped-def]
    return site.client.post(f"/api/v1/device-codes/{code}/approve", json=fields, headers=headers or site.ops)


def token_for(site: Site, mac: str, uuid: str, hostname: str) -> str:
    flow = started(site, mac=mac, uuid=uuid)
    assert approve_code(site, flow["user_code"], hostname=hostname).status_code == 200
    r = poll(site.client, flow["device_code"], mac=mac, uuid=uuid)
    assert r.status_code == 200, r.text
    token: str = r.json()["access_token"]
    return token


# -- the whole flow ---------------------------------------------------------------------------------------


def test_device_flow_from_console_code_to_config(site: Site) -> None:
    client = site.client
    r = start(client, mac="52%3A54%3A00%3A12%3A34%3A56", uuid=UUID.upper())
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    flow = r.json()
    assert set(flow) == {
        "device_code",
        "user_code",
        "verification_uri",
        "verification_uri_complete",
        "expires_in",
        "interval",
    }
    assert USER_CODE.fullmatch(flow["user_code"]), flow["user_code"]
    assert len(flow["device_code"]) >= 32 and flow["user_code"] not in flow["device_code"]
    assert flow["verification_uri"].startswith("http://testserver/")
    assert flow["verification_uri_complete"].startswith(flow["verification_uri"])
    assert flow["user_code"] in flow["verification_uri_complete"]
    assert (flow["expires_in"], flow["interval"]) == (1800, 5)

    # The machine waits as pending, known by what Talos sent.
    [dev] = client.get("/api/v1/devices", headers=site.ops).json()
    assert (dev["mac_address"], dev["uuid"], dev["serial"], dev["status"], dev["source"]) == (
        MAC,
        UUID,
        "SN-1",
        "pending",
        "device_code",
    )
    events = client.get(f"/api/v1/audit?device_id={dev['id']}", headers=site.ops).json()["items"]
    assert [e["action"] for e in events] == ["device_code", "register"]
    assert events[0]["details"] == {"user_code": flow["user_code"]}

    # Talos polls every `interval` seconds.
    oauth_error(poll(client, flow["device_code"]), "authorization_pending")
    # Polled again at once: slow down, and the interval grows by 5 s each time (RFC 8628 §3.5).
    assert "10 seconds" in oauth_error(poll(client, flow["device_code"]), "slow_down")
    assert code_row(site.services, flow["user_code"]).interval == 10
    assert "15 seconds" in oauth_error(poll(client, flow["device_code"]), "slow_down")
    assert code_row(site.services, flow["user_code"]).interval == 15
    shift(site.services, flow["user_code"], last_poll_at=60)
    oauth_error(poll(client, flow["device_code"]), "authorization_pending")

    # Without the token the config download is refused even though the device is approved below.
    code = flow["user_code"].lower().replace("-", "")
    r = approve_code(site, code, hostname="node-01", ip_address="10.0.5.100/24", role="worker")
    assert r.status_code == 200, r.text
    approved = r.json()
    assert (approved["id"], approved["status"], approved["hostname"], approved["ip_address"]) == (
        dev["id"],
        "approved",
        "node-01",
        "10.0.5.100/24",
    )
    assert approved["approved_by"] == "ops"

    shift(site.services, flow["user_code"], last_poll_at=60)
    r = poll(client, flow["device_code"])
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    grant = r.json()
    assert grant["token_type"] == "Bearer" and grant["expires_in"] == 3 * 3600
    token = grant["access_token"]
    assert token and token != flow["device_code"]

    # The device code is spent.
    shift(site.services, flow["user_code"], last_poll_at=60)
    oauth_error(poll(client, flow["device_code"]), "invalid_grant")

    # The config GET Talos then makes carries `Authorization: Bearer <token>`.
    url = talos_url(mac=MAC, uuid=UUID, serial="SN-1")
    r = client.get(url, headers=TALOS_HEADERS)
    assert r.status_code == 403 and "token" in r.text
    r = client.get(url, headers={**TALOS_HEADERS, "Authorization": "Bearer ktzdev_guessed"})
    assert r.status_code == 403
    r = client.get(url, headers={**TALOS_HEADERS, "Authorization": f"Basic {token}"})
    assert r.status_code == 403
    r = client.post("/api/v1/config/download", json={"mac_address": MAC})  # the seed's form is no way around it
    assert r.status_code == 403 and r.json()["detail"].startswith("Device identity not proven")
    r = client.get(url, headers={**TALOS_HEADERS, "Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/yaml"
    docs = {d.get("kind", "v1alpha1"): d for d in load_documents(r.content)}
    assert docs["HostnameConfig"]["hostname"] == "node-01"

    actions = [
        e["action"] for e in client.get(f"/api/v1/audit?device_id={dev['id']}", headers=site.ops).json()["items"]
    ]
    assert actions[:4] == ["config_download", "identity_mismatch", "device_token", "approve"]


def test_another_machines_token_does_not_open_this_config(site: Site) -> None:
    mine = token_for(site, MAC, UUID, "node-a")
    theirs = token_for(site, OTHER_MAC, OTHER_UUID, "node-b")
    url = talos_url(mac=MAC, uuid=UUID)
    r = site.client.get(url, headers={**TALOS_HEADERS, "Authorization": f"Bearer {theirs}"})
    assert r.status_code == 403
    assert "not issued to this machine" in r.text
    r = site.client.get(url, headers={**TALOS_HEADERS, "Authorization": f"Bearer {mine}"})
    assert r.status_code == 200 and "node-a" in r.text
    r = site.client.get(
        talos_url(mac=OTHER_MAC, uuid=OTHER_UUID), headers={**TALOS_HEADERS, "Authorization": f"Bearer {theirs}"}
    )
    assert r.status_code == 200 and "node-b" in r.text


def test_an_expired_access_token_no_longer_opens_the_config(site: Site) -> None:
    token = token_for(site, MAC, UUID, "node-a")
    with site.services.db.write() as s:
        s.execute(update(DeviceCode).values(token_expires_at=utcnow() - dt.timedelta(seconds=1)))
    r = site.client.get(talos_url(mac=MAC, uuid=UUID), headers={**TALOS_HEADERS, "Authorization": f"Bearer {token}"})
    assert r.status_code == 403


# -- token errors, per the RFC ---------------------------------------------------------------------------


def test_expired_code_is_expired_token_and_cannot_be_approved(site: Site) -> None:
    flow = started(site)
    shift(site.services, flow["user_code"], expires_at=1)
    assert "start over" in oauth_error(poll(site.client, flow["device_code"]), "expired_token")
    assert code_row(site.services, flow["user_code"]).status == "expired"
    shift(site.services, flow["user_code"], last_poll_at=60)
    oauth_error(poll(site.client, flow["device_code"]), "expired_token")
    r = approve_code(site, flow["user_code"], hostname="late")
    assert r.status_code == 404 and flow["user_code"] in r.json()["detail"]
    [dev] = site.client.get("/api/v1/devices", headers=site.ops).json()
    assert dev["status"] == "pending"


def test_rejected_machine_gets_access_denied(site: Site) -> None:
    flow = started(site)
    [dev] = site.client.get("/api/v1/devices", headers=site.ops).json()
    assert site.client.post(f"/api/v1/devices/{dev['id']}/reject", headers=site.ops).status_code == 200
    assert "rejected" in oauth_error(poll(site.client, flow["device_code"]), "access_denied")
    # Denied stays denied for this code, even if the machine is approved later: Talos starts a new flow.
    site.client.post(f"/api/v1/devices/{dev['id']}/approve", headers=site.ops)
    shift(site.services, flow["user_code"], last_poll_at=60)
    oauth_error(poll(site.client, flow["device_code"]), "access_denied")


def test_a_device_approved_directly_also_gets_its_token(site: Site) -> None:
    """The operator approves from the device list while the machine waits with its code on the console."""
    flow = started(site)
    [dev] = site.client.get("/api/v1/devices", headers=site.ops).json()
    site.client.post(f"/api/v1/devices/{dev['id']}/approve", json={"hostname": "direct"}, headers=site.ops)
    r = poll(site.client, flow["device_code"])
    assert r.status_code == 200 and r.json()["token_type"] == "Bearer"


def test_naming_an_approved_mac_does_not_buy_a_token(site: Site) -> None:
    """Anyone can start a flow with a MAC they saw on the wire. After the machine was approved, such a flow
    waits for its own code to be approved, with or without the right UUID, and gets no config."""
    flow = started(site)
    assert site.client.post(f"/api/v1/device-codes/{flow['user_code']}/approve", json={}, headers=site.ops).is_success
    assert poll(site.client, flow["device_code"]).status_code == 200

    for form in ({"uuid": ""}, {"uuid": UUID}):
        r = site.client.post("/device/code", data={"client_id": "ktizo", "scope": "openid", "mac": MAC, **form})
        assert r.status_code == 200, r.text
        oauth_error(poll(site.client, r.json()["device_code"]), "authorization_pending")
    tokenless = site.client.get(talos_url(mac=MAC, uuid=UUID, serial="SN-1"), headers=TALOS_HEADERS)
    assert tokenless.status_code == 403


def test_a_flow_that_hid_its_uuid_needs_its_own_code_even_when_the_device_is_approved_directly(site: Site) -> None:
    real = started(site)
    spoof = site.client.post("/device/code", data={"client_id": "ktizo", "scope": "openid", "mac": MAC}).json()
    [dev] = site.client.get("/api/v1/devices", headers=site.ops).json()
    site.client.post(f"/api/v1/devices/{dev['id']}/approve", json={"hostname": "direct"}, headers=site.ops)
    oauth_error(poll(site.client, spoof["device_code"]), "authorization_pending")
    assert poll(site.client, real["device_code"]).status_code == 200


def test_unknown_device_code_is_invalid_grant(site: Site) -> None:
    oauth_error(poll(site.client, "not-a-device-code"), "invalid_grant")
    oauth_error(site.client.post("/token", data={"grant_type": GRANT, "client_id": "ktizo"}), "invalid_grant")


def test_wrong_client_id_is_invalid_client(site: Site) -> None:
    oauth_error(start(site.client, client_id="someone-else"), "invalid_client", 401)
    oauth_error(site.client.post("/device/code", data={"mac": MAC}), "invalid_client", 401)
    assert site.client.get("/api/v1/devices", headers=site.ops).json() == []
    flow = started(site)
    oauth_error(poll(site.client, flow["device_code"], client_id="someone-else"), "invalid_client", 401)


def test_wrong_grant_type_is_unsupported_grant_type(site: Site) -> None:
    flow = started(site)
    for grant in ("authorization_code", "client_credentials", ""):
        r = poll(site.client, flow["device_code"], grant_type=grant)
        assert GRANT in oauth_error(r, "unsupported_grant_type")


def test_device_code_request_without_a_usable_mac_is_invalid_request(site: Site) -> None:
    r = site.client.post("/device/code", data={"client_id": "ktizo", "scope": "openid", "uuid": UUID})
    assert "extra_variable=mac" in oauth_error(r, "invalid_request")
    oauth_error(start(site.client, mac="${mac}"), "invalid_request")
    oauth_error(start(site.client, mac="zz:zz:zz:zz:zz:zz"), "invalid_request")
    oauth_error(start(site.client, uuid="not-a-uuid"), "invalid_request")
    assert site.client.get("/api/v1/devices", headers=site.ops).json() == []


def test_flow_disabled_is_invalid_client_naming_the_setting(client: TestClient, ops: dict[str, str]) -> None:
    r = start(client)
    assert "KTIZO_OAUTH_ENABLED" in oauth_error(r, "invalid_client", 401)
    r = client.post("/token", data={"grant_type": GRANT, "device_code": "x", "client_id": "ktizo"})
    assert "KTIZO_OAUTH_ENABLED" in oauth_error(r, "invalid_client", 401)
    assert client.get("/api/v1/devices", headers=ops).json() == []


def test_each_flow_gets_its_own_code_and_a_machine_keeps_its_record(site: Site) -> None:
    first = started(site)
    second = started(site)  # Talos restarts the acquisition
    assert first["user_code"] != second["user_code"] and first["device_code"] != second["device_code"]
    assert len(site.client.get("/api/v1/devices", headers=site.ops).json()) == 1
    # A MAC already bound to another machine's UUID is not handed a code, and the answer does not say which.
    r = start(site.client, uuid=OTHER_UUID)
    description = oauth_error(r, "access_denied")
    assert "does not match" in description and OTHER_UUID not in description and UUID not in description


# -- console codes for operators ----------------------------------------------------------------------------


def test_operator_looks_up_which_machine_shows_a_code(site: Site, viewer_token: str) -> None:
    flow = started(site)
    r = site.client.get(f"/api/v1/device-codes/{flow['user_code']}", headers=site.ops)
    assert r.status_code == 200
    assert (r.json()["mac_address"], r.json()["uuid"], r.json()["status"]) == (MAC, UUID, "pending")
    same = site.client.get(f"/api/v1/device-codes/{flow['user_code'].lower().replace('-', '')}", headers=site.ops)
    assert same.json()["id"] == r.json()["id"]
    assert site.client.get(f"/api/v1/device-codes/{flow['user_code']}").status_code == 401
    viewer = bearer(viewer_token)
    assert site.client.get(f"/api/v1/device-codes/{flow['user_code']}", headers=viewer).status_code == 403
    assert approve_code(site, flow["user_code"], headers=viewer).status_code == 403


def test_malformed_codes_are_422(site: Site) -> None:
    for code in ("AAAA-AAAA", "BCDF-GHJ", "BCDF-GHJKL", "BCD0-GHJK"):  # vowels and digits are never issued
        r = site.client.get(f"/api/v1/device-codes/{code}", headers=site.ops)
        assert r.status_code == 422, (code, r.text)
        assert "BCDF-GHJK" in r.text


def test_guessing_codes_locks_the_operator_out(site: Site, services: Services, clock: ManualClock) -> None:
    flow = started(site)
    for i in range(10):
        guess = "BBBB-BB" + "BCDFGHJKLM"[i] + "Z"
        r = approve_code(site, guess, hostname="guessed")
        assert r.status_code == 404, r.text
        assert "no machine is waiting" in r.json()["detail"]
    r = approve_code(site, flow["user_code"], hostname="node-01")  # even the right code now
    assert r.status_code == 403
    assert "too many wrong console codes" in r.json()["detail"]
    assert site.client.get(f"/api/v1/device-codes/{flow['user_code']}", headers=site.ops).status_code == 403
    [dev] = site.client.get("/api/v1/devices", headers=site.ops).json()
    assert dev["status"] == "pending"
    misses = site.client.get("/api/v1/audit?action=device_code_miss&actor=ops", headers=site.ops).json()
    # Counted, not logged one by one: a guesser adds one row a minute to the audit log.
    assert (misses["total"], misses["items"][0]["count"]) == (1, 10)

    # Another operator is not locked out.
    other = bearer(make_token(site.services, "ops2", UserRole.OPERATOR))
    r = site.client.get(f"/api/v1/device-codes/{flow['user_code']}", headers=other)
    assert r.status_code == 200 and r.json()["mac_address"] == MAC
    r = approve_code(site, flow["user_code"], headers=other, hostname="node-01")
    assert r.status_code == 200 and r.json()["approved_by"] == "ops2"


def test_the_lockout_ends_when_the_misses_age_out(site: Site, clock: ManualClock) -> None:
    from ktizo.services.console_codes import CODE_MISS_WINDOW

    flow = started(site)
    for _ in range(10):
        assert approve_code(site, "BBBB-BBBB").status_code == 404
    assert approve_code(site, flow["user_code"]).status_code == 403
    clock.advance(CODE_MISS_WINDOW.total_seconds() - 60)
    assert approve_code(site, flow["user_code"]).status_code == 403  # not yet
    clock.advance(61)
    later = clock.now()
    assert code_row(site.services, flow["user_code"]).expires_at > later  # the code itself is still valid then
    assert approve_code(site, flow["user_code"]).status_code == 200


def test_approving_twice_is_not_a_second_approval(site: Site) -> None:
    flow = started(site)
    assert approve_code(site, flow["user_code"], hostname="node-01").status_code == 200
    r = approve_code(site, flow["user_code"], hostname="node-02")
    assert r.status_code == 404
    [dev] = site.client.get("/api/v1/devices", headers=site.ops).json()
    assert dev["hostname"] == "node-01"


def test_a_console_code_approval_is_one_step_and_its_token_is_issued_once(site: Site) -> None:
    # The code and the device change in one transaction: no token poll can see one without the other, so the
    # device code is redeemed exactly once.
    flow = started(site)
    assert approve_code(site, flow["user_code"], hostname="node-01").status_code == 200
    shift(site.services, flow["user_code"], last_poll_at=60)
    grant = poll(site.client, flow["device_code"])
    assert grant.status_code == 200
    assert grant.json()["token_type"] == "Bearer"
    shift(site.services, flow["user_code"], last_poll_at=60)
    oauth_error(poll(site.client, flow["device_code"]), "invalid_grant")


def test_the_verification_uri_talos_prints_exists(site: Site) -> None:
    flow = started(site)
    for url in (flow["verification_uri"], flow["verification_uri_complete"]):
        path = url.removeprefix("http://testserver")
        answer = site.client.get(path, follow_redirects=False)
        # The console-code page, behind the UI's login: an operator who scans the QR code signs in first.
        assert answer.status_code == 303
        assert answer.headers["location"].startswith("/ui/login")


def test_verification_uri_uses_public_url(tmp_path: Path, database_url: str) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        long_poll_seconds=0,
        oauth_enabled=True,
        public_url="http://10.0.0.1:8000/",
    )
    services = build_services(settings)
    try:
        with TestClient(create_app(settings, services)) as client:
            flow = start(client).json()
    finally:
        services.db.dispose()
    assert flow["verification_uri"].startswith("http://10.0.0.1:8000/")
    assert "//ui" not in flow["verification_uri"]


# -- the CLI ------------------------------------------------------------------------------------------------


def test_cli_approve_code(site: Site) -> None:
    flow = started(site)
    code = flow["user_code"].lower()
    env = {"KTIZO_DATA_DIR": str(site.settings.data_dir), "KTIZO_DATABASE_URL": site.settings.effective_database_url}
    result = CliRunner().invoke(
        cli_app,
        ["devices", "approve-code", code, "--hostname", "Node-07", "--ip", "10.0.5.107/24", "--role", "controlplane"],
        env=env,
    )
    assert result.exit_code == 0, result.output
    [dev] = site.client.get("/api/v1/devices", headers=site.ops).json()
    assert f"approved device {dev['id']} ({MAC}) for console code" in result.output
    assert (dev["status"], dev["hostname"], dev["ip_address"], dev["role"], dev["approved_by"]) == (
        "approved",
        "node-07",
        "10.0.5.107/24",
        "controlplane",
        "cli",
    )
    r = poll(site.client, flow["device_code"])
    assert r.status_code == 200
    r = site.client.get(
        talos_url(mac=MAC, uuid=UUID), headers={**TALOS_HEADERS, "Authorization": f"Bearer {r.json()['access_token']}"}
    )
    assert r.status_code == 200 and "node-07" in r.text

    bad = CliRunner().invoke(cli_app, ["devices", "approve-code", "BBBB-BBBB"], env=env)
    assert bad.exit_code == 1 and "no machine is waiting with console code BBBB-BBBB" in bad.output
    bad = CliRunner().invoke(cli_app, ["devices", "approve-code", "nope"], env=env)
    assert bad.exit_code == 2 and "BCDF-GHJK" in bad.output
