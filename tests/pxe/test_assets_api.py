"""Serving boot assets to iPXE: HEAD, Range (206/416), ETag and Last-Modified, no path traversal."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ktizo.settings import Settings

V = "v1.13.0"
URL = f"/assets/talos/{V}/amd64/vmlinuz"
KERNEL = os.urandom(200_000)


@pytest.fixture
def kernel(settings: Settings) -> Path:
    directory = settings.assets_dir / "talos" / V / "amd64"
    directory.mkdir(parents=True)
    (directory / "vmlinuz").write_bytes(KERNEL)
    return directory / "vmlinuz"


def test_get_and_head(client: TestClient, kernel: Path) -> None:
    got = client.get(URL)
    assert got.status_code == 200 and got.content == KERNEL
    assert got.headers["accept-ranges"] == "bytes"
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers["etag"] and got.headers["last-modified"]
    head = client.head(URL)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(KERNEL))
    assert head.headers["etag"] == got.headers["etag"]


def test_ranges(client: TestClient, kernel: Path) -> None:
    part = client.get(URL, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == KERNEL[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(KERNEL)}"
    tail = client.get(URL, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == KERNEL[-10:]
    beyond = client.get(URL, headers={"Range": f"bytes={len(KERNEL)}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(KERNEL)}"
    # If-Range with a stale validator: the whole file, not a range of something else.
    stale = client.get(URL, headers={"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert stale.status_code == 200 and stale.content == KERNEL


def test_conditional_requests(client: TestClient, kernel: Path) -> None:
    first = client.get(URL)
    etag, modified = first.headers["etag"], first.headers["last-modified"]
    again = client.get(URL, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert client.get(URL, headers={"If-None-Match": '"other", ' + etag}).status_code == 304
    assert client.get(URL, headers={"If-None-Match": '"other"'}).status_code == 200
    assert client.get(URL, headers={"If-Modified-Since": modified}).status_code == 304
    assert client.get(URL, headers={"If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"}).status_code == 200
    for garbage in ("yesterday", "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"):  # ignored, as RFC 9110 says
        odd = client.get(URL, headers={"If-Modified-Since": garbage})
        assert odd.status_code == 200 and odd.content == KERNEL
    # A replaced file gets a new validator.
    os.utime(kernel, (1_000_000_000, 1_000_000_000))
    assert client.get(URL, headers={"If-None-Match": etag}).status_code == 200


def test_missing_asset_says_how_to_fetch_it(client: TestClient, settings: Settings) -> None:
    missing = client.get(f"/assets/talos/{V}/arm64/initramfs.xz")
    assert missing.status_code == 404
    assert f"ktizo assets fetch --talos-version {V}" in missing.text
    assert client.head(f"/assets/talos/{V}/arm64/initramfs.xz").status_code == 404


@pytest.mark.parametrize(
    "path",
    [
        f"/assets/talos/{V}/amd64/..%2F..%2F..%2Fktizo.db",
        f"/assets/talos/{V}/amd64/%2e%2e",
        "/assets/talos/..%2F..%2Fpxe/amd64/vmlinuz",
        f"/assets/talos/{V}/..%2Famd64/vmlinuz",
        f"/assets/talos/{V}/amd64/vmlinuz%00",
        f"/assets/talos/{V}/amd64/SHA256SUMS",
        f"/assets/talos/{V}/amd64/vmlinuz.part",
        f"/assets/talos/{V}/x86_64/vmlinuz",
        "/assets/talos/v1.13.0.0/amd64/vmlinuz",
        "/assets/talos/../../ktizo.db",
        f"/assets/talos/{V}/amd64/vmlinuz;.xz",
    ],
)
def test_traversal_and_unknown_names_are_refused(client: TestClient, kernel: Path, path: str) -> None:
    (kernel.parent / "SHA256SUMS").write_text("x")
    (kernel.parent / "vmlinuz.part").write_text("x")
    response = client.get(path)
    assert response.status_code in (404, 405), (path, response.status_code)
    assert response.content != KERNEL and b"SELECT" not in response.content


def test_a_symlink_out_of_the_assets_dir_is_not_followed(client: TestClient, settings: Settings) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    secret = settings.data_dir / "secret"
    secret.write_text("cluster keys")
    directory = settings.assets_dir / "talos" / V / "amd64"
    directory.mkdir(parents=True)
    (directory / "initramfs.xz").symlink_to(secret)
    response = client.get(f"/assets/talos/{V}/amd64/initramfs.xz")
    assert response.status_code == 404 and "cluster keys" not in response.text
    # A link that stays inside (an operator sharing one file between releases) is fine.
    (directory / "vmlinuz.real").write_bytes(b"kernel")
    (directory / "vmlinuz").symlink_to(directory / "vmlinuz.real")
    assert client.get(f"/assets/talos/{V}/amd64/vmlinuz").content == b"kernel"


def test_streamed_not_loaded(client: TestClient, settings: Settings) -> None:
    """A 4 GiB file is sent in 64 KiB chunks as it is read: the app is driven over raw ASGI and stopped after a
    few chunks, which would be impossible if it had read the file whole first."""
    directory = settings.assets_dir / "talos" / V / "amd64"
    directory.mkdir(parents=True)
    with (directory / "initramfs.xz").open("wb") as f:
        f.truncate(4 * 1024**3)  # sparse: no disk used
    sent: list[dict[str, Any]] = []

    class Enough(Exception):
        pass

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)  # the client never disconnects on its own
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if sum(m["type"] == "http.response.body" for m in sent) == 3:
            raise Enough

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": f"/assets/talos/{V}/amd64/initramfs.xz",
        "raw_path": f"/assets/talos/{V}/amd64/initramfs.xz".encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"ktizo")],
        "client": ("10.0.0.9", 1),
        "server": ("ktizo", 80),
        "state": {},
    }
    with pytest.raises(Exception) as caught:  # noqa: PT011 - Enough, possibly wrapped in an ExceptionGroup
        asyncio.run(client.app(scope, receive, send))  # type: ignore[arg-type]
    assert "Enough" in repr(caught.value)
    start = sent[0]
    assert start["status"] == 200 and (b"content-length", str(4 * 1024**3).encode()) in start["headers"]
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert all(len(m["body"]) == 64 * 1024 and m["more_body"] for m in bodies)
