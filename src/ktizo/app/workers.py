"""``ktizo serve --workers N``: N processes on one host serving the same ports, and the supervisor that keeps them.

The supervisor binds every socket before a worker starts (a port in use is one clear error), one per worker and
port with ``SO_REUSEPORT``, so that the kernel spreads connections evenly over the workers instead of handing most
of them to whichever wakes first. It keeps the sockets: connections that arrive while a worker restarts wait in
its socket's queue for the replacement. Each worker is ``python -m ktizo.app.worker``, given its settings on stdin
(they may hold the database password and the secret key: not in its command line or environment). Only the first
worker runs the background jobs; the database carries everything the workers share (long-poll wake-ups, rate
limits, lockouts, caches keyed by revision), as it does between replicas. ``SIGTERM`` or ``SIGINT`` stops the
workers gracefully; a worker that dies otherwise is started again."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from ktizo.services.authority import TlsFiles
from ktizo.settings import Settings

log = logging.getLogger("ktizo.workers")

GRACE_SECONDS = 15.0  # uvicorn's graceful shutdown (5 s) and the held downloads' records, then SIGKILL
QUICK_DEATH_SECONDS = 5.0  # a worker that dies this soon after starting is failing, not crashing once
QUICK_DEATHS = 5


class BindError(Exception):
    """A port cannot be bound: the message says which and what to do."""


# Connections the kernel queues for a listener not yet accepted: a rack powered on at once opens thousands within
# a second, and a full queue drops the handshake, which the client's TCP retries only after 1, 3, 7, 15 s. The
# kernel caps it at net.core.somaxconn (4096 on current kernels).
LISTEN_BACKLOG = 65535


def bind_reuseport(host: str, port: int, count: int, what: str, hint: str) -> list[socket.socket]:
    """``count`` listening sockets on one port (port 0: the one the first bind was given)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(LISTEN_BACKLOG)
            sock.set_inheritable(True)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise BindError(f"cannot listen for {what} on {host}:{port}: {exc.strerror or exc}. {hint}") from None
    return sockets


def worker_sockets(settings: Settings) -> tuple[list[socket.socket], list[socket.socket] | None]:
    """The sockets of ``settings.workers`` workers: the HTTP port's, and the mTLS port's unless it is off."""
    main = bind_reuseport(
        settings.host, settings.port, settings.workers, "HTTP", "Pick another port with --port (or KTIZO_PORT)."
    )
    if not settings.mtls_port:
        return main, None
    try:
        mtls = bind_reuseport(
            settings.host,
            settings.mtls_port,
            settings.workers,
            "the agents' mTLS listener",
            "Pick another port with --mtls-port (or KTIZO_MTLS_PORT), or turn it off with --mtls-port 0.",
        )
    except BindError:
        for sock in main:
            sock.close()
        raise
    return main, mtls


@dataclass
class _Worker:
    index: int
    sockets: list[socket.socket]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_deaths: int = field(default=0)


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        max_connections: int,
        main: list[socket.socket],
        mtls: list[socket.socket] | None,
        tls_files: TlsFiles | None = None,
    ) -> None:
        self.tls_files = tls_files
        self.settings = settings
        self.max_connections = max_connections
        self.workers = [_Worker(i, [main[i], *([mtls[i]] if mtls else [])]) for i in range(len(main))]
        self.stopping = False
        self.metrics_dir = metrics_dir(settings.data_dir)

    def run(self) -> int:
        """Start the workers and keep them until SIGTERM or SIGINT; the exit status for ``ktizo serve``."""
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        self._fresh_metrics_dir()
        status = 0
        try:
            for worker in self.workers:
                self._start(worker)
            log.info(
                "%d workers: pids %s", len(self.workers), ", ".join(str(w.proc.pid) for w in self.workers if w.proc)
            )
            while not self.stopping:
                for worker in self.workers:
                    if self.stopping or worker.proc is None or worker.proc.poll() is None:
                        continue
                    if not self._restart(worker):
                        status = 1
                        self.stopping = True
                time.sleep(0.2)
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return status

    def _stop(self, _signum: int, _frame: FrameType | None) -> None:
        self.stopping = True

    def _fresh_metrics_dir(self) -> None:
        # prometheus_client's multiprocess mode: each worker writes its counters here, /metrics adds them up.
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self.metrics_dir.mkdir(parents=True, mode=0o700)

    def _start(self, worker: _Worker) -> None:
        fds = [s.fileno() for s in worker.sockets]
        spec = {
            "index": worker.index,
            "max_connections": self.max_connections,
            "fds": fds,
            "tls": [str(p) for p in (self.tls_files.cert, self.tls_files.key, self.tls_files.ca)]
            if self.tls_files
            else None,
            "settings": self.settings.model_dump(mode="json")
            | {"run_jobs": self.settings.run_jobs and worker.index == 0},
        }
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "ktizo.app.worker"],
            stdin=subprocess.PIPE,
            pass_fds=fds,
            env=env,
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(spec).encode())
        proc.stdin.close()
        worker.proc, worker.started = proc, time.monotonic()

    def _restart(self, worker: _Worker) -> bool:
        assert worker.proc is not None
        code = worker.proc.returncode
        quick = time.monotonic() - worker.started < QUICK_DEATH_SECONDS
        worker.quick_deaths = worker.quick_deaths + 1 if quick else 0
        if worker.quick_deaths >= QUICK_DEATHS:
            log.error("worker %d keeps dying at start (exit status %s): stopping", worker.index, code)
            return False
        log.warning("worker %d (pid %d) exited with status %s: starting it again", worker.index, worker.proc.pid, code)
        if quick:
            time.sleep(min(2.0, 0.2 * 2**worker.quick_deaths))
        self._start(worker)
        return True

    def _stop_all(self) -> None:
        running = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_SECONDS
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in %.0f s: killing it", proc.pid, GRACE_SECONDS)
                proc.kill()
                proc.wait()
        for worker in self.workers:
            for sock in worker.sockets:
                sock.close()


def metrics_dir(data_dir: Path) -> Path:
    return data_dir / "run" / "metrics"
