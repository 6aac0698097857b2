"""The DHCP lease hook: what dnsmasq passes, what reaches the server, and that it never fails dnsmasq."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ktizo.cli import app
from ktizo.pxe.events import DhcpEvent, Skip, handle, hook_script, parse_event
from tests.pxe.conftest import Stub

SRC = Path(__file__).resolve().parents[2] / "src"


def test_parse_what_dnsmasq_passes() -> None:
    assert parse_event(["add", "52:54:00:AB:CD:EF", "10.0.0.5", "node-1"]) == DhcpEvent(
        "add", "52:54:00:ab:cd:ef", "10.0.0.5", "node-1"
    )
    assert parse_event(["old", "52-54-00-ab-cd-ef", "10.0.0.5"]).hostname is None
    assert parse_event(["del", "525400abcdef", "fd99::5"]).ip == "fd99::5"
    for ignored in (["tftp", "12345", "10.0.0.5", "/tftp/undionly.kpxe"], ["init"], ["arp-add", "x", "y"], []):
        with pytest.raises(Skip):
            parse_event(ignored)
    for bad in (["add", "06-00:11", "10.0.0.5"], ["add", "52:54:00:ab:cd:ef", "10.0.0.300"], ["add", "x"]):
        with pytest.raises(Skip):
            parse_event(bad)


def test_reports_with_the_token(server: Stub, token_file: Path) -> None:
    line = handle(["add", "52:54:00:ab:cd:ef", "10.0.0.5", "node-1"], server=server.url, token_file=token_file)
    assert line.startswith("dhcp-event: reported add 52:54:00:ab:cd:ef 10.0.0.5")
    assert server.received == [
        (
            "/api/v1/dhcp/events",
            "Bearer ktzdhcp_secret",
            {"action": "add", "mac": "52:54:00:ab:cd:ef", "ip": "10.0.0.5", "hostname": "node-1"},
        )
    ]


def test_refusals_and_outages_are_one_line_never_an_error(server: Stub, token_file: Path, tmp_path: Path) -> None:
    server.status = 401
    assert "refused the DHCP event token" in handle(
        ["add", "52:54:00:ab:cd:ef", "10.0.0.5"], server=server.url, token_file=token_file
    )
    down = handle(["add", "52:54:00:ab:cd:ef", "10.0.0.5"], server="http://127.0.0.1:9", token_file=token_file)
    assert "is not reachable" in down and "dropped add 52:54:00:ab:cd:ef" in down
    missing = handle(["add", "52:54:00:ab:cd:ef", "10.0.0.5"], server=server.url, token_file=tmp_path / "none")
    assert "cannot read the token" in missing
    assert "ignoring 'tftp' events" in handle(["tftp", "1", "2", "3"], server=server.url, token_file=token_file)


def test_discovery_subnets(server: Stub, token_file: Path) -> None:
    outside = handle(["add", "52:54:00:ab:cd:ef", "192.0.2.7"], server=server.url, token_file=token_file,
                     subnets=["10.0.0.0/24"])  # fmt: skip
    assert "outside the discovery subnets" in outside and not server.received
    handle(["add", "52:54:00:ab:cd:ef", "10.0.0.7"], server=server.url, token_file=token_file, subnets=["10.0.0.0/24"])
    assert len(server.received) == 1


def test_the_hook_script_runs_as_dnsmasq_runs_it(server: Stub, token_file: Path, tmp_path: Path) -> None:
    script = tmp_path / "dhcp-event"
    script.write_text(hook_script(sys.executable, server=server.url, token_file=token_file, subnets=["10.0.0.0/8"]))
    script.chmod(0o700)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([script, "old", "52:54:00:ab:cd:ef", "10.1.2.3"], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "reported old" in done.stderr
    assert server.received[-1][2]["action"] == "old"
    garbage = subprocess.run([script, "--bogus", "x"], env=env, capture_output=True, text=True)
    assert garbage.returncode == 0


def test_hook_script_quotes_paths(tmp_path: Path) -> None:
    text = hook_script("/usr/bin/python3", server="http://h:1", token_file=tmp_path / "it's here" / "token")
    assert text.startswith("#!/bin/sh\n")
    assert "'\"'\"'" in text and text.rstrip().endswith('"$@"')


def test_cli_dhcp_event_exits_0_when_the_server_is_down(tmp_path: Path, token_file: Path) -> None:
    runner = CliRunner()
    env = {"KTIZO_DATA_DIR": str(tmp_path / "data"), "KTIZO_PUBLIC_URL": "http://127.0.0.1:9"}
    result = runner.invoke(
        app, ["pxe", "dhcp-event", "--token-file", str(token_file), "add", "52:54:00:ab:cd:ef", "10.0.0.5"], env=env
    )
    assert result.exit_code == 0
    assert "http://127.0.0.1:9 is not reachable" in result.output
    tftp = runner.invoke(app, ["pxe", "dhcp-event", "tftp", "173792", "10.0.0.5", "/x/snponly.efi"], env=env)
    assert tftp.exit_code == 0 and "ignoring 'tftp' events" in tftp.output


def test_cli_dhcp_event_reports(server: Stub, tmp_path: Path) -> None:
    pxe = tmp_path / "data" / "pxe"
    pxe.mkdir(parents=True)
    (pxe / "dhcp-token").write_text("from-data-dir\n")
    result = CliRunner().invoke(
        app,
        ["pxe", "dhcp-event", "del", "52:54:00:ab:cd:ef", "10.0.0.5", "n1"],
        env={"KTIZO_DATA_DIR": str(tmp_path / "data"), "KTIZO_PUBLIC_URL": server.url},
    )
    assert result.exit_code == 0, result.output
    assert server.received == [
        (
            "/api/v1/dhcp/events",
            "Bearer from-data-dir",
            {"action": "del", "mac": "52:54:00:ab:cd:ef", "ip": "10.0.0.5", "hostname": "n1"},
        )
    ]
