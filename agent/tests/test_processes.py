"""The agent as a real process (``python -m ktizo_agent``): signals while polling and serving, the seed's
``--enroll`` spelling, help and usage errors."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from conftest import Host, StderrReader, agent_cli, enroll_args, run
from fake_manager import FakeManager


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_polling_ends_cleanly(manager: FakeManager, host: Host, sig: int, code: int) -> None:
    proc = agent_cli(*enroll_args(manager, host))
    manager.wait_for(lambda: manager.status_polls >= 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ktizo-agent: stopped by " + signal.Signals(sig).name)
    # Stopped, not broken: the token is saved, so the next run resumes.
    assert host.read_config()["enrollment"]["polling_token"]


def test_the_seed_spelling_enrolls_then_serves_until_sigterm(manager: FakeManager, host: Host) -> None:
    manager.approve_after = 2
    proc = agent_cli(
        "--enroll", manager.url, "--ca-fingerprint", manager.ca.fingerprint, "--listen", "127.0.0.1:0", *host.args
    )
    reader = StderrReader(proc)
    line = reader.wait_for("listening on")
    assert line.strip().startswith("ktizo-agent: listening on 127.0.0.1:")
    assert (host.cert_dir / "server.pem").exists()
    manager.wait_for(lambda: bool(manager.checkins))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert "Traceback" not in reader.rest()


def test_serve_exits_130_on_sigint(manager: FakeManager, host: Host) -> None:
    manager.approve_after = 1
    assert (
        subprocess.run([sys.executable, "-m", "ktizo_agent", *enroll_args(manager, host)], check=False).returncode == 0
    )
    proc = agent_cli("serve", "--listen", "127.0.0.1:0", *host.args)
    reader = StderrReader(proc)
    reader.wait_for("listening on")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 130
    assert "Traceback" not in reader.rest()


def test_help_reads_well(capsys: pytest.CaptureFixture[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "ktizo_agent", "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0
    for word in (
        "enroll",
        "serve",
        "renew",
        "status",
        "facts",
        "--enroll",
        "--ca-fingerprint",
        "ktizo pki fingerprint",
    ):
        assert word in done.stdout
    for command in ("enroll", "serve", "renew", "checkin", "status", "facts"):
        assert run(command, "--help") == 0
        assert "--config" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["enroll"],
        ["--enroll", "http://x", "--insecure", "serve"],
        ["enroll", "ftp://ktizo", "--insecure"],
        ["enroll", "http://ktizo", "--insecure", "--max-attempts", "-1"],
        ["enroll", "http://ktizo", "--insecure", "--ip-address", "not-an-ip"],
        ["serve", "--listen", "nonsense"],
        ["bogus"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(*argv, *host.args) == 2
    assert "error" in capsys.readouterr().err
