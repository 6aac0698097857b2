"""Fixtures for the network-boot plumbing: a local stand-in for the Talos image factory, and recording HTTP
servers standing in for Ktizo (and for an attacker) behind the DHCP hook."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


@dataclass
class Factory:
    """Serves ``files`` like the image factory (or a CDN in front of it): Range, If-Range and ETag included.

    ``cut_after`` makes the next response per path stop after that many body bytes (a dropped connection);
    ``lie_total`` makes 206 answers announce that total instead of the real one."""

    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)
    lie_total: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)

    def etag(self, path: str) -> str:
        return '"' + hashlib.sha256(self.files[path]).hexdigest()[:16] + '"'


def _handler(factory: Factory) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            factory.requests.append((self.path, self.headers.get("Range")))
            body = factory.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start, status = 0, 200
            wanted = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if wanted and (if_range is None or if_range == factory.etag(self.path)):
                m = re.fullmatch(r"bytes=(\d+)-", wanted)
                assert m, wanted
                start = int(m.group(1))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            chunk = body[start:]
            self.send_response(status)
            self.send_header("Content-Length", str(len(chunk)))
            self.send_header("ETag", factory.etag(self.path))
            if status == 206:
                total = factory.lie_total.get(self.path, len(body))
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{total}")
            self.end_headers()
            cut = factory.cut_after.pop(self.path, None)
            if cut is not None:
                self.wfile.write(chunk[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(chunk)

    return Handler


@pytest.fixture
def factory() -> Iterator[Factory]:
    state = Factory()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}/image/schematic0"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@dataclass
class Stub:
    """Records every POST: (path, Authorization header, JSON body); answers ``status``."""

    url: str = ""
    status: int = 200
    received: list[tuple[str, str | None, dict[str, object]]] = field(default_factory=list)

    def sent(self) -> list[tuple[str | None, dict[str, object]]]:
        return [(auth, body) for _, auth, body in self.received]


@pytest.fixture
def stubs() -> Iterator[Callable[[], Stub]]:
    """Starts as many recording HTTP servers as a test asks for: Ktizo, and the attacker's."""
    servers: list[ThreadingHTTPServer] = []

    def start() -> Stub:
        stub = Stub()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.received.append((self.path, self.headers.get("Authorization"), body))
                self.send_response(stub.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        stub.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(httpd)
        return stub

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server(stubs: Callable[[], Stub]) -> Stub:
    return stubs()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "dhcp-token"
    path.write_text("ktzdhcp_secret\n")
    return path
