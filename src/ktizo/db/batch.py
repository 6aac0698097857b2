"""Rows by the thousand: one statement per batch through Core, not the ORM's unit of work (declarative apply, the
boot path's download records)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Table, insert, select, text
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import UpdateBase


def insert_many(
    s: Session,
    table: Table,
    rows: list[dict[str, Any]],
    *,
    returning: Sequence[str] = (),
    ignore_conflicts: bool = False,
) -> Sequence[Any]:
    """Rows in one statement per batch (every row has the same keys); with ``returning``, those columns of the new
    rows (in no particular order). ``ignore_conflicts``: a row a unique constraint refuses is left out (``ON
    CONFLICT DO NOTHING``) instead of failing the batch; on PostgreSQL ``returning`` then names only the rows made,
    on SQLite it also finds rows that were there before by the same keys (the caller, holding the write lock, knows
    which those were)."""
    if not rows:
        return []
    if s.get_bind().dialect.name == "postgresql":
        # One parameter, the batch as a JSON array, expanded by the server: psycopg would otherwise parse a
        # statement of tens of thousands of placeholders in Python for every batch.
        columns = ", ".join(f'"{name}"' for name in rows[0])
        back = f" RETURNING {', '.join(returning)}" if returning else ""
        conflicts = " ON CONFLICT DO NOTHING" if ignore_conflicts else ""
        done = s.execute(
            text(
                f'INSERT INTO "{table.name}" ({columns}) SELECT {columns} '  # noqa: S608 - names from the table
                f'FROM json_populate_recordset(NULL::"{table.name}", CAST(:rows AS json)){conflicts}{back}'
            ),
            {"rows": json.dumps(rows, default=_json_value)},
        )
        return done.all() if returning else []
    into = _INSERT.get((table.name, ignore_conflicts))
    if into is None:
        into = _INSERT[(table.name, ignore_conflicts)] = (
            sqlite.insert(table).on_conflict_do_nothing() if ignore_conflicts else insert(table)
        )
    execute_many(s, into, rows)
    if not returning:
        return []
    # SQLite cannot return the rows of an executemany: look them up by their keys (indexed, so one query).
    found: list[Any] = []
    for key in ("mac_address", "machine_id", "uuid"):
        keys = [r[key] for r in rows if _identity(r) == key]
        if keys:
            stmt = select(*(table.c[c] for c in returning)).where(table.c[key].in_(keys))
            if key == "uuid":
                stmt = stmt.where(table.c.mac_address.is_(None))
            found.extend(s.execute(stmt).all())
    return found


def execute_many(s: Session, stmt: UpdateBase, rows: Sequence[dict[str, Any]]) -> None:
    """``s.execute(stmt, rows)``, rows of the same keys by the thousand. On SQLite straight through sqlite3's
    executemany, each value converted by its column type's bind processor as SQLAlchemy would: SQLAlchemy's own
    handling of each row's parameters was most of a boot storm's writer time. A statement whose execution would add
    values of its own (a Python-side column default) goes through SQLAlchemy, as everywhere but SQLite."""
    if not rows:
        return
    conn = s.connection()
    dialect = conn.dialect
    if dialect.name != "sqlite":
        s.execute(stmt, list(rows))
        return
    key = (stmt, tuple(rows[0]))
    prepared = _PREPARED.get(key)
    if prepared is None:
        compiled = stmt.compile(dialect=dialect, column_keys=list(rows[0]))
        names = tuple(compiled.positiontup or ())
        if set(names) == set(rows[0]) and len(names) == len(rows[0]):
            processors = [compiled.binds[n].type.dialect_impl(dialect).bind_processor(dialect) for n in names]
            prepared = _PREPARED[key] = (compiled.string, names, processors)
    if prepared is None:
        s.execute(stmt, list(rows))
        return
    sql, names, processors = prepared
    values = [
        tuple(v if p is None or v is None else p(v) for v, p in zip((r[n] for n in names), processors, strict=True))
        for r in rows
    ]
    conn.exec_driver_sql(sql, values)


# Statements compiled for execute_many, by statement and row keys: long-lived statements only (module constants,
# one INSERT per table), so this stays small.
_PREPARED: dict[tuple[UpdateBase, tuple[str, ...]], tuple[str, tuple[str, ...], list[Any]]] = {}
_INSERT: dict[tuple[str, bool], UpdateBase] = {}


def _identity(row: dict[str, Any]) -> str:
    return "mac_address" if row.get("mac_address") else "machine_id" if row.get("machine_id") else "uuid"


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def table_of(model: Any) -> Table:
    """A model's Core table: batches of thousands of rows go through Core's executemany, not the ORM's unit of work."""
    return cast(Table, model.__table__)
