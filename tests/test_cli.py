"""The admin CLI works on the same data as the server, through the same services."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from ktizo.cli import app
from ktizo.services.registry import Services
from tests.support import TALOS_FIXTURES


def test_devices_approve_reject_show_list_delete_by_mac(cli, services: Services) -> None:  # type: ignore[no-untyped-def]
    services.devices.register("52:54:00:00:00:01", "10.1.1.1")
    services.devices.register("52:54:00:00:00:02", "10.1.1.2")

    out = cli("devices", "list", "--status", "pending").output
    assert "52:54:00:00:00:01" in out and "52:54:00:00:00:02" in out and "pending" in out

    out = cli(
        "devices",
        "approve",
        "52-54-00-00-00-01",
        "--hostname",
        "w1",
        "--ip",
        "10.0.5.10/24",
        "--role",
        "controlplane",
        "--notes",
        "rack 1",
    ).output
    assert "approved device 1 (52:54:00:00:00:01) as controlplane, hostname w1, ip 10.0.5.10/24" in out
    cli("devices", "reject", "2")

    shown = json.loads(cli("devices", "show", "525400000001", "--json").output)
    assert (shown["status"], shown["hostname"], shown["role"], shown["notes"]) == (
        "approved",
        "w1",
        "controlplane",
        "rack 1",
    )
    listed = json.loads(cli("devices", "list", "--json").output)
    assert {d["mac_address"]: d["status"] for d in listed} == {
        "52:54:00:00:00:01": "approved",
        "52:54:00:00:00:02": "rejected",
    }

    audit = cli("audit", "list", "--device", "52:54:00:00:00:01").output
    assert "approve" in audit and "cli" in audit

    cli("devices", "delete", "2", "--yes")
    assert "52:54:00:00:00:02" not in cli("devices", "list").output


def test_cli_errors_are_one_clear_line(cli, services: Services) -> None:  # type: ignore[no-untyped-def]
    r = cli("devices", "approve", "52:54:00:00:00:09", ok=False)
    assert r.exit_code == 1
    assert "error: no device with MAC 52:54:00:00:00:09" in r.output
    services.devices.register("52:54:00:00:00:03", None)
    r = cli("devices", "approve", "52:54:00:00:00:03", "--ip", "10.0.0.1", ok=False)
    assert r.exit_code == 2
    assert "ip_address" in r.output and "CIDR" in r.output
    r = cli("devices", "show", "not-a-mac", ok=False)
    assert r.exit_code == 2 and "not a MAC address" in r.output


def test_users_and_tokens(cli, services: Services) -> None:  # type: ignore[no-untyped-def]
    out = cli(
        "users", "create", "carol", "--role", "viewer", "--password-stdin", input="a long enough password\n"
    ).output
    assert "created user carol (viewer)" in out
    token = cli("tokens", "create", "carol").output.strip()
    assert re.fullmatch(r"ktz_[A-Za-z0-9_-]{40,}", token)
    assert services.users.resolve_token(token).username == "carol"
    r = cli("users", "create", "dave", "--password-stdin", input="short\n", ok=False)
    assert r.exit_code == 2 and "at least 12" in r.output


def test_import_base_validates(cli, settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.yaml"
    bad.write_text("machine:\n  type: worker\n  typo: 1\n")
    r = cli("cluster", "import-base", "worker", str(bad), ok=False)
    assert r.exit_code == 2 and "typo" in r.output
    out = cli("cluster", "import-base", "worker", str(TALOS_FIXTURES / "worker.yaml")).output
    assert "worker base config installed" in out
    assert (settings.base_templates_dir / "worker.yaml").read_bytes() == (TALOS_FIXTURES / "worker.yaml").read_bytes()


def test_cli_on_an_uninitialised_database_says_what_to_do(tmp_path: Path) -> None:
    r = CliRunner().invoke(
        app, ["--data-dir", str(tmp_path / "empty"), "devices", "list"], env={"KTIZO_DATABASE_URL": ""}
    )
    assert r.exit_code == 1
    assert "ktizo db upgrade" in r.output


@pytest.mark.sqlite_only
def test_quick_start_serve_creates_admin_and_answers(tmp_path: Path) -> None:
    """`ktizo serve` on an empty data directory: migrates, creates admin, prints its password, serves."""
    port = 18000 + os.getpid() % 1000
    env = {k: v for k, v in os.environ.items() if not k.startswith("KTIZO_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ktizo",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "API docs:" in line:
                break
        output = "".join(lines)
        password = re.search(r"initial password \(shown once\): (\S+)", output)
        assert password, output
        for _ in range(100):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").json()["status"] == "ready"
        login = httpx.post(
            f"http://127.0.0.1:{port}/api/v1/auth/login",
            json={"username": "admin", "password": password.group(1)},
        )
        assert login.status_code == 200
        assert (tmp_path / "data" / "ktizo.db").exists()
        assert (tmp_path / "data" / "templates" / "base").is_dir()
        assert "docs" in httpx.get(f"http://127.0.0.1:{port}/docs").text
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
