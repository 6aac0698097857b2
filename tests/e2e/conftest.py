"""The end-to-end lab as fixtures: a real ``ktizo serve`` and ``ktizo pxe run`` (dnsmasq) in a network namespace,
set up through the real CLI, torn down whatever happens."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from typer.testing import CliRunner

from ktizo.cli import app
from tests.e2e.netlab import BASE, PORT, SERVER_IP, HttpAnswer, Lab, Proc, missing_prerequisites, wait_for
from tests.support import TALOS_FIXTURES

RANGE = "10.213.0.100,10.213.0.199,1h"


@dataclass
class Ktizo:
    """A running Ktizo in the lab, and an admin token for its API."""

    lab: Lab
    serve: Proc
    pxe: Proc
    token: str

    def api(self, method: str, path: str, json_body: Any = None) -> HttpAnswer:
        headers = {"Authorization": f"Bearer {self.token}"}
        return self.lab.server.http(method, BASE + path, headers=headers, json_body=json_body)

    def device(self, mac: str) -> dict[str, Any] | None:
        answer = self.api("GET", f"/api/v1/devices?q={mac}")
        assert answer.status == 200, answer.text
        found = [d for d in answer.json() if d["mac_address"] == mac]
        return found[0] if found else None


def cli(lab: Lab, *args: str, input: str | None = None) -> str:
    """A ``ktizo`` command against the lab's data directory, run in-process (the same code as the console script)."""
    env: dict[str, str | None] = {"KTIZO_DATA_DIR": str(lab.data_dir), "KTIZO_DATABASE_URL": None}
    result = CliRunner().invoke(app, list(args), env=env, input=input)
    assert result.exit_code == 0, f"ktizo {' '.join(args)}: {result.output}"
    return result.stdout


def start_ktizo(lab: Lab, pxe_args: list[str], **env: str) -> Ktizo:
    lab.data_dir.mkdir(mode=0o755)
    cli(lab, "db", "upgrade")
    cli(lab, "users", "create", "e2e", "--role", "admin", "--password-stdin", input="e2e-password-long-enough\n")
    token = cli(lab, "tokens", "create", "e2e").strip()
    for role in ("controlplane", "worker"):
        cli(lab, "cluster", "import-base", role, str(TALOS_FIXTURES / f"{role}.yaml"))

    # Short long-poll: a pending device's config request is answered 403 after a second, not a minute.
    environment = lab.env(KTIZO_ACCESS_LOG="true", KTIZO_LONG_POLL_SECONDS="1", **env)
    serve = lab.start(
        "serve",
        lab.server.argv(
            sys.executable,
            "-m",
            "ktizo",
            "serve",
            "--host",
            "0.0.0.0",  # noqa: S104 - inside the lab namespace
            "--port",
            str(PORT),
        ),
        env=environment,
    )

    def ready() -> bool:
        if serve.popen.poll() is not None:
            raise AssertionError(f"ktizo serve exited:\n{serve.output()}")
        return lab.server.http("GET", f"{BASE}/healthz", timeout=2).status == 200

    wait_for(ready, 40, "ktizo serve to answer", interval=0.2)
    pxe = lab.start(
        "pxe",
        lab.server.argv(sys.executable, "-m", "ktizo", "pxe", "run", "--interface", "br0", *pxe_args),
        env=environment,
    )

    def dnsmasq_up() -> bool:
        if pxe.popen.poll() is not None:
            raise AssertionError(f"ktizo pxe run exited:\n{pxe.output()}")
        return "TFTP root is" in pxe.output()

    wait_for(dnsmasq_up, 30, "dnsmasq to start", interval=0.1)
    return Ktizo(lab, serve, pxe, token)


@pytest.fixture(scope="module")
def full_dhcp() -> Iterator[Ktizo]:
    """Ktizo with dnsmasq as the only DHCP server on the segment (full mode, with a range)."""
    reason = missing_prerequisites()
    if reason:
        pytest.skip(reason)
    lab = Lab.create()
    try:
        yield start_ktizo(lab, ["--mode", "full", "--range", RANGE, "--ipv6-ra", "--verbose"])
    finally:
        lab.close()


__all__ = ["BASE", "PORT", "SERVER_IP", "Ktizo", "cli", "start_ktizo"]


@pytest.fixture
def lab() -> Iterator[Lab]:
    """An empty lab (server namespace and bridge) for one test, torn down after it."""
    reason = missing_prerequisites()
    if reason:
        pytest.skip(reason)
    made = Lab.create()
    try:
        yield made
    finally:
        made.close()
