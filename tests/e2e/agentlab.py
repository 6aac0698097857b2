"""The agent lab: ``ktizo serve`` (with its mTLS listener) in the lab's server namespace and a Linux host in a
namespace of its own on the bridge, with the files ``ktizo-agent`` reads and writes in a directory of the lab."""

from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.e2e.conftest import cli
from tests.e2e.netlab import BASE, PORT, Lab, Netns, Proc, wait_for

HOST_IP = "10.213.0.50"
AGENT_PORT = 9443
MTLS_PORT = 8443


@dataclass
class AgentLab:
    lab: Lab
    token: str
    fingerprint: str
    serve: Proc
    env: dict[str, str]

    def api(self, method: str, path: str, body: object = None) -> Any:
        answer = self.lab.server.http(
            method, BASE + path, headers={"Authorization": f"Bearer {self.token}"}, json_body=body
        )
        assert answer.status < 300, f"{method} {path}: {answer.status} {answer.text}"
        return answer.json() if answer.text else None


@dataclass
class Host:
    ns: Netns
    etc: Path
    machine_id: str

    @property
    def files(self) -> list[str]:
        """Every path and identity source of the host, as ktizo-agent options (it runs unprivileged)."""
        etc = self.etc
        return [
            "--config", str(etc / "config.yaml"),
            "--cert-dir", str(etc / "certs"),
            "--whitelist", str(etc / "whitelist.yaml"),
            "--machine-id-file", str(etc / "machine-id"),
            "--os-release-file", str(etc / "os-release"),
            "--hostname", "web-01.lab.example",
            "--ip-address", HOST_IP,
        ]  # fmt: skip


def start(lab: Lab) -> AgentLab:
    lab.data_dir.mkdir(mode=0o755)
    cli(lab, "db", "upgrade")
    cli(lab, "users", "create", "e2e", "--role", "admin", "--password-stdin", input="e2e-password-long-enough\n")
    token = cli(lab, "tokens", "create", "e2e").strip()
    fingerprint = cli(lab, "pki", "init").split()[-1]
    assert fingerprint == cli(lab, "pki", "fingerprint").strip()
    env = lab.env(KTIZO_ENROLL_POLL_SECONDS="1", KTIZO_AGENT_CHECKIN_SECONDS="5", KTIZO_MTLS_PORT=str(MTLS_PORT))
    serve = lab.start(
        "serve",
        lab.server.argv(sys.executable, "-m", "ktizo", "serve", "--host", "0.0.0.0", "--port", str(PORT)),  # noqa: S104
        env=env,
    )
    wait_for(lambda: lab.server.http("GET", f"{BASE}/healthz", timeout=2).status == 200, 40, "ktizo serve")
    return AgentLab(lab, token, fingerprint, serve, env)


def host(lab: Lab) -> Host:
    client = lab.client()
    client.ns.run("ip", "addr", "add", f"{HOST_IP}/24", "dev", "c0")
    etc = lab.workdir / "host-etc"
    etc.mkdir()
    machine_id = secrets.token_hex(16)
    (etc / "machine-id").write_text(machine_id + "\n")
    (etc / "os-release").write_text('ID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian GNU/Linux 12"\n')
    return Host(client.ns, etc, machine_id)


def running(proc: Proc) -> None:
    if proc.popen.poll() is not None:
        raise AssertionError(f"{proc.name} exited {proc.popen.returncode}:\n{proc.output()}")
