"""The database layer: migrations up and down, readiness, and the group-commit writer's isolation."""

from __future__ import annotations

from concurrent.futures import wait

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from ktizo.db import Database
from ktizo.db.migrate import current_revision, head_revision, upgrade
from ktizo.db.models import Device
from ktizo.domain.errors import NotReady
from ktizo.services.registry import Services


def test_group_commit_isolates_a_failing_write(services: Services) -> None:
    db = services.db

    def add(mac: str):  # type: ignore[no-untyped-def]
        def work(s: Session) -> None:
            s.add(Device(mac_address=mac, facts={}))
            s.flush()

        return work

    futures = [
        db.submit(add("52:54:00:00:20:01")),
        db.submit(add("52:54:00:00:20:01")),
        db.submit(add("52:54:00:00:20:02")),
    ]
    wait(futures, timeout=30)
    outcomes = [f.exception() is None for f in futures]
    assert outcomes == [True, False, True]  # the duplicate MAC fails alone
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(Device)) == 2


@pytest.mark.sqlite_only
def test_migrations_go_down_and_up_again(tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    upgrade(db)
    assert current_revision(db) == head_revision()
    upgrade(db, "head")  # idempotent
    from alembic import command

    from ktizo.db.migrate import alembic_config

    command.downgrade(alembic_config(db), "base")
    with db.read() as s:
        tables = {r[0] for r in s.execute(text("SELECT name FROM sqlite_master WHERE type='table'"))}
    assert tables - {"sqlite_sequence"} <= {"alembic_version"}  # sqlite_sequence: SQLite's own (AUTOINCREMENT)
    upgrade(db)
    assert current_revision(db) == head_revision()
    db.dispose()


def test_readyz_reports_a_database_behind_its_migrations(client: TestClient, services: Services) -> None:
    assert client.get("/readyz").json() == {"status": "ready", "database": "ok", "migrations": "current"}
    try:
        with services.db.write() as s:
            s.execute(text("UPDATE alembic_version SET version_num = '0008'"))  # this release upgrades it
        r = client.get("/readyz")
        assert r.status_code == 503
        assert "behind: run `ktizo db upgrade`" in r.json()["migrations"]
        with services.db.write() as s:
            s.execute(text("UPDATE alembic_version SET version_num = '0042'"))  # a newer release did
        r = client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["migrations"] == "ahead: a newer Ktizo upgraded the database"
        with pytest.raises(NotReady, match="schema 0042, newer than this release of Ktizo knows"):
            services.schema.upgrade()
    finally:  # on PostgreSQL the schema is shared by the tests of this worker
        with services.db.write() as s:
            s.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": head_revision()})
    assert client.get("/healthz").json() == {"status": "ok", "database": None, "migrations": None}


def test_models_and_migrations_agree(services: Services) -> None:
    """Every schema change has its migration: autogenerate finds nothing left to do."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from ktizo.db.models import Base

    with services.db.write_engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
