"""Alembic environment: the engine comes from ``migrate.alembic_config`` (never from a file).

On SQLite, a batch migration rebuilds a table (create a copy, copy the rows, drop the old one, rename): with
foreign keys on, dropping the old ``devices`` fires the ``ON DELETE`` cascades of every table pointing at it
(group memberships, console codes, enrollments gone; certificates unlinked), and the copy's ``AUTOINCREMENT``
counter restarts at the highest remaining id (a deleted machine's id, and its audit history, handed to the next
new one). So foreign keys are off while migrations run (the PRAGMA is ignored inside a transaction, hence before
it), every reference is checked before the commit, and the counters are put back to where they were."""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Connection, text

from ktizo.db.models import Base

config = context.config
engine = config.attributes["engine"]


def _sequences(connection: Connection) -> dict[str, int]:
    exists = connection.execute(text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_sequence'"))
    if exists.first() is None:
        return {}
    return {row[0]: row[1] for row in connection.execute(text("SELECT name, seq FROM sqlite_sequence"))}


def _restore_sequences(connection: Connection, before: dict[str, int]) -> None:
    after = _sequences(connection)
    for name, seq in before.items():
        tables = connection.execute(text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = :n"), {"n": name})
        if tables.first() is None:
            continue  # the migration dropped it
        if name not in after:
            connection.execute(text("INSERT INTO sqlite_sequence (name, seq) VALUES (:n, :s)"), {"n": name, "s": seq})
        elif after[name] < seq:
            connection.execute(text("UPDATE sqlite_sequence SET seq = :s WHERE name = :n"), {"n": name, "s": seq})


def _dangling(connection: Connection) -> list[Any]:
    return list(connection.execute(text("PRAGMA foreign_key_check")))


with engine.connect() as connection:
    sqlite = connection.dialect.name == "sqlite"
    raw = connection.connection.driver_connection if sqlite else None
    if raw is not None:
        raw.execute("PRAGMA foreign_keys=OFF")  # outside any transaction: SQLite ignores it inside one
    try:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=sqlite,
            compare_type=True,
        )
        with context.begin_transaction():
            before = _sequences(connection) if sqlite else {}
            context.run_migrations()
            if sqlite:
                _restore_sequences(connection, before)
                dangling = _dangling(connection)
                if dangling:
                    raise RuntimeError(f"the migration left references to rows that do not exist: {dangling[:10]}")
        connection.commit()
    finally:
        if raw is not None:
            connection.rollback()
            raw.execute("PRAGMA foreign_keys=ON")  # the connection goes back to the pool
