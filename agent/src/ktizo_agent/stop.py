"""Stopping on SIGINT/SIGTERM: every wait in the agent goes through one event, so a signal ends it at once.

The handler never raises into whatever the main thread was doing (a bundle half-written is worse than a
stop a second late); it sets the event, and the next wait notices."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from ktizo_agent.errors import Interrupted


class Stopper:
    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: int | None = None

    @property
    def stopped(self) -> bool:
        return self._event.is_set()

    def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.signum is None:
            self.signum = signum
        self._event.set()

    def wait(self, seconds: float | None) -> bool:
        """Wait up to ``seconds``; True when stopped (for loops in background threads)."""
        return self._event.wait(None if seconds is None else max(0.0, seconds))

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, raising ``Interrupted`` if a stop comes first (for the main thread's flow)."""
        if self.wait(seconds):
            raise Interrupted(self.signum or signal.SIGTERM)

    def check(self) -> None:
        if self.stopped:
            raise Interrupted(self.signum or signal.SIGTERM)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        # Event.set takes a lock the interrupted main thread may be holding inside Event.wait: set it from
        # another thread, which simply waits for the main thread to let go.
        threading.Thread(target=self._event.set, name="ktizo-agent-signal", daemon=True).start()

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[None]:
        """Route SIGINT and SIGTERM here for the duration (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
