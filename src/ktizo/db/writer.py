"""Group commit: many small writes from concurrent requests share one transaction.

A boot storm asks for hundreds of tiny writes at once (a last_seen, a download record with its audit row).
One writer thread takes whatever is queued, runs it in one transaction and commits once; each caller waits
for its own outcome. On SQLite, which has one writer anyway, this turns hundreds of commits into a few."""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

Work = Callable[[Session], object]  # what it returns is the future's result
_STOP = object()
Callback = Callable[[], None]
_deferred: contextvars.ContextVar[list[Callback] | None] = contextvars.ContextVar("ktizo_deferred", default=None)


@contextmanager
def deferred_callbacks() -> Iterator[list[Callback]]:
    """``engine.after_commit`` callbacks registered in the block are kept in the yielded list, for the caller to
    run once its commit succeeded; if the block raises (its savepoint rolled back) they are dropped. Group commit
    has no edge transaction to wait for, and a count or a wake-up for a rolled-back write would be a lie."""
    mine: list[Callback] = []
    token = _deferred.set(mine)
    try:
        yield mine
    except BaseException:
        mine.clear()
        raise
    finally:
        _deferred.reset(token)


def defer(callback: Callback) -> bool:
    """Keep ``callback`` for the enclosing ``deferred_callbacks``; False when there is none."""
    pending = _deferred.get()
    if pending is None:
        return False
    pending.append(callback)
    return True


def _run_callbacks(callbacks: list[Callback]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:  # a callback's failure must not fail writes that are committed
            log.exception("after-commit callback failed")


class GroupCommitWriter:
    def __init__(self, sessions: sessionmaker[Session], max_batch: int = 256) -> None:
        self._sessions = sessions
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[Work, Future[object]] | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, work: Work) -> Future[object]:
        future: Future[object] = Future()
        self._ensure_started()
        self._queue.put((work, future))
        return future

    def _ensure_started(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="ktizo-group-commit", daemon=True)
                    self._thread.start()

    def close(self) -> None:
        with self._lock:
            if self._thread is not None:
                self._queue.put(_STOP)
                self._thread.join(timeout=30)
                self._thread = None

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._commit(batch)  # type: ignore[arg-type]
            if stop:
                return

    def _commit(self, batch: list[tuple[Work, Future[object]]]) -> None:
        outcomes: list[tuple[Future[object], BaseException | None, object]] = []
        committed: list[Callback] = []
        retry: list[tuple[Work, Future[object]]] = []
        try:
            with self._sessions() as session, session.begin():
                for work, future in batch:
                    try:
                        # A failing item rolls back alone, not the batch, and its callbacks with it.
                        with deferred_callbacks() as callbacks, session.begin_nested():
                            result = work(session)
                    except OperationalError:
                        # A deadlock with another process's batch (PostgreSQL aborts one of the two), a lock
                        # timeout: nothing wrong with the work itself. Alone, after this batch released its locks.
                        retry.append((work, future))
                    except Exception as exc:
                        outcomes.append((future, exc, None))
                    else:
                        outcomes.append((future, None, result))
                        committed.extend(callbacks)
        except Exception:
            log.warning("group commit of %d writes failed; retrying them one by one", len(batch), exc_info=True)
            for work, future in batch:
                self._run_alone(work, future)
            return
        _run_callbacks(committed)
        for future, error, result in outcomes:
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
        for work, future in retry:
            log.info("a write of the group commit met a lock conflict; running it again on its own")
            self._run_alone(work, future)

    def _run_alone(self, work: Work, future: Future[object], attempts: int = 3) -> None:
        for attempt in range(attempts):
            try:
                with deferred_callbacks() as callbacks, self._sessions() as session, session.begin():
                    result = work(session)
            except OperationalError as exc:
                if attempt + 1 < attempts:
                    time.sleep(0.01 * 2**attempt)  # another process's transaction holds what this one needs
                    continue
                future.set_exception(exc)
            except Exception as exc:
                future.set_exception(exc)
            else:
                _run_callbacks(callbacks)
                future.set_result(result)
            return
