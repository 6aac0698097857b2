"""The console-code page (Talos's verification_uri): look a code up, approve the machine showing it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ktizo.app import build_services, create_app
from ktizo.domain.users import UserRole
from ktizo.services.audit import AuditQuery
from ktizo.services.console_codes import CODE_MISSES_ALLOWED
from ktizo.services.context import Actor
from ktizo.services.registry import Services
from ktizo.settings import Settings
from ktizo.web.session import CSRF_FIELD, SESSION_COOKIE, csrf_token

MAC = "52:54:00:77:00:01"


@dataclass
class Desk:
    """Ktizo with the device flow on, and operator olga signed in to the UI."""

    client: TestClient
    services: Services
    session: str


@pytest.fixture
def desk(tmp_path: Path, database_url: str, bases: Path) -> Iterator[Desk]:
    settings = Settings(
        data_dir=bases.parent.parent, database_url=database_url, long_poll_seconds=0, oauth_enabled=True
    )
    services = build_services(settings)
    try:
        services.users.create(Actor.system(), "olga", UserRole.OPERATOR, None)
        session = services.users.create_token(Actor.system(), "olga", name="web session")
        with TestClient(create_app(settings, services)) as client:
            yield Desk(client, services, session)
    finally:
        services.db.dispose()


def test_an_operator_approves_the_machine_showing_a_code(desk: Desk) -> None:
    client, services, session = desk.client, desk.services, desk.session
    flow = client.post("/device/code", data={"client_id": "ktizo", "mac": MAC}).json()
    client.cookies.set(SESSION_COOKIE, session, path="/ui")
    csrf = csrf_token(session)

    # The link Talos shows (verification_uri_complete) fills the code in; looking it up is one click more.
    link = client.get(f"/ui/device-codes?code={flow['user_code'].lower()}")
    assert link.status_code == 200
    assert f'value="{flow["user_code"].lower()}"' in link.text and MAC not in link.text

    page = client.post("/ui/device-codes", data={CSRF_FIELD: csrf, "code": flow["user_code"].lower()})
    assert page.status_code == 200
    assert MAC in page.text
    assert '<label for="hostname">Hostname</label>' in page.text

    wrong = client.post("/ui/device-codes", data={CSRF_FIELD: csrf, "code": "BBBB-BBBB"})
    assert wrong.status_code == 404
    assert "no machine is waiting with console code BBBB-BBBB" in wrong.text

    forged = client.post("/ui/device-codes/approve", data={"code": flow["user_code"], "hostname": "x1"})
    assert forged.status_code == 403

    done = client.post(
        "/ui/device-codes/approve",
        data={
            CSRF_FIELD: csrf,
            "code": flow["user_code"],
            "hostname": "Node-07",
            "ip_address": "10.0.9.7/24",
            "role": "worker",
            "notes": "",
        },
    )
    assert done.status_code == 200
    assert "Approved" in done.text
    device = services.devices.resolve(MAC)
    assert (device.status, device.hostname, device.ip_address, device.role, device.approved_by) == (
        "approved",
        "node-07",
        "10.0.9.7/24",
        "worker",
        "olga",
    )

    token = client.post(
        "/token",
        data={
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "device_code": flow["device_code"],
            "client_id": "ktizo",
        },
    )
    assert token.status_code == 200
    config = client.get(
        f"/api/v1/config/download?mac={MAC}",
        headers={"Authorization": f"Bearer {token.json()['access_token']}"},
    )
    assert config.status_code == 200
    assert "hostname: node-07" in config.text


def test_a_bad_field_is_shown_next_to_it_and_nothing_is_approved(desk: Desk) -> None:
    client, services, session = desk.client, desk.services, desk.session
    flow = client.post("/device/code", data={"client_id": "ktizo", "mac": MAC}).json()
    client.cookies.set(SESSION_COOKIE, session, path="/ui")
    r = client.post(
        "/ui/device-codes/approve",
        data={
            CSRF_FIELD: csrf_token(session),
            "code": flow["user_code"],
            "hostname": "<script>x</script>",
            "ip_address": "",
            "role": "worker",
            "notes": "",
        },
    )
    assert r.status_code == 422
    assert "RFC 1123" in r.text
    assert "<script>x</script>" not in r.text
    assert services.devices.resolve(MAC).status == "pending"


def _misses(services: Services, actor: str) -> int:
    return services.audit.list(AuditQuery(action="device_code_miss", actor=actor))[1]


def test_only_a_posted_lookup_counts_a_miss(desk: Desk) -> None:
    """A miss counts toward the lockout, so only a CSRF-checked POST may cause one: the browser of a signed-in
    operator sends the session cookie (SameSite=Lax) on any site's top-level GET to the page."""
    client, services, session = desk.client, desk.services, desk.session
    flow = client.post("/device/code", data={"client_id": "ktizo", "mac": MAC}).json()
    client.cookies.set(SESSION_COOKIE, session, path="/ui")
    for i in range(CODE_MISSES_ALLOWED + 2):
        guess = "BBBB-BB" + "BCDFGHJKLMNP"[i] + "Z"
        r = client.get(f"/ui/device-codes?code={guess}")
        assert r.status_code == 200 and f'value="{guess}"' in r.text
        assert "no machine is waiting" not in r.text
    assert _misses(services, "olga") == 0

    forged = client.post("/ui/device-codes", data={"code": "BBBB-BBBB"})
    assert forged.status_code == 403 and _misses(services, "olga") == 0

    # Not locked out: the right code still finds the machine, and a posted wrong one counts.
    found = client.post("/ui/device-codes", data={CSRF_FIELD: csrf_token(session), "code": flow["user_code"]})
    assert found.status_code == 200 and MAC in found.text
    wrong = client.post("/ui/device-codes", data={CSRF_FIELD: csrf_token(session), "code": "BBBB-BBBB"})
    assert wrong.status_code == 404 and _misses(services, "olga") == 1


def test_the_posted_lookup_still_locks_out_a_guesser(desk: Desk) -> None:
    client, session = desk.client, desk.session
    flow = client.post("/device/code", data={"client_id": "ktizo", "mac": MAC}).json()
    client.cookies.set(SESSION_COOKIE, session, path="/ui")
    csrf = csrf_token(session)
    for _ in range(CODE_MISSES_ALLOWED):
        assert client.post("/ui/device-codes", data={CSRF_FIELD: csrf, "code": "BBBB-BBBB"}).status_code == 404
    locked = client.post("/ui/device-codes", data={CSRF_FIELD: csrf, "code": flow["user_code"]})
    assert locked.status_code == 403 and "too many wrong console codes" in locked.text
    assert MAC not in locked.text


def test_approving_a_wrong_code_counts_one_miss_not_two(desk: Desk) -> None:
    client, services, session = desk.client, desk.services, desk.session
    client.cookies.set(SESSION_COOKIE, session, path="/ui")
    r = client.post(
        "/ui/device-codes/approve",
        data={CSRF_FIELD: csrf_token(session), "code": "BBBB-BBBB", "hostname": "node-09", "role": "worker"},
    )
    assert r.status_code == 422 and "no machine is waiting with console code BBBB-BBBB" in r.text
    assert _misses(services, "olga") == 1
