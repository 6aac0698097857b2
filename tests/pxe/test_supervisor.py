"""The supervisor with fake children (small Python programs): restart with backoff, output in the log, stop,
and the messages an operator gets when dnsmasq is missing or cannot bind."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ktizo.pxe import supervisor as sup
from ktizo.pxe.supervisor import (
    Backoff,
    Supervisor,
    SupervisorError,
    diagnose_dnsmasq,
    find_dnsmasq,
    hold_lock,
    stop_stale,
)

FAST = Backoff(initial=0.05, maximum=0.2, factor=2.0, reset_after=30.0)


def _child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _run_in_thread(s: Supervisor, stop: threading.Event) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            s.run(stop)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, errors


def _wait_for(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_a_child_that_dies_is_restarted_with_backoff_and_its_output_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Lives long enough to count as started, prints, then dies: a crash in the middle of the night.
    counter = tmp_path / "starts"
    code = (
        "import pathlib, sys, time; p = pathlib.Path(sys.argv[1]); "
        "p.write_text(p.read_text() + 'x') if p.exists() else p.write_text('x'); "
        "print('dnsmasq-dhcp: DHCPOFFER(pxe0) 10.0.0.5', flush=True); time.sleep(0.3); sys.exit(3)"
    )
    s = Supervisor([*_child(code), str(counter)], name="fake", backoff=FAST, startup_grace=0.2)
    stop = threading.Event()
    with caplog.at_level(logging.INFO, logger="ktizo.pxe"):
        thread, errors = _run_in_thread(s, stop)
        _wait_for(lambda: counter.exists() and len(counter.read_text()) >= 3)
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive() and not errors
    assert s.starts >= 3
    messages = [r.getMessage() for r in caplog.records]
    assert "fake: dnsmasq-dhcp: DHCPOFFER(pxe0) 10.0.0.5" in messages
    restarts = [m for m in messages if "exited after" in m]
    assert restarts and "exit code 3" in restarts[0] and "restarting in 0.1 s" in restarts[0]
    assert any("restarting in 0.1 s" in m for m in restarts[1:2]) or any("0.2 s" in m for m in restarts)


def test_stop_terminates_the_child(tmp_path: Path) -> None:
    s = Supervisor(_child("import time; print('up', flush=True); time.sleep(60)"), name="fake", startup_grace=0.1)
    stop = threading.Event()
    thread, errors = _run_in_thread(s, stop)
    _wait_for(s.running.is_set)
    pid = s.pid
    assert pid is not None
    stop.set()
    thread.join(timeout=30)  # gives up, measures nothing: the child sleeps for 60 s unless it is stopped
    assert not thread.is_alive() and not errors
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]


def test_a_child_that_ignores_sigterm_is_killed() -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    s = Supervisor(_child(code), name="stubborn", startup_grace=0.1, stop_timeout=0.5)
    stop = threading.Event()
    thread, _ = _run_in_thread(s, stop)
    _wait_for(s.running.is_set)
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_a_first_start_that_fails_is_reported_not_retried() -> None:
    code = (
        "import sys; print('dnsmasq: failed to create listening socket for port 67: Address already in use', "
        "file=sys.stderr); sys.exit(2)"
    )
    s = Supervisor(_child(code), name="dnsmasq", diagnose=diagnose_dnsmasq, startup_grace=5, backoff=FAST)
    with pytest.raises(SupervisorError, match=r"port 67 \(DHCP\) is in use: another DHCP server") as caught:
        s.run(threading.Event())
    assert s.starts == 1
    assert "dnsmasq said: dnsmasq: failed to create listening socket" in str(caught.value)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("dnsmasq: failed to create listening socket for port 67: Permission denied", "CAP_NET_BIND_SERVICE"),
        ("dnsmasq: process is missing required capability NET_ADMIN", "CAP_NET_ADMIN"),
        ("dnsmasq: setting capabilities failed: Operation not permitted", "needs root"),
        ("dnsmasq: failed to bind DHCP server socket: Address already in use", "port 67 (DHCP) is in use"),
        ("dnsmasq: failed to create listening socket for port 69: Address already in use", "port 69 (TFTP) is in use"),
        ("dnsmasq: failed to create listening socket for 10.9.0.1: Address already in use", "69 (TFTP) on 10.9.0.1"),
        ("dnsmasq: failed to bind DHCP server socket: Permission denied", "CAP_NET_BIND_SERVICE"),
        ("dnsmasq: unknown interface pxe9", "there is no network interface pxe9"),
        ("dnsmasq: TFTP directory /root/x inaccessible: Permission denied", "cannot read the TFTP root"),
        ("dnsmasq: bad option at line 3 of /x.conf", "refused its configuration"),
    ],
)
def test_dnsmasq_failures_are_explained(output: str, expected: str) -> None:
    message = diagnose_dnsmasq(1 if "bad" in output else 2, [output])
    assert message is not None and expected in message


def test_missing_dnsmasq_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(sup, "DNSMASQ_PATHS", ("/nonexistent/dnsmasq",))
    with pytest.raises(sup.DnsmasqMissing, match="install Debian's dnsmasq-base"):
        find_dnsmasq()


def test_one_pxe_run_per_data_directory(tmp_path: Path) -> None:
    fd = hold_lock(tmp_path / "pxe.lock")
    try:
        with pytest.raises(SupervisorError, match=rf"another `ktizo pxe run` \(pid {os.getpid()}\) is running"):
            hold_lock(tmp_path / "pxe.lock")
    finally:
        os.close(fd)
    os.close(hold_lock(tmp_path / "pxe.lock"))  # free again once the holder is gone


def test_a_leftover_dnsmasq_from_a_killed_ktizo_is_stopped(tmp_path: Path) -> None:
    conf = tmp_path / "dnsmasq.conf"
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"--conf-file={conf}"])
    try:
        pid_file = tmp_path / "dnsmasq.pid"
        pid_file.write_text(f"{leftover.pid}\n")
        _wait_for(lambda: b"--conf-file" in Path(f"/proc/{leftover.pid}/cmdline").read_bytes())  # exec'd
        assert stop_stale(pid_file, "some-other.conf") is None  # a reused pid: not ours, left alone
        assert leftover.poll() is None
        assert stop_stale(pid_file, str(conf)) == leftover.pid
        assert leftover.wait(timeout=5) != 0
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()
    assert stop_stale(tmp_path / "missing.pid", str(conf)) is None


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/sbin/dnsmasq").exists(), reason="needs root and dnsmasq")
def test_real_dnsmasq_on_a_missing_interface_fails_fast_with_a_clear_message(tmp_path: Path) -> None:
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text(
        "port=0\ninterface=ktizo-nope0\nbind-interfaces\nlog-facility=-\npid-file=\ndhcp-range=10.9.9.0,proxy\n"
    )
    s = Supervisor(sup.dnsmasq_argv(find_dnsmasq(), conf), name="dnsmasq", diagnose=diagnose_dnsmasq, startup_grace=3)
    with pytest.raises(SupervisorError, match="there is no network interface ktizo-nope0"):
        s.run(threading.Event())
