"""PostgreSQL ``LISTEN``: a thread that holds one connection and hands each notification meant for this database
schema (payload ``schema:…``) to a callback.

Migration 0009's trigger notifies channel ``ktizo_devices`` when a machine's status changes; every process listens,
so an approval made through one replica wakes the requests another holds at once (notifications are delivered
at commit). A lost connection is retried with backoff; ``on_connect`` runs after every (re)connect, so that the
caller can look for what it missed while it was not listening."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

DEVICES_CHANNEL = "ktizo_devices"


class Listener:
    def __init__(
        self,
        url: str,
        channel: str,
        on_payload: Callable[[str], None],
        on_connect: Callable[[], None] = lambda: None,
        *,
        idle: Callable[[], bool] = lambda: False,
    ) -> None:
        self.conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.channel = channel
        self.on_payload = on_payload
        self.on_connect = on_connect
        self.idle = idle  # True: nobody needs notifications any more, the thread may end
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.connected = threading.Event()

    def ensure_running(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name=f"ktizo-listen-{self.channel}", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(5)

    def _run(self) -> None:
        import psycopg  # only where PostgreSQL is used

        backoff = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {self.channel}")
                    row = conn.execute("SELECT current_schema()").fetchone()
                    schema = row[0] if row else "public"
                    self.connected.set()
                    backoff = 0.5
                    self.on_connect()
                    idle_rounds = 0
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            where, _, payload = note.payload.rpartition(":")
                            if where == schema:  # the channel is the database's: other schemas' Ktizos use it too
                                self.on_payload(payload)
                        idle_rounds = idle_rounds + 1 if self.idle() else 0
                        if idle_rounds >= 30:  # half a minute with nobody waiting: give the connection back
                            return
            except psycopg.Error as exc:
                log.warning("listening on %s: %s; again in %.1f s", self.channel, exc, backoff)
            finally:
                self.connected.clear()
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 10.0)
