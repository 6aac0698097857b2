"""Fixtures for the network-boot plumbing: a local stand-in for the Talos image factory."""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
