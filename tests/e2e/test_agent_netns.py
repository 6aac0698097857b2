"""End to end: ``ktizo-agent`` in one network namespace against ``ktizo serve`` in another, over the lab's bridge.

The host enrolls with the CA fingerprint an operator read off Ktizo, waits as pending, is approved through the API,
writes its certificate, whitelists Ktizo's address, serves its facts over mTLS and checks in; Ktizo then probes it
with its manager certificate. Revoked, it can no longer check in."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from tests.e2e import agentlab
from tests.e2e.agentlab import AGENT_PORT, HOST_IP
from tests.e2e.netlab import BASE, SERVER_IP, Lab, wait_for

pytestmark = pytest.mark.slow


def test_agent_enrolls_serves_checks_in_and_is_probed_across_namespaces(lab: Lab) -> None:
    k = agentlab.start(lab)
    h = agentlab.host(lab)
    ns, etc, machine_id, files = h.ns, h.etc, h.machine_id, h.files
    agent = lab.start(
        "agent",
        ns.argv(
            sys.executable, "-m", "ktizo_agent", "--enroll", BASE, "--ca-fingerprint", k.fingerprint,
            "--listen", f"{HOST_IP}:{AGENT_PORT}", *files,
        ),
        env={**k.env, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip

    def pending() -> object:
        agentlab.running(agent)
        rows = k.api("GET", "/api/v1/agents?status=pending")
        return rows[0] if rows else None

    row = wait_for(pending, 30, "the host to enroll")
    assert row["machine_id"] == machine_id
    assert row["facts"]["ip_addresses"] == [HOST_IP]
    assert row["last_ip"] == HOST_IP  # it came from its own namespace, over the bridge
    saved = yaml.safe_load((etc / "config.yaml").read_text())
    assert saved["enrollment"]["manager_url"] == BASE and saved["enrollment"]["polling_token"]

    k.api("POST", f"/api/v1/agents/{machine_id}/approve", {"notes": "e2e"})

    def checked_in() -> object:
        agentlab.running(agent)
        found = k.api("GET", f"/api/v1/agents/{machine_id}")
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
    stored = k.api("GET", f"/api/v1/agents/{machine_id}")
    assert isinstance(stored, dict) and stored["facts"]["host"]["machine_id"] == machine_id

    # Revoked: the next check-in is refused, and the agent says so.
    k.api("POST", f"/api/v1/agents/{machine_id}/revoke")
    checkin = ns.run(sys.executable, "-m", "ktizo_agent", "checkin", *files, check=False)
    assert checkin.returncode == 3, checkin.stdout + checkin.stderr
    lab.stop(agent)
    lab.stop(k.serve)
