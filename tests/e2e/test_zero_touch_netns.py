"""End to end, zero-touch: a host in its own namespace enrolls with its site's key and is active in one round
trip (no operator), checks in over mTLS with its certificate and its cak_ key, and Ktizo probes it."""

from __future__ import annotations

import json
import sys

import pytest

from tests.e2e import agentlab
from tests.e2e.agentlab import AGENT_PORT, HOST_IP
from tests.e2e.conftest import cli
from tests.e2e.netlab import BASE, Lab, wait_for

pytestmark = pytest.mark.slow


def test_agent_enrolls_zero_touch_and_checks_in_over_mtls(lab: Lab) -> None:
    k = agentlab.start(lab)
    cli(lab, "sites", "create", "fra1", "--name", "Frankfurt")
    key = cli(lab, "sites", "rotate-key", "fra1").strip()
    assert key.startswith("cek_")
    h = agentlab.host(lab)
    keyfile = h.etc / "fra1.key"
    keyfile.write_text(key + "\n")
    keyfile.chmod(0o600)
    agent = lab.start(
        "agent",
        h.ns.argv(
            sys.executable, "-m", "ktizo_agent", "--enroll", BASE, "--site", "fra1",
            "--enrollment-key-file", str(keyfile), "--ca-fingerprint", k.fingerprint,
            "--listen", f"{HOST_IP}:{AGENT_PORT}", *h.files,
        ),
        env={**k.env, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip

    def checked_in() -> object:
        agentlab.running(agent)
        rows = k.api("GET", "/api/v1/agents")
        return rows[0] if rows and rows[0].get("agent_address") else None

    row = wait_for(checked_in, 40, "the host to enroll zero-touch and check in")
    assert row["status"] == "approved" and row["approved_by"] == "site:fra1"  # no operator in the loop
    assert row["machine_id"] is None  # the raw machine-id never left the host
    assert row["agent_address"] == f"{HOST_IP}:{AGENT_PORT}"
    api_key = h.etc / "certs" / "agent-api-key"
    assert api_key.stat().st_mode & 0o777 == 0o600 and api_key.read_text().startswith("cak_")
    assert key not in agent.output()  # the site key is never logged

    probed = lab.server.run(
        sys.executable, "-m", "ktizo", "--data-dir", str(lab.data_dir), "agents", "probe", str(row["id"]), "--json"
    )
    assert json.loads(probed.stdout)["machine_id"] == h.machine_id
    shown = cli(lab, "sites", "show", "fra1")
    assert "v1: 1 agent(s)" in shown
    lab.stop(agent)
    lab.stop(k.serve)
