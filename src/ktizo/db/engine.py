"""Engines and transactions. Every use case runs in exactly one ``read()`` or ``write()`` block."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

from ktizo.db.writer import GroupCommitWriter, Work


def _sqlite_engine(url: str, *, immediate: bool, pool_size: int) -> Engine:
    engine = create_engine(
        url,
        poolclass=QueuePool,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=60,
        connect_args={"check_same_thread": False, "timeout": 30},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A deferred transaction that reads and then writes can fail with SQLITE_BUSY at once when another
        # writer got there first (the busy handler is not consulted for the lock upgrade). Writers therefore
        # take the write lock up front; readers stay deferred and never block on WAL.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class Database:
    """Owns the engines. On SQLite writes go through one connection (SQLite has one writer anyway, and
    queueing in the pool is fairer than spinning on the busy lock); on PostgreSQL reads and writes share a pool."""

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.read_engine = _sqlite_engine(url, immediate=False, pool_size=8)
            self.write_engine = _sqlite_engine(url, immediate=True, pool_size=1)
        else:
            self.read_engine = self.write_engine = create_engine(
                url, pool_size=10, max_overflow=20, pool_pre_ping=True, pool_timeout=60
            )
        # SQLite readers in WAL mode never wait for a writer and do no network I/O: cheap enough to run on an
        # event loop. A PostgreSQL round trip is not.
        self.nonblocking_reads = self.dialect == "sqlite"
        self._read = sessionmaker(self.read_engine, expire_on_commit=False, autoflush=False)
        self._write = sessionmaker(self.write_engine, expire_on_commit=False, autoflush=False)
        self._writer = GroupCommitWriter(self._write)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        with self._write() as session, session.begin():
            yield session

    def submit(self, work: Work) -> Future[None]:
        """Run ``work(session)`` in a shared write transaction (group commit); the future says how it went."""
        return self._writer.submit(work)

    def ping(self) -> None:
        with self.read_engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self._writer.close()
        self.read_engine.dispose()
        if self.write_engine is not self.read_engine:
            self.write_engine.dispose()
