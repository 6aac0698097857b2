"""The UI's HTTP contract without a browser: cookie flags, headers, login-form protection, redirects."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from ktizo.app import create_app
from ktizo.domain.users import UserRole
from ktizo.services.context import Actor
from ktizo.services.registry import Services
from ktizo.settings import Settings
from tests.web.conftest import PASSWORD


@pytest.fixture
def https(settings: Settings, services: Services) -> Iterator[TestClient]:
    services.users.create(Actor.system(), "alice", UserRole.ADMIN, PASSWORD)
    with TestClient(create_app(settings, services), base_url="https://ktizo.example") as c:
        yield c


def sign_in(c: TestClient, next_url: str = "/ui/devices"):  # type: ignore[no-untyped-def]
    form = c.get("/ui/login").text
    nonce = re.search(r'name="nonce" value="([^"]+)"', form)
    assert nonce
    return c.post(
        "/ui/login",
        data={"username": "alice", "password": PASSWORD, "nonce": nonce.group(1), "next": next_url},
        follow_redirects=False,
    )


def test_session_cookie_is_httponly_lax_and_secure_behind_tls(https: TestClient) -> None:
    r = sign_in(https)
    assert r.status_code == 303
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith("ktizo_session="))
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Secure" in cookie and "Path=/ui" in cookie


def test_pages_carry_a_strict_content_security_policy(https: TestClient) -> None:
    sign_in(https)
    r = https.get("/ui/devices")
    assert r.status_code == 200
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "unsafe-inline" not in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"
    assert "<script>" not in r.text and " style=" not in r.text and " onclick=" not in r.text
    assert https.get("/ui/static/htmx.min.js").status_code == 200


def test_login_needs_the_form_nonce_and_next_stays_on_this_site(https: TestClient) -> None:
    r = https.post("/ui/login", data={"username": "alice", "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 403 and "ktizo_session" not in r.headers.get("set-cookie", "")
    for evil in ("https://evil.example/", "//evil.example", "/\\evil.example", "/api/v1/cluster/secrets"):
        https.cookies.clear()
        r = sign_in(https, evil)
        assert r.headers["location"] == "/ui/devices", evil
    https.cookies.clear()
    assert sign_in(https, "/ui/audit?actor=x").headers["location"] == "/ui/audit?actor=x"


def test_unauthenticated_requests_go_to_the_login_page(client: TestClient) -> None:
    assert client.get("/", follow_redirects=False).headers["location"] == "/ui"
    r = client.get("/ui/devices?status=approved", follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, "/ui/login?next=%2Fui%2Fdevices%3Fstatus%3Dapproved")
    r = client.get("/ui/devices/poll", headers={"HX-Request": "true"}, follow_redirects=False)
    assert r.status_code == 401 and r.headers["HX-Redirect"].startswith("/ui/login")
    r = client.post("/ui/devices/1/approve", data={"hostname": "x"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")
    client.cookies.set("ktizo_session", "ktz_forged", path="/ui")
    r = client.get("/ui/devices", follow_redirects=False)
    assert r.status_code == 303
