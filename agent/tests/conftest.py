"""Fixtures: a fake Ktizo (real HTTP, real mTLS), a host laid out in tmp_path, and ways to run the agent against
them: in-process through ``cli.run`` (fast, lets a test patch the OS), or as ``python -m ktizo_agent``."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from fake_manager import MANAGER_URI, FakeManager
from ktizo_agent import cli, config, facts, identity, serve
from ktizo_agent.stop import Stopper

MACHINE_ID = "0123456789abcdef0123456789abcdef"
HOSTNAME = "web1.example.test"
HOST_IP = "192.0.2.10"


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(cli.KEY_ENV, raising=False)  # a site key from the developer's shell must not leak in


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[FakeManager]:
    fake = FakeManager(tmp_path / "ktizo").start()
    yield fake
    fake.stop()


@dataclass
class Host:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "etc" / "config.yaml"

    @property
    def cert_dir(self) -> Path:
        return self.root / "etc" / "certs"

    @property
    def whitelist(self) -> Path:
        return self.root / "etc" / "whitelist.yaml"

    @property
    def paths(self) -> config.Paths:
        return config.Paths(config=self.config, cert_dir=self.cert_dir, whitelist=self.whitelist)

    @property
    def sources(self) -> identity.Sources:
        return identity.Sources(
            machine_id_file=self.root / "machine-id",
            os_release_file=self.root / "os-release",
            hostname=HOSTNAME,
            ip_addresses=(HOST_IP,),
        )

    @property
    def roots(self) -> facts.Roots:
        return facts.Roots(proc=self.root / "proc", sys=self.root / "sys")

    @property
    def args(self) -> list[str]:
        return [
            "--config", str(self.config),
            "--cert-dir", str(self.cert_dir),
            "--whitelist", str(self.whitelist),
            "--machine-id-file", str(self.root / "machine-id"),
            "--os-release-file", str(self.root / "os-release"),
            "--hostname", HOSTNAME,
            "--ip-address", HOST_IP,
            "--proc-root", str(self.root / "proc"),
            "--sys-root", str(self.root / "sys"),
        ]  # fmt: skip

    def read_config(self) -> dict[str, Any]:
        return yaml.safe_load(self.config.read_text()) if self.config.exists() else {}

    def cert_files(self) -> set[str]:
        return set(os.listdir(self.cert_dir)) if self.cert_dir.exists() else set()


def make_fake_roots(root: Path) -> None:
    proc, sys_ = root / "proc", root / "sys"
    proc.mkdir(parents=True, exist_ok=True)
    (proc / "cpuinfo").write_text(
        "processor\t: 0\nmodel name\t: Fake CPU @ 2.00GHz\n\nprocessor\t: 1\nmodel name\t: Fake CPU @ 2.00GHz\n"
    )
    (proc / "meminfo").write_text("MemTotal:       16318412 kB\nMemFree:         1000000 kB\n")
    for name, size, rotational, model in (("sda", "1953525168", "1", "FAKE DISK  "), ("nvme0n1", "2000", "0", None)):
        base = sys_ / "block" / name
        (base / "queue").mkdir(parents=True)
        (base / "size").write_text(size + "\n")
        (base / "queue" / "rotational").write_text(rotational + "\n")
        if model:
            (base / "device").mkdir()
            (base / "device" / "model").write_text(model + "\n")
    for skipped in ("loop0", "ram0"):
        (sys_ / "block" / skipped).mkdir(parents=True)
        (sys_ / "block" / skipped / "size").write_text("100\n")
    for name, mac, mtu, state, speed in (
        ("eth0", "52:54:00:12:34:56", "1500", "up", "1000"),
        ("wlan0", "52:54:00:ab:cd:ef", None, "down", "-1"),
        ("lo", "00:00:00:00:00:00", "65536", "unknown", None),
    ):
        base = sys_ / "class" / "net" / name
        base.mkdir(parents=True)
        (base / "address").write_text(mac + "\n")
        (base / "operstate").write_text(state + "\n")
        if mtu:
            (base / "mtu").write_text(mtu + "\n")
        if speed:
            (base / "speed").write_text(speed + "\n")


@pytest.fixture
def host(tmp_path: Path) -> Host:
    root = tmp_path / "host"
    root.mkdir()
    (root / "machine-id").write_text(MACHINE_ID + "\n")
    (root / "os-release").write_text('NAME="Debian GNU/Linux"\nID=debian\nVERSION_ID="12"\n')
    make_fake_roots(root)
    return Host(root)


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)
    yield
    os.umask(old)


def run(*argv: str) -> int:
    return cli.run(list(argv))


def enroll_args(manager: FakeManager, host: Host, *extra: str) -> list[str]:
    return ["enroll", manager.url, "--ca-fingerprint", manager.ca.fingerprint, *host.args, *extra]


@pytest.fixture
def enrolled(manager: FakeManager, host: Host) -> Host:
    manager.approve_after = 1
    assert run(*enroll_args(manager, host)) == 0
    return host


_children: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _reap_children() -> Iterator[None]:
    """A failed test must not leave an agent process running (or its pipes open)."""
    yield
    while _children:
        proc = _children.pop()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def agent_cli(*argv: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ktizo_agent", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    _children.append(proc)
    return proc


class StderrReader:
    """Collects a child's stderr lines in a thread, so a test can wait for one without blocking forever."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert proc.stderr is not None
        stream = proc.stderr
        self.thread = threading.Thread(target=lambda: [self.lines.put(line) for line in stream], daemon=True)
        self.thread.start()

    def wait_for(self, text: str, timeout: float = 10.0) -> str:
        while True:
            line = self.lines.get(timeout=timeout)
            self.seen.append(line)
            if text in line:
                return line

    def rest(self) -> str:
        """Everything the child wrote, once it has exited."""
        self.proc.wait(timeout=10)
        self.thread.join(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        with contextlib.suppress(queue.Empty):
            while True:
                self.seen.append(self.lines.get_nowait())
        return "".join(self.seen)


@contextlib.contextmanager
def serving(host: Host, **kwargs: Any) -> Iterator[int]:
    """``serve`` in a thread of this process, on a free port on 127.0.0.1; yields the port."""
    stopper = Stopper()
    ports: queue.Queue[int] = queue.Queue()
    failure: list[BaseException] = []

    def target() -> None:
        try:
            serve.serve(
                host.paths,
                host.sources,
                host.roots,
                ("127.0.0.1", 0),
                stopper,
                on_listening=lambda h, p: ports.put(p),
                retry_base=0.05,
                poll_interval=0.01,
                **kwargs,
            )
        except BaseException as exc:
            failure.append(exc)
            ports.put(0)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    port = ports.get(timeout=10)
    if failure:
        raise failure[0]
    try:
        yield port
    finally:
        stopper.stop(signal.SIGTERM)
        thread.join(timeout=10)
        assert not thread.is_alive()


@dataclass
class Answer:
    status: int
    body: Any
    peer: x509.Certificate


def https_get(
    port: int,
    *,
    ca: Path,
    cert: Path | None = None,
    key: Path | None = None,
    path: str = "/v1/facts",
    method: str = "GET",
) -> Answer:
    """A request as Ktizo's probe makes it: Ktizo's CA as the only root, the agent's hostname checked."""
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=HOSTNAME) as tls,
    ):
        peer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
        tls.sendall(f"{method} {path} HTTP/1.1\r\nHost: {HOSTNAME}\r\nConnection: close\r\n\r\n".encode())
        response = http.client.HTTPResponse(tls)
        response.begin()
        data = response.read()
    return Answer(response.status, json.loads(data) if data else None, peer)


def manager_identity(manager: FakeManager, directory: Path) -> tuple[Path, Path]:
    """Ktizo's manager client certificate: client auth, the URI SAN no agent certificate carries."""
    return manager.ca.write_pair(directory, "ktizo-manager", uris=[MANAGER_URI], server=False, client=True)
