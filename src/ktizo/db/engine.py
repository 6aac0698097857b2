"""Engines and transactions.

A use case runs its reads and writes in ``read()`` and ``write()`` blocks. The edges (an HTTP request, a CLI
command, a background job) open one ``transaction()`` around all of it: every ``write()`` block inside joins it as a
savepoint (a block that fails rolls back alone, as its own transaction would have), reads see what the request has
written so far, and the whole request commits or rolls back at once. Outside a transaction each ``write()`` block
is a transaction of its own."""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Select, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

from ktizo.db.constraints import conflict_for
from ktizo.db.fastread import FastQuery
from ktizo.db.writer import GroupCommitWriter, Work, defer

log = logging.getLogger(__name__)


class Transaction:
    """One request's, command's or job's transaction: a write session per database, opened on first use."""

    def __init__(self) -> None:
        self._sessions: dict[int, Session] = {}
        self._after_commit: list[Callable[[], None]] = []
        self.keep_on_refusal = False
        self.closed = False

    def session(self, db: Database) -> Session:
        session = self._sessions.get(id(db))
        if session is None:
            session = db._write()
            session.begin()
            self._sessions[id(db)] = session
        return session

    def open_session(self, db: Database) -> Session | None:
        return self._sessions.get(id(db))

    @property
    def pending(self) -> bool:
        """Something to commit or roll back, or to run after the commit."""
        return bool(self._sessions or self._after_commit)

    def after_commit(self, callback: Callable[[], None]) -> None:
        self._after_commit.append(callback)

    def commit(self) -> None:
        """Commit every session; an ``IntegrityError`` becomes the domain's ``Conflict`` (see db.constraints)."""
        try:
            for session in self._sessions.values():
                session.commit()
        except IntegrityError as exc:
            self.rollback()
            raise conflict_for(exc) from None
        except BaseException:
            self.rollback()
            raise
        callbacks, self._after_commit = self._after_commit, []
        self.close()
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a wake-up that fails must not turn a committed change into an error
                log.exception("after-commit callback failed")

    def rollback(self) -> None:
        for session in self._sessions.values():
            session.rollback()
        self._after_commit = []
        self.close()

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions = {}
        self.closed = True


_current: contextvars.ContextVar[Transaction | None] = contextvars.ContextVar("ktizo_transaction", default=None)


def current_transaction() -> Transaction | None:
    tx = _current.get()
    return tx if tx is not None and not tx.closed else None


@contextmanager
def transaction() -> Iterator[Transaction]:
    """The edge's transaction: committed when the block ends, rolled back if it raises (unless the use case said
    that what it wrote before refusing must stand, ``keep_on_refusal``). Nested calls join the outer one."""
    outer = current_transaction()
    if outer is not None:
        yield outer
        return
    tx = Transaction()
    token = _current.set(tx)
    try:
        yield tx
    except BaseException:
        if tx.keep_on_refusal:
            tx.commit()
        else:
            tx.rollback()
        raise
    else:
        tx.commit()
    finally:
        _current.reset(token)
        if not tx.closed:
            tx.rollback()


def begin_transaction() -> tuple[Transaction, contextvars.Token[Transaction | None]]:
    """``transaction()`` for an ASGI middleware, which commits at the start of the response, not at a block's end."""
    tx = Transaction()
    return tx, _current.set(tx)


def end_transaction(token: contextvars.Token[Transaction | None]) -> None:
    _current.reset(token)


def keep_on_refusal() -> None:
    """What the current transaction wrote stands even though the use case now refuses (raises): the record of a
    failed sign-in or a wrong console code is the evidence the throttles count."""
    tx = current_transaction()
    if tx is not None:
        tx.keep_on_refusal = True


def after_commit(callback: Callable[[], None]) -> None:
    """Run ``callback`` once the current transaction (or group commit's) has committed, at once outside one:
    waking a held request before the approval is committed would let it read the old state."""
    tx = current_transaction()
    if tx is not None:
        tx.after_commit(callback)
    elif not defer(callback):  # in group commit: after the writer's commit
        callback()


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


def _create_private(path: Path) -> None:
    """Create the SQLite file (and its directory) readable by its owner only, before SQLite creates it with the
    umask's mode; SQLite gives its -wal and -shm files the database file's permissions."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


class Database:
    """Owns the engines. On SQLite writes go through one connection (SQLite has one writer anyway, and
    queueing in the pool is fairer than spinning on the busy lock); on PostgreSQL reads and writes share a pool."""

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        self.path: Path | None = None
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
                self.path = Path(parsed.database)
                _create_private(self.path)
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
        self._fast_queries: list[FastQuery] = []

    @contextmanager
    def read(self) -> Iterator[Session]:
        tx = current_transaction()
        session = tx.open_session(self) if tx is not None else None
        if session is not None:  # what this request wrote so far is what it must read
            yield session
            return
        with self._read() as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction of its own (committed when the block ends, rolled back if it raises), or, inside the
        edge's ``transaction()``, a savepoint of that one."""
        tx = current_transaction()
        if tx is None:
            # A transaction of its own is a transaction like the edge's: what waits for its commit (waking a
            # held request) runs after it, and nested blocks join it.
            try:
                with transaction() as own:
                    yield own.session(self)
            except IntegrityError as exc:  # a flush inside the block, as opposed to the commit at its end
                raise conflict_for(exc) from None
            return
        session = tx.session(self)
        try:
            with session.begin_nested():
                yield session
        except IntegrityError as exc:
            raise conflict_for(exc) from None

    def fast_query(self, stmt: Select[Any]) -> FastQuery | None:
        """``stmt`` prepared for the boot path's raw lookups; None where the database is not a SQLite file."""
        if self.path is None:
            return None
        query = FastQuery(self.read_engine, str(self.path), stmt)
        self._fast_queries.append(query)
        return query

    def submit(self, work: Work) -> Future[object]:
        """Run ``work(session)`` in a shared write transaction (group commit); the future says how it went."""
        tx = current_transaction()
        if tx is not None and tx.open_session(self) is not None:
            # The writer needs the one write connection this transaction holds (SQLite): it would wait forever.
            raise RuntimeError("group commit from inside a transaction that has written")
        return self._writer.submit(work)

    def exposure(self) -> list[str]:
        """What makes the database readable by other users of this machine (it holds the cluster's secrets unless
        they are sealed): a directory or a file wider than owner-only. Empty when all is well, or for PostgreSQL."""
        if self.path is None:
            return []
        problems = []
        for path in (self.path.parent, *(self.path.with_name(self.path.name + s) for s in ("", "-wal", "-shm"))):
            try:
                mode = path.stat().st_mode & 0o777
            except FileNotFoundError:
                continue
            if mode & 0o077:
                kind = "directory" if path.is_dir() else "file"
                want = "700" if path.is_dir() else "600"
                problems.append(
                    f"the database {kind} {path} is mode {mode:o}, readable by other users of this machine: "
                    f"chmod {want} {path}"
                )
        return problems

    def ping(self) -> None:
        with self.read_engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self._writer.close()
        for query in self._fast_queries:
            query.close()
        self.read_engine.dispose()
        if self.write_engine is not self.read_engine:
            self.write_engine.dispose()
