"""One prepared query on the boot path's hottest line, run straight on the DB-API connection (SQLite).

Every machine of a boot storm costs one lookup by MAC. Through SQLAlchemy's Connection that lookup is a pool
checkout, a ``BEGIN``, events, a result object and a rollback: four fifths of its time. Here the statement is
compiled once, each thread keeps one read-only connection in autocommit (every SELECT sees the latest commit; WAL
readers never wait for the writer), and the row's values go through the same result processors SQLAlchemy would
apply (JSON, UTC datetimes). On PostgreSQL the lookup runs off the event loop anyway and goes through SQLAlchemy."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Select
from sqlalchemy.engine import Engine


class FastRow(tuple[Any, ...]):
    """A result row read by attribute, like SQLAlchemy's ``Row``."""

    __slots__ = ()
    _index: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            return self[self._index[name]]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def _mapping(self) -> dict[str, Any]:
        return {name: self[i] for name, i in self._index.items()}


class FastQuery:
    def __init__(self, engine: Engine, path: str, stmt: Select[Any]) -> None:
        dialect = engine.dialect
        compiled = stmt.compile(dialect=dialect)
        self.sql = compiled.string
        defaults = compiled.params  # values the statement binds itself (``ConfigState.id == 1``)
        self.names: Sequence[str] = tuple(compiled.positiontup or ())
        self.defaults = {n: defaults[n] for n in self.names if defaults.get(n) is not None}
        columns = list(stmt.selected_columns)
        self.processors: list[Callable[[Any], Any] | None] = [
            c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns
        ]
        self.row: type[FastRow] = type(
            "BootRow", (FastRow,), {"__slots__": (), "_index": {c.key: i for i, c in enumerate(columns)}}
        )
        self.path = path
        self._local = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def first(self, **params: Any) -> FastRow | None:
        found = self.first_raw(**params)
        return None if found is None else self.process(found)

    def first_raw(self, **params: Any) -> tuple[Any, ...] | None:
        """The row as SQLite stores it (JSON as text, datetimes as strings): cheap to compare with an earlier one."""
        conn = self._connection()
        values = self.defaults | params if self.defaults else params
        cursor = conn.execute(self.sql, tuple(values[n] for n in self.names))
        found: tuple[Any, ...] | None = cursor.fetchone()
        cursor.close()  # an unfinished statement would keep its snapshot, and WAL checkpoints waiting, until reused
        return found

    def process(self, raw: tuple[Any, ...]) -> FastRow:
        """A raw row's values as SQLAlchemy would give them."""
        return self.row(v if p is None or v is None else p(v) for v, p in zip(raw, self.processors, strict=True))

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA query_only=1")
            self._local.conn = conn
            with self._lock:
                self._opened.append(conn)
        return conn

    def close(self) -> None:
        """Close every thread's connection (at dispose; a thread that queries afterwards would fail)."""
        with self._lock:
            opened, self._opened = self._opened, []
        for conn in opened:
            conn.close()
