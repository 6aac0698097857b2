"""A real local HTTP receiver for webhook tests, and the documented verification recipe (docs/webhooks.md).

The receiver is a ``ThreadingHTTPServer`` on 127.0.0.1 in a thread; it records every request and answers with
``status`` (a redirect carries ``Location``), or holds the request until ``release`` is set (a slow receiver)."""

from __future__ import annotations

import hashlib
import hmac
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def verify(secret: str, header: str, body: bytes, *, tolerance: int | None = None, now: float | None = None) -> bool:
    """docs/webhooks.md's recipe: parse ``t=…,v1=…``, recompute HMAC-SHA256 over ``"<t>." + body`` with the
    subscription's secret, compare in constant time (and, in production, refuse an old ``t``)."""
    parts = dict(item.split("=", 1) for item in header.split(","))
    expected = hmac.new(secret.encode(), parts["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    if tolerance is not None and abs((now if now is not None else time.time()) - int(parts["t"])) > tolerance:
        return False
    return hmac.compare_digest(expected, parts["v1"])


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def delivery(self) -> str:
        return self.headers["x-ktizo-delivery"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Receiver:
    def __init__(self, port: int = 0, *, status: int = 200, location: str | None = None) -> None:
        self.requests: list[Received] = []
        self.status = status
        self.location = location
        self.release = threading.Event()
        self.release.set()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.requests.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                receiver.release.wait(30)
                self.send_response(receiver.status)
                if receiver.location:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        # socketserver's listen backlog is 5: deliverers sending a batch at once overflowed it, and the
        # connections reset were retried only after their 20 s backoff (a flaky test, not a Ktizo fault).
        server_class = type("Server", (ThreadingHTTPServer,), {"request_queue_size": 256})
        self.server = server_class(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def by_delivery(self) -> Counter[str]:
        with self._lock:
            return Counter(r.delivery for r in self.requests)

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.requests) >= count:
                    return list(self.requests)
            time.sleep(0.05)
        raise AssertionError(f"{len(self.requests)} request(s) received, {count} expected")

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
