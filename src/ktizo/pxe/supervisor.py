"""dnsmasq as a supervised child: started, watched, its output in Ktizo's log, restarted with backoff, stopped.

A machine that PXE-boots while dnsmasq is down simply retries, so the supervisor's job is to bring it back
without spinning, and to say in plain words why it would not start (missing package, capabilities, a port
that another DHCP or TFTP server holds)."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ktizo.pxe")

Diagnose = Callable[[int, Sequence[str]], str | None]


class SupervisorError(RuntimeError):
    """The child could not be started at all; the message says what to do."""


@dataclass(frozen=True)
class Backoff:
    initial: float = 1.0
    maximum: float = 60.0
    factor: float = 2.0
    # A child that stayed up this long was healthy: its next failure is treated as a first one again.
    reset_after: float = 60.0

    def next(self, delay: float) -> float:
        return min(delay * self.factor, self.maximum)


class Supervisor:
    """Run ``argv`` until ``stop`` is set, restarting it with exponential backoff whenever it exits.

    If the very first start exits with an error code within ``startup_grace`` seconds, ``run`` raises
    ``SupervisorError`` instead of retrying: a wrong setting is better reported at once than retried forever
    behind the operator's back."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        logger: logging.Logger = log,
        backoff: Backoff | None = None,
        startup_grace: float = 1.0,
        stop_timeout: float = 5.0,
        diagnose: Diagnose | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.name = name
        self.log = logger
        self.backoff = backoff or Backoff()
        self.startup_grace = startup_grace
        self.stop_timeout = stop_timeout
        self.diagnose = diagnose
        self.env = env
        self.starts = 0
        self.pid: int | None = None
        self.running = threading.Event()  # set while a child has been up past its startup grace

    def run(self, stop: threading.Event) -> None:
        delay = self.backoff.initial
        healthy_once = False
        while not stop.is_set():
            started = time.monotonic()
            tail: deque[str] = deque(maxlen=20)
            proc = self._spawn()
            reader = threading.Thread(target=self._pump, args=(proc, tail), name=f"{self.name}-log", daemon=True)
            reader.start()
            rc = self._watch(proc, stop, started)
            reader.join(timeout=2)
            if not reader.is_alive() and proc.stdout is not None:
                proc.stdout.close()  # one pipe per restart would otherwise leak
            self.running.clear()
            self.pid = None
            if rc is None:  # we stopped it
                return
            uptime = time.monotonic() - started
            reason = (self.diagnose(rc, list(tail)) if self.diagnose else None) or _last_words(rc, tail)
            # An exit code (dnsmasq: 1 config, 2 network, 3 file system…) in the first moments is a setting to fix;
            # a signal is something that happened to it, and worth a restart.
            if not healthy_once and uptime < self.startup_grace and rc > 0:
                raise SupervisorError(f"{self.name} did not start: {reason}")
            healthy_once = True
            if uptime >= self.backoff.reset_after:
                delay = self.backoff.initial
            self.log.warning("%s exited after %.1f s: %s; restarting in %.1f s", self.name, uptime, reason, delay)
            if stop.wait(delay):
                return
            delay = self.backoff.next(delay)

    def _spawn(self) -> subprocess.Popen[str]:
        self.starts += 1
        proc = subprocess.Popen(  # noqa: S603 - argv is built by Ktizo, never by a shell
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=self.env,
            # Its own process group: a Ctrl-C in the terminal reaches Ktizo, which then stops the child in order.
            start_new_session=True,
        )
        self.pid = proc.pid
        self.log.info("started %s (pid %d)", self.name, proc.pid)
        return proc

    def _pump(self, proc: subprocess.Popen[str], tail: deque[str]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if line:
                tail.append(line)
                self.log.info("%s: %s", self.name, line)

    def _watch(self, proc: subprocess.Popen[str], stop: threading.Event, started: float) -> int | None:
        """Wait until the child exits (its code) or ``stop`` is set (None, after stopping the child)."""
        while True:
            rc = proc.poll()
            if rc is not None:
                return rc
            if not self.running.is_set() and time.monotonic() - started >= self.startup_grace:
                self.running.set()
                self.log.info("%s is running (pid %d)", self.name, proc.pid)
            if stop.wait(0.1):
                self.terminate(proc)
                return None

    def terminate(self, proc: subprocess.Popen[str]) -> None:
        if proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.log.warning("%s did not stop within %.0f s; killing it", self.name, self.stop_timeout)
            proc.kill()
            proc.wait()
        self.log.info("stopped %s", self.name)


def _last_words(rc: int, tail: deque[str]) -> str:
    how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
    return f"{how}; last output: {tail[-1]}" if tail else how


# --- dnsmasq specifics ------------------------------------------------------------------------------------------

DNSMASQ_PATHS = ("/usr/sbin/dnsmasq", "/sbin/dnsmasq", "/usr/local/sbin/dnsmasq")

_CAPS = (
    "dnsmasq needs root, or the capabilities CAP_NET_ADMIN, CAP_NET_BIND_SERVICE and CAP_NET_RAW "
    "(e.g. systemd AmbientCapabilities=, or `setcap cap_net_admin,cap_net_bind_service,cap_net_raw+ep` on dnsmasq)"
)


class DnsmasqMissing(SupervisorError):
    pass


def find_dnsmasq() -> str:
    found = shutil.which("dnsmasq") or next((p for p in DNSMASQ_PATHS if os.access(p, os.X_OK)), None)
    if found is None:
        raise DnsmasqMissing(
            "dnsmasq is not installed: install Debian's dnsmasq-base (apt-get install dnsmasq-base); "
            "the dnsmasq package works too but also starts a system-wide DNS service"
        )
    return found


def diagnose_dnsmasq(rc: int, lines: Sequence[str]) -> str | None:
    """Turn dnsmasq's last words into what the operator should do about them."""
    text = "\n".join(lines)
    last = lines[-1] if lines else ""
    if re.search(r"missing required capability|Operation not permitted|setting capabilities failed", text):
        return f"{_CAPS}. dnsmasq said: {last}"
    if m := re.search(r"(?:listening socket for|bind) .*?port (\d+)|port (\d+).*Address already in use", text):
        port = m.group(1) or m.group(2)
        if "Permission denied" in text:
            return f"not allowed to bind port {port}: {_CAPS}. dnsmasq said: {last}"
        if "in use" in text:
            what = {"67": "DHCP", "69": "TFTP"}.get(port or "", "UDP")
            return (
                f"port {port} ({what}) is in use: another {what} server (or another dnsmasq) runs on this host; "
                f"stop it, or use proxy mode next to it. dnsmasq said: {last}"
            )
    if m := re.search(r"listening socket for ([0-9a-fA-F.:]+): Address already in use", text):
        # DNS is off (port=0), so the sockets dnsmasq opens per address are TFTP's.
        return (
            f"port 69 (TFTP) on {m.group(1)} is in use: another TFTP server runs on this host; stop it. "
            f"dnsmasq said: {last}"
        )
    if "failed to bind DHCP server socket" in text:
        if "in use" in text:
            return (
                "port 67 (DHCP) is in use: another DHCP server (or another dnsmasq) runs on this host; stop it, "
                f"or run Ktizo's dnsmasq in proxy mode on a host without one. dnsmasq said: {last}"
            )
        return f"{_CAPS}. dnsmasq said: {last}"
    if "Permission denied" in text and re.search(r"socket|bind", text):
        return f"{_CAPS}. dnsmasq said: {last}"
    if m := re.search(r"unknown interface (\S+)", text):
        return f"there is no network interface {m.group(1)}. dnsmasq said: {last}"
    if "TFTP directory" in text and "inaccessible" in text:
        return f"dnsmasq's unprivileged user cannot read the TFTP root. dnsmasq said: {last}"
    if rc == 1 and "bad" in text:
        return f"dnsmasq refused its configuration: {last}"
    return None


def dnsmasq_argv(binary: str, conf_file: Path) -> list[str]:
    # -k: stay in the foreground so Ktizo is its parent and sees it die; --conf-file: ours, not /etc/dnsmasq.conf.
    return [binary, "--keep-in-foreground", f"--conf-file={conf_file}"]


class AlreadyRunning(SupervisorError):
    pass


def hold_lock(path: Path) -> int:
    """Take an exclusive lock for the life of this process (the kernel drops it however the process ends), so
    that two ``ktizo pxe run`` on one data directory never fight over one dnsmasq. Returns the open descriptor."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyRunning(f"another `ktizo pxe run` (pid {holder}) is running for this data directory") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def stop_stale(pid_file: Path, marker: str, timeout: float = 5.0) -> int | None:
    """Stop a dnsmasq left running by an earlier Ktizo that was killed hard (its pid file names it and its
    command line mentions ``marker``, our config path). Returns the pid it stopped, if any."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError):
        return None
    if marker not in cmdline:
        return None  # the pid was reused by an unrelated process
    log.warning("stopping dnsmasq (pid %d) left over from an earlier `ktizo pxe run`", pid)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    return pid


def _alive(pid: int) -> bool:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A zombie has exited; only its parent's wait() is missing, and that parent is not us.
    return stat_line.rsplit(")", 1)[-1].split()[0] != "Z"
