"""The DHCP hook's arguments come from dnsmasq, and the 4th is the hostname the DHCP client chose: nothing in them
may be read as an option (``--server=…`` would send the event, and the hook's token with it, to another host)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ktizo.cli import app
from ktizo.pxe.events import hook_script, main, parse_event
from tests.pxe.conftest import Stub

SRC = Path(__file__).resolve().parents[2] / "src"
MAC = "52:54:00:ab:cd:ef"
IP = "10.0.0.5"


def run_hook(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([script, *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def hook(tmp_path: Path, token_file: Path) -> Callable[[str], Path]:
    def write(server: str) -> Path:
        script = tmp_path / "dhcp-event"
        script.write_text(hook_script(sys.executable, server=server, token_file=token_file))
        script.chmod(0o700)
        return script

    return write


def test_the_hook_script_ends_its_options_before_dnsmasqs_arguments(token_file: Path) -> None:
    text = hook_script("/usr/bin/python3", server="http://h:1", token_file=token_file)
    assert text.rstrip().endswith(' -- "$@"')


@pytest.mark.parametrize(
    "hostname",
    ["--server=EVIL", "--server", "--token-file=/etc/shadow", "--subnet=192.0.2.0/24", "--help", "-h", "--"],
)
def test_a_hostname_like_an_option_does_not_redirect_the_hook(
    stubs: Callable[[], Stub], hook: Callable[[str], Path], hostname: str
) -> None:
    ktizo, evil = stubs(), stubs()
    script = hook(ktizo.url)
    extra = [evil.url] if hostname == "--server" else []
    done = run_hook(script, "add", MAC, IP, hostname.replace("EVIL", evil.url), *extra)
    assert done.returncode == 0, done.stderr
    assert f"reported add {MAC} {IP}" in done.stderr
    assert evil.received == []
    # Not a legal hostname (RFC 1123 labels never start with "-"): the lease is reported without one.
    assert ktizo.sent() == [("Bearer ktzdhcp_secret", {"action": "add", "mac": MAC, "ip": IP, "hostname": None})]


def test_main_stops_reading_options_at_the_event_even_without_the_double_dash(
    stubs: Callable[[], Stub], token_file: Path
) -> None:
    ktizo, evil = stubs(), stubs()
    options = ["--server", ktizo.url, "--token-file", str(token_file)]
    assert main([*options, "add", MAC, IP, f"--server={evil.url}"]) == 0
    assert main([*options, "--", "old", MAC, IP, f"--server={evil.url}"]) == 0
    assert main([*options, "--", "del", MAC, IP, "node-1"]) == 0
    assert evil.received == []
    assert [(body["action"], body["hostname"]) for _, body in ktizo.sent()] == [
        ("add", None),
        ("old", None),
        ("del", "node-1"),
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["tftp", "173792", IP, "/var/lib/ktizo/pxe/tftp/snponly.efi"],  # size, client address, full path
        ["tftp", "1", IP, "--server=EVIL"],
        ["init"],
        ["arp-add", MAC, IP],
        ["arp-del", MAC, IP],
        ["relay-snoop", "eth1", "fe80::1", "2001:db8:1::/48"],
        ["add", "00:01:00:01:2c:5f:35:9a:52:54:00:ab:cd:ef", "fd00::5"],  # DHCPv6: a DUID, not a MAC
        [],
    ],
)
def test_what_else_dnsmasq_runs_the_hook_with_is_ignored_quietly(
    stubs: Callable[[], Stub], hook: Callable[[str], Path], args: list[str]
) -> None:
    ktizo, evil = stubs(), stubs()
    done = run_hook(hook(ktizo.url), *(a.replace("EVIL", evil.url) for a in args))
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("dhcp-event: ") and "reported" not in done.stderr
    assert ktizo.sent() == [] and evil.received == []


def test_dnsmasqs_lease_events_still_arrive(stubs: Callable[[], Stub], hook: Callable[[str], Path]) -> None:
    ktizo = stubs()
    script = hook(ktizo.url)
    for args in (["add", MAC, IP, "node-1"], ["old", MAC, IP], ["del", MAC, IP, "node-1"]):
        assert run_hook(script, *args).returncode == 0
    assert [body for _, body in ktizo.sent()] == [
        {"action": "add", "mac": MAC, "ip": IP, "hostname": "node-1"},
        {"action": "old", "mac": MAC, "ip": IP, "hostname": None},
        {"action": "del", "mac": MAC, "ip": IP, "hostname": "node-1"},
    ]


def test_parse_event_drops_a_hostname_that_starts_with_a_dash() -> None:
    assert parse_event(["add", MAC, IP, "-node"]).hostname is None
    assert parse_event(["add", MAC, IP, "node-1-"]).hostname == "node-1-"


def test_the_cli_hook_stops_reading_options_at_the_event(stubs: Callable[[], Stub], tmp_path: Path) -> None:
    ktizo, evil = stubs(), stubs()
    pxe = tmp_path / "data" / "pxe"
    pxe.mkdir(parents=True)
    (pxe / "dhcp-token").write_text("from-data-dir\n")
    (tmp_path / "other-token").write_text("not-this-one\n")
    env = {"KTIZO_DATA_DIR": str(tmp_path / "data"), "KTIZO_PUBLIC_URL": ktizo.url}
    runner = CliRunner()
    for hostname in (f"--server={evil.url}", f"--token-file={tmp_path / 'other-token'}", "--help"):
        result = runner.invoke(app, ["pxe", "dhcp-event", "add", MAC, IP, hostname], env=env)
        assert result.exit_code == 0, result.output
        assert "reported add" in result.output and "Usage" not in result.output
    # Options before the event, and after "--", are read as they always were.
    result = runner.invoke(
        app, ["pxe", "dhcp-event", "--server", ktizo.url, "--", "old", MAC, IP, f"--server={evil.url}"], env=env
    )
    assert result.exit_code == 0, result.output
    assert evil.received == []
    assert ktizo.sent() == [
        ("Bearer from-data-dir", {"action": action, "mac": MAC, "ip": IP, "hostname": None})
        for action in ("add", "add", "add", "old")
    ]
