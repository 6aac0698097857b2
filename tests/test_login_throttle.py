"""Password guessing is slowed down: after 10 wrong passwords for one user from one address in 15 minutes,
that pair is refused (429 with Retry-After) even with the right password; other addresses and other users
are not affected, and the refusals are in the audit log."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from ktizo.cli import app
from ktizo.domain.errors import TooManyAttempts, Unauthenticated
from ktizo.domain.users import UserRole
from ktizo.services import users as users_module
from ktizo.services.audit import AuditQuery
from ktizo.services.context import Actor
from ktizo.services.registry import Services
from ktizo.services.users import LOGIN_FAILURES_PER_USER
from ktizo.settings import Settings

PASSWORD = "correct horse battery staple"


@pytest.fixture
def team(services: Services) -> Services:
    services.users.create(Actor.system(), "root", UserRole.ADMIN, PASSWORD)
    services.users.create(Actor.system(), "ops", UserRole.OPERATOR, PASSWORD)
    return services


def fail(services: Services, username: str, ip: str, times: int) -> None:
    for _ in range(times):
        with pytest.raises(Unauthenticated):
            services.users.authenticate(username, "wrong", ip)


def test_ten_wrong_passwords_lock_that_user_from_that_address_only(team: Services) -> None:
    fail(team, "root", "10.0.0.66", LOGIN_FAILURES_PER_USER)
    with pytest.raises(TooManyAttempts) as refused:
        team.users.authenticate("root", PASSWORD, "10.0.0.66")  # even the right password
    assert 14 * 60 < refused.value.retry_after <= 15 * 60 + 1
    assert "try again in 15 minutes" in refused.value.message
    # The real administrator elsewhere, and another user from the guesser's address, still get in.
    assert team.users.authenticate("root", PASSWORD, "10.0.0.9").username == "root"
    assert team.users.authenticate("ops", PASSWORD, "10.0.0.66").username == "ops"
    # Counted, not logged one by one: the failures of one minute are one audit row with their count.
    events, _ = team.audit.list(AuditQuery(action="login_failed", actor="root"))
    assert [(e.count, e.source_ip) for e in events] == [(LOGIN_FAILURES_PER_USER + 1, "10.0.0.66")]


def test_a_successful_sign_in_wipes_earlier_typos(team: Services) -> None:
    fail(team, "root", "10.0.0.9", LOGIN_FAILURES_PER_USER - 1)
    team.users.authenticate("root", PASSWORD, "10.0.0.9")
    fail(team, "root", "10.0.0.9", LOGIN_FAILURES_PER_USER - 1)
    assert team.users.authenticate("root", PASSWORD, "10.0.0.9").username == "root"


def test_spraying_many_user_names_from_one_address_is_stopped(team: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    # Argon2 makes each failure cost tens of milliseconds on purpose; a smaller budget keeps the test quick.
    monkeypatch.setattr(users_module, "LOGIN_FAILURES_PER_SOURCE", 6)
    for i in range(6):
        fail(team, f"guess{i}", "10.0.0.77", 1)
    with pytest.raises(TooManyAttempts):
        team.users.authenticate("ops", PASSWORD, "10.0.0.77")
    assert team.users.authenticate("ops", PASSWORD, "10.0.0.78").username == "ops"


def test_api_login_answers_429_with_retry_after(client: TestClient, team: Services) -> None:
    for _ in range(LOGIN_FAILURES_PER_USER):
        r = client.post("/api/v1/auth/login", json={"username": "root", "password": "nope"})
        assert r.status_code == 401 and r.json() == {"detail": "wrong username or password"}
    r = client.post("/api/v1/auth/login", json={"username": "root", "password": PASSWORD})
    assert r.status_code == 429
    assert r.json()["detail"].startswith("too many failed sign-ins from this address; try again in")
    assert 14 * 60 < int(r.headers["Retry-After"]) <= 15 * 60 + 1


def test_ui_login_page_says_to_wait(client: TestClient, team: Services) -> None:
    def sign_in(password: str) -> tuple[int, str]:
        page = client.get("/ui/login")
        nonce = re.search(r'name="nonce" value="([^"]+)"', page.text)
        assert nonce is not None
        r = client.post(
            "/ui/login",
            data={"username": "root", "password": password, "nonce": nonce.group(1)},
            follow_redirects=False,
        )
        return r.status_code, r.text

    for _ in range(LOGIN_FAILURES_PER_USER):
        assert sign_in("nope")[0] == 401
    code, html = sign_in(PASSWORD)
    assert code == 429
    assert "Too many failed sign-ins from this address; try again in 15 minutes." in html
    assert 'value="root"' in html  # the user name stays in the field


def test_cli_resets_a_forgotten_password_and_disables_and_enables(settings: Settings, team: Services) -> None:
    runner = CliRunner()
    env = {"KTIZO_DATA_DIR": str(settings.data_dir), "KTIZO_DATABASE_URL": settings.effective_database_url}
    result = runner.invoke(app, ["users", "reset-password", "root"], env=env)
    assert result.exit_code == 0, result.output
    new_password = result.stdout.strip().splitlines()[0]
    assert len(new_password) >= 20
    assert team.users.authenticate("root", new_password, "10.0.0.1").username == "root"
    with pytest.raises(Unauthenticated):
        team.users.authenticate("root", PASSWORD, "10.0.0.1")

    assert runner.invoke(app, ["users", "disable", "ops"], env=env).stdout.strip() == "disabled ops"
    with pytest.raises(Unauthenticated):
        team.users.authenticate("ops", PASSWORD, "10.0.0.1")
    assert runner.invoke(app, ["users", "enable", "ops"], env=env).stdout.strip() == "enabled ops"
    assert team.users.authenticate("ops", PASSWORD, "10.0.0.1").username == "ops"
    missing = runner.invoke(app, ["users", "reset-password", "nobody"], env=env)
    assert missing.exit_code != 0 and "no user named nobody" in missing.output
