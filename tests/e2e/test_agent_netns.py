"""End to end: ``ktizo-agent`` in one network namespace against ``ktizo serve`` in another, over the lab's bridge.

The host enrolls with the CA fingerprint an operator read off Ktizo, waits as pending, is approved through the API,
writes its certificate, whitelists Ktizo's address, serves its facts over mTLS and checks in; Ktizo then probes it
with its manager certificate. Revoked, it can no longer check in."""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import cli
from tests.e2e.netlab import BASE, PORT, SERVER_IP, Lab, Netns, missing_prerequisites, wait_for

pytestmark = pytest.mark.slow
HOST_IP = "10.213.0.50"
AGENT_PORT = 9443
MTLS_PORT = 8443


@pytest.fixture
def lab() -> Iterator[Lab]:
    reason = missing_prerequisites()
    if reason:
        pytest.skip(reason)
    lab = Lab.create()
    try:
        yield lab
    finally:
        lab.close()


def api(lab: Lab, token: str, method: str, path: str, body: object = None) -> object:
    answer = lab.server.http(method, BASE + path, headers={"Authorization": f"Bearer {token}"}, json_body=body)
    assert answer.status < 300, f"{method} {path}: {answer.status} {answer.text}"
    return answer.json() if answer.text else None


def host_namespace(lab: Lab) -> Netns:
    client = lab.client()
    client.ns.run("ip", "addr", "add", f"{HOST_IP}/24", "dev", "c0")
    return client.ns


def test_agent_enrolls_serves_checks_in_and_is_probed_across_namespaces(lab: Lab, tmp_path: Path) -> None:
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

    ns = host_namespace(lab)
    etc = lab.workdir / "host-etc"
    etc.mkdir()
    machine_id = secrets.token_hex(16)
    (etc / "machine-id").write_text(machine_id + "\n")
    (etc / "os-release").write_text('ID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian GNU/Linux 12"\n')
    files = [
        "--config", str(etc / "config.yaml"),
        "--cert-dir", str(etc / "certs"),
        "--whitelist", str(etc / "whitelist.yaml"),
        "--machine-id-file", str(etc / "machine-id"),
        "--os-release-file", str(etc / "os-release"),
        "--hostname", "web-01.lab.example",
        "--ip-address", HOST_IP,
    ]  # fmt: skip
    agent = lab.start(
        "agent",
        ns.argv(
            sys.executable,
            "-m",
            "ktizo_agent",
            "--enroll",
            BASE,
            "--ca-fingerprint",
            fingerprint,
            "--listen",
            f"{HOST_IP}:{AGENT_PORT}",
            *files,
        ),
        env={**env, "PYTHONUNBUFFERED": "1"},
    )

    def pending() -> object:
        if agent.popen.poll() is not None:
            raise AssertionError(f"ktizo-agent exited {agent.popen.returncode}:\n{agent.output()}")
        rows = api(lab, token, "GET", "/api/v1/agents?status=pending")
        assert isinstance(rows, list)
        return rows[0] if rows else None

    row = wait_for(pending, 30, "the host to enroll")
    assert row["machine_id"] == machine_id
    assert row["facts"]["ip_addresses"] == [HOST_IP]
    assert row["last_ip"] == HOST_IP  # it came from its own namespace, over the bridge
    saved = yaml.safe_load((etc / "config.yaml").read_text())
    assert saved["enrollment"]["manager_url"] == BASE and saved["enrollment"]["polling_token"]

    api(lab, token, "POST", f"/api/v1/agents/{machine_id}/approve", {"notes": "e2e"})

    def checked_in() -> object:
        if agent.popen.poll() is not None:
            raise AssertionError(f"ktizo-agent exited {agent.popen.returncode}:\n{agent.output()}")
        found = api(lab, token, "GET", f"/api/v1/agents/{machine_id}")
        assert isinstance(found, dict)
        return found if found.get("agent_address") else None

    found = wait_for(checked_in, 40, "the agent to check in over mTLS")
    assert found["agent_address"] == f"{HOST_IP}:{AGENT_PORT}"
    assert found["hostname"] == "web-01"
    certs = etc / "certs"
    assert (certs / "server.key.pem").stat().st_mode & 0o777 == 0o600
    assert (certs / "server.pem").stat().st_mode & 0o777 == 0o644
    assert yaml.safe_load((etc / "whitelist.yaml").read_text())["allowed_ips"] == [SERVER_IP]
    assert "polling_token" not in (yaml.safe_load((etc / "config.yaml").read_text())["enrollment"] or {})

    # Ktizo calls the agent with its manager certificate, from its own namespace (a whitelisted address).
    probed = lab.server.run(
        sys.executable,
        "-m",
        "ktizo",
        "--data-dir",
        str(lab.data_dir),
        "agents",
        "probe",
        machine_id,
        "--json",
    )
    facts = json.loads(probed.stdout)
    assert facts["machine_id"] == machine_id
    assert facts["cpu"]["logical_cpus"] >= 1 and facts["memory"]["total_bytes"] > 0
    stored = api(lab, token, "GET", f"/api/v1/agents/{machine_id}")
    assert isinstance(stored, dict) and stored["facts"]["host"]["machine_id"] == machine_id

    # Revoked: the next check-in is refused, and the agent says so.
    api(lab, token, "POST", f"/api/v1/agents/{machine_id}/revoke")
    checkin = ns.run(sys.executable, "-m", "ktizo_agent", "checkin", *files, check=False)
    assert checkin.returncode == 3, checkin.stdout + checkin.stderr
    lab.stop(agent)
    lab.stop(serve)
