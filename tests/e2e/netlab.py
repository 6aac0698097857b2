"""A small network lab for end-to-end network boot: namespaces, veth pairs, a bridge, real processes.

Topology (all names unique per test run, nothing in the host's own namespace):

    server netns  ── br0 10.213.0.1/24 + fd99::1/64 ── ktizo serve, ktizo pxe run (dnsmasq)
                      │ vN (one veth per client)
    client netns  ── c0 (udhcpc)   or   c0 + tap0 in bridge cbr0 (a QEMU VM)

Every process is started through ``Lab.start`` and stopped by its pid in ``Lab.close``; namespaces are deleted
there too, so a failing test leaves nothing behind."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

SERVER_IP = "10.213.0.1"
PORT = 8080
BASE = f"http://{SERVER_IP}:{PORT}"
_counter = itertools.count(1)

OVMF = next((p for p in (Path("/usr/share/ovmf/OVMF.fd"), Path("/usr/share/qemu/OVMF.fd")) if p.exists()), None)
TOOLS = ("ip", "busybox", "dnsmasq", "qemu-system-x86_64")


def missing_prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [t for t in TOOLS if not (shutil.which(t) or Path(f"/usr/sbin/{t}").exists())]
    if missing:
        return f"missing {', '.join(missing)} (scripts/test installs them)"
    return None


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=timeout)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll until ``predicate`` returns something truthy; fail the test (not hang it) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class HttpAnswer:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


# Run inside a namespace: one HTTP request with urllib, the answer as JSON on stdout.
_HTTP = r"""
import json, sys, urllib.request, urllib.error
method, url, headers, body, timeout = json.loads(sys.argv[1])
req = urllib.request.Request(url, data=body.encode() if body is not None else None, headers=headers, method=method)
try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
        out = (r.status, dict(r.headers), r.read().decode(errors="replace"))
except urllib.error.HTTPError as e:
    out = (e.code, dict(e.headers), e.read().decode(errors="replace"))
except OSError as e:
    out = (0, {}, repr(e))
print(json.dumps(out))
"""


@dataclass
class Netns:
    name: str

    def argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return sh(*self.argv(*args), check=check, timeout=timeout)

    def http(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        json_body: Any = None,
        form: dict[str, str] | None = None,
        timeout: float = 15,
    ) -> HttpAnswer:
        hdrs = dict(headers or {})
        body = None
        if json_body is not None:
            body = json.dumps(json_body)
            hdrs["Content-Type"] = "application/json"
        elif form is not None:
            body = urlencode(form)
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        arg = json.dumps([method, url, hdrs, body, timeout])
        done = self.run(sys.executable, "-c", _HTTP, arg, timeout=timeout + 10)
        status, got_headers, text = json.loads(done.stdout)
        return HttpAnswer(status, {k.lower(): v for k, v in got_headers.items()}, text)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class Lab:
    """The server side: namespace, bridge, data directory; clients are added with ``client()``."""

    prefix: str
    workdir: Path
    server: Netns
    namespaces: list[Netns] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    n_clients: int = 0

    @classmethod
    def create(cls) -> Lab:
        prefix = f"ktz{os.getpid()}x{next(_counter)}"
        # Not pytest's tmp_path: it sits below a 0700 directory, and dnsmasq reads TFTP files as "nobody".
        workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))
        workdir.chmod(0o755)
        lab = cls(prefix, workdir, Netns(f"{prefix}-srv"))
        try:
            lab._add_ns(lab.server)
            srv = lab.server
            sh("ip", "-n", srv.name, "link", "add", "br0", "type", "bridge")
            # No duplicate address detection: the link-local address dnsmasq advertises from must be usable at once.
            srv.run("sysctl", "-qw", "net.ipv6.conf.br0.accept_dad=0")
            sh("ip", "-n", srv.name, "addr", "add", f"{SERVER_IP}/24", "dev", "br0")
            sh("ip", "-n", srv.name, "-6", "addr", "add", "fd99::1/64", "dev", "br0", "nodad")
            sh("ip", "-n", srv.name, "link", "set", "br0", "up")
        except BaseException:
            lab.close()
            raise
        return lab

    def _add_ns(self, ns: Netns) -> None:
        sh("ip", "netns", "add", ns.name)
        self.namespaces.append(ns)
        sh("ip", "-n", ns.name, "link", "set", "lo", "up")

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KTIZO_")}
        env.update(
            KTIZO_DATA_DIR=str(self.data_dir),
            KTIZO_PUBLIC_URL=BASE,
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        out = log.open("wb")
        popen = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        out.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 10) -> None:
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=10)

    def namespace(self, suffix: str) -> Netns:
        """One more namespace, deleted with the lab."""
        ns = Netns(f"{self.prefix}-{suffix}")
        self._add_ns(ns)
        return ns

    def client(self, mac: str | None = None) -> Client:
        """A new client namespace wired into br0 through its own veth pair."""
        self.n_clients += 1
        ns = Netns(f"{self.prefix}-c{self.n_clients}")
        self._add_ns(ns)
        port = f"v{self.n_clients}"
        sh("ip", "link", "add", port, "netns", self.server.name, "type", "veth", "peer", "name", "c0", "netns", ns.name)
        sh("ip", "-n", self.server.name, "link", "set", port, "master", "br0", "up")
        mac = mac or random_mac()
        sh("ip", "-n", ns.name, "link", "set", "c0", "address", mac, "up")
        return Client(self, ns, mac)

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):  # cleanup goes on whatever happens to one process
                self.stop(proc, timeout=5)
        for ns in reversed(self.namespaces):
            # Anything still running in the namespace was started by this lab (a VM's helper, say).
            pids = sh("ip", "netns", "pids", ns.name, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns.name, check=False)
        if os.environ.get("KTIZO_E2E_KEEP"):
            sys.stderr.write(f"\nkept the lab's logs in {self.workdir}\n")  # for debugging a failure
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def random_mac() -> str:
    # Locally administered, unicast, and recognisable in logs (52:54:00 is QEMU's own prefix).
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


@dataclass
class Client:
    lab: Lab
    ns: Netns
    mac: str

    def dhcp(self, *, vendor: str | None = None, options: Sequence[str] = (), timeout: float = 15) -> dict[str, str]:
        """Run busybox udhcpc once; return the environment its script saw on "bound" (the ACK's fields)."""
        out = self.lab.workdir / f"udhcpc-{self.ns.name}"
        script = self.lab.workdir / "udhcpc.sh"
        if not script.exists():
            script.write_text(
                "#!/bin/sh\n"
                'env > "$UDHCPC_OUT.$1"\n'
                'if [ "$1" = bound ]; then ip addr flush dev "$interface"; '
                'ip addr add "$ip/$subnet" dev "$interface"; fi\n'
            )
            script.chmod(0o755)
        argv = ["busybox", "udhcpc", "-i", "c0", "-f", "-q", "-n", "-t", "5", "-T", "1", "-s", str(script)]
        argv += ["-O", "bootfile", "-O", "tftp"]
        if vendor:
            argv += ["-V", vendor]
        for option in options:
            argv += ["-x", option]
        env = {**os.environ, "UDHCPC_OUT": str(out)}
        done = subprocess.run(self.ns.argv(*argv), capture_output=True, text=True, env=env, timeout=timeout)
        bound = Path(f"{out}.bound")
        assert bound.exists(), f"no lease: {done.stdout}{done.stderr}"
        values = dict(line.split("=", 1) for line in bound.read_text().splitlines() if "=" in line)
        bound.unlink()
        return values

    def vm_port(self) -> str:
        """Turn the client namespace into a VM's uplink: c0 and a tap device in one bridge; returns the tap."""
        ns = self.ns.name
        sh("ip", "-n", ns, "link", "add", "cbr0", "type", "bridge")
        sh("ip", "-n", ns, "link", "set", "c0", "master", "cbr0")
        sh("ip", "-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap")
        sh("ip", "-n", ns, "link", "set", "tap0", "master", "cbr0", "up")
        sh("ip", "-n", ns, "link", "set", "cbr0", "up")
        return "tap0"


def qemu_argv(firmware: str, tap: str, mac: str, serial_log: Path) -> list[str]:
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-display", "none", "-monitor", "none", "-no-reboot"]
    argv += ["-serial", f"file:{serial_log}", "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no"]
    if firmware == "bios":
        # SeaBIOS + the iPXE ROM of ipxe-qemu; reboot-timeout=0: do not wait after the last boot device.
        argv += ["-machine", "pc,graphics=off", "-m", "256", "-boot", "order=n,reboot-timeout=0"]
        argv += ["-device", f"virtio-net-pci,netdev=n0,mac={mac}"]
    else:
        # OVMF with no option ROM: the firmware's own PXE does DHCP and TFTP (snponly.efi), then iPXE takes over.
        assert OVMF is not None
        argv += ["-machine", "q35,graphics=off", "-m", "512", "-bios", str(OVMF), "-boot", "order=n"]
        argv += ["-device", f"virtio-net-pci,netdev=n0,mac={mac},romfile="]
    return argv


def talos_form(url: str) -> str:
    """The config URL as Talos sends it: query re-encoded by Go's url.Values.Encode (sorted, escaped)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}?{urlencode(sorted(parse_qsl(parts.query)))}"


def log_lines(proc: Proc, pattern: str) -> list[str]:
    return [line for line in proc.output().splitlines() if re.search(pattern, line)]
