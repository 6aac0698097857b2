"""Shared fixtures: a real database (SQLite file, or PostgreSQL when KTIZO_TEST_DATABASE_URL says so),
the app over it, users with tokens, and Talos's own example configs as base configs."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from ktizo.app import build_services, create_app
from ktizo.cli import app as cli_app
from ktizo.db import Database
from ktizo.db.migrate import upgrade
from ktizo.domain.clock import use as use_clock
from ktizo.domain.users import UserRole
from ktizo.services.registry import Services
from ktizo.settings import Settings
from tests.clock import ManualClock
from tests.support import TALOS_FIXTURES, bearer, make_token

PG_URL = os.environ.get("KTIZO_TEST_DATABASE_URL", "")
TABLES = (
    "webhook_deliveries",
    "webhooks",
    "events",
    "rules",
    "applied_objects",
    "audit_events",
    "agent_api_keys",
    "site_enrollment_keys",
    "sites",
    "agent_certificates",
    "enrollments",
    "pki_authority",
    "refusals",
    "api_tokens",
    "users",
    "group_members",
    "device_groups",
    "devices",
    "base_configs",
    "cluster_secrets",
    "cluster_settings",
)


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


@pytest.fixture(scope="session")
def db_template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated database made once per session: an SQLite file to copy, or a PostgreSQL schema per worker, named
    for this run too (two runs on one database, two checkouts say, must not share one), dropped at the end."""
    if PG_URL:
        schema = f"ktizo_test_{_worker()}_{uuid.uuid4().hex[:8]}"
        admin = create_engine(PG_URL)
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        sep = "&" if "?" in PG_URL else "?"
        url = f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
        db = Database(url)
        upgrade(db)
        db.dispose()
        yield url
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        admin.dispose()
        return
    path = tmp_path_factory.mktemp("template") / "ktizo.db"
    db = Database(f"sqlite:///{path}")
    upgrade(db)
    db.dispose()
    yield str(path)


@pytest.fixture
def database_url(db_template: str, tmp_path: Path) -> str:
    if PG_URL:
        engine = create_engine(db_template)
        with engine.begin() as conn:
            # TRUNCATE bypasses the audit log's row triggers, which is exactly what a fresh test needs.
            conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
            conn.execute(text("UPDATE config_state SET revision = 1"))
            conn.execute(
                text("UPDATE gitops_state SET head = NULL, pushed = NULL, last_error = NULL, updated_at = NULL")
            )
        engine.dispose()
        return db_template
    target = tmp_path / "ktizo.db"
    shutil.copyfile(db_template, target)
    return f"sqlite:///{target}"


@pytest.fixture
def clock() -> Iterator[ManualClock]:
    """Ktizo's clock, in the test's hands: it moves only by ``clock.advance(…)``."""
    with use_clock(ManualClock()) as manual:
        yield manual


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    # No long poll by default: a pending request would be held for a minute; tests of it turn it on.
    return Settings(data_dir=tmp_path / "data", database_url=database_url, last_seen_interval=0, long_poll_seconds=0)


@pytest.fixture
def services(settings: Settings) -> Iterator[Services]:
    services = build_services(settings)
    yield services
    services.db.dispose()


@pytest.fixture
def client(settings: Settings, services: Services) -> Iterator[TestClient]:
    with TestClient(create_app(settings, services), client=("10.0.0.9", 40000)) as c:
        yield c


@pytest.fixture
def admin_token(services: Services) -> str:
    return make_token(services, "root", UserRole.ADMIN)


@pytest.fixture
def operator_token(services: Services) -> str:
    return make_token(services, "ops", UserRole.OPERATOR)


@pytest.fixture
def viewer_token(services: Services) -> str:
    return make_token(services, "eve", UserRole.VIEWER)


@pytest.fixture
def ops(operator_token: str) -> dict[str, str]:
    return bearer(operator_token)


@pytest.fixture
def admin(admin_token: str) -> dict[str, str]:
    return bearer(admin_token)


@pytest.fixture
def bases(settings: Settings) -> Path:
    """Talos's own generated v1.13 configs installed as the base configs."""
    target = settings.base_templates_dir
    target.mkdir(parents=True, exist_ok=True)
    for role in ("controlplane", "worker"):
        shutil.copyfile(TALOS_FIXTURES / f"{role}.yaml", target / f"{role}.yaml")
    return target


@pytest.fixture
def make_client(tmp_path: Path, database_url: str) -> Iterator[Callable[..., tuple[TestClient, Services]]]:
    """An app over the test database with other settings (the ``client`` fixture's data directory)."""
    made: list[tuple[TestClient, Services]] = []

    def make(**overrides: object) -> tuple[TestClient, Services]:
        defaults: dict[str, object] = {"last_seen_interval": 0, "long_poll_seconds": 0}
        settings = Settings(
            data_dir=tmp_path / "data",
            database_url=database_url,
            **(defaults | overrides),  # type: ignore[arg-type]
        )
        services = build_services(settings)
        client = TestClient(create_app(settings, services), client=("10.0.0.9", 40000))
        client.__enter__()
        made.append((client, services))
        return client, services

    yield make
    for client, services in made:
        client.__exit__(None, None, None)
        services.db.dispose()


@pytest.fixture
def cli(settings: Settings, services: Services):  # type: ignore[no-untyped-def]
    """``cli("devices", "list")``: the admin CLI on the test's database, as an operator's shell runs it."""
    runner = CliRunner()
    env = {"KTIZO_DATA_DIR": str(settings.data_dir), "KTIZO_DATABASE_URL": settings.effective_database_url}

    def run(*args: str, input: str | None = None, ok: bool = True):  # type: ignore[no-untyped-def]
        result = runner.invoke(cli_app, list(args), env=env, input=input)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return run


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("postgres_only") and not PG_URL:
        pytest.fail(
            "this test needs PostgreSQL: run it with KTIZO_TEST_DATABASE_URL=postgresql+psycopg://postgres@"
            "127.0.0.1:5432/test (scripts/test does, in its PostgreSQL pass)",
            pytrace=False,
        )
