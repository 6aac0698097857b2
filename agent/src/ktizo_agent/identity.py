"""Who this host says it is: machine-id, hostname and FQDN, addresses, OS. Claims Ktizo shows an operator, not proof."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import platform
import re
import shutil
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ktizo_agent.errors import AgentError

log = logging.getLogger(__name__)

DEFAULT_MACHINE_ID_FILE = Path("/etc/machine-id")
DEFAULT_OS_RELEASE_FILE = Path("/etc/os-release")
_FALLBACK_OS_RELEASE = Path("/usr/lib/os-release")  # os-release(5): read it when /etc/os-release is absent
_MACHINE_ID = re.compile(r"[0-9a-f]{32}")
_LOCAL_NAMES = ("localhost", "localhost.localdomain", "localhost6", "localhost6.localdomain6")


@dataclass(frozen=True)
class Sources:
    """Where identity comes from: files and the flags that override discovery."""

    machine_id_file: Path = DEFAULT_MACHINE_ID_FILE
    os_release_file: Path = DEFAULT_OS_RELEASE_FILE
    hostname: str | None = None
    ip_addresses: Sequence[str] = field(default_factory=tuple)


@dataclass(frozen=True)
class Identity:
    machine_id: str
    hostname: str
    fqdn: str
    ip_addresses: list[str]
    os: dict[str, str | None]

    def as_request(self) -> dict[str, Any]:
        return {"machine_id": self.machine_id, **self.claims()}

    def claims(self) -> dict[str, Any]:
        """What the host says about itself besides the machine-id (a site enrollment sends a machine_uid instead)."""
        return {
            "fqdn": self.fqdn,
            "hostname": self.hostname,
            "ip_addresses": list(self.ip_addresses),
            "os": dict(self.os),
        }


def machine_uid(machine_id: str, ca_fingerprint: str) -> str:
    """``sha256(machine_id + "\\n" + ca_fingerprint)`` as 64 lower-case hex: the host's name in a site enrollment.
    The machine-id (32 lower-case hex) stays on the host, and the same host gets unrelated names with two Ktizos
    (another CA, another fingerprint), so one Ktizo's list cannot be matched against another's."""
    if not _MACHINE_ID.fullmatch(machine_id):
        raise ValueError("a machine-id is 32 lower-case hex digits")
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", ca_fingerprint):
        raise ValueError("the CA fingerprint must be normalised: sha256:<64 lower-case hex>")
    return hashlib.sha256(f"{machine_id}\n{ca_fingerprint}".encode()).hexdigest()


def collect(sources: Sources) -> Identity:
    name = resolve_hostname(sources.hostname)
    return Identity(
        machine_id=read_machine_id(sources.machine_id_file),
        hostname=short_name(name),
        fqdn=resolve_fqdn(name, given=sources.hostname is not None),
        ip_addresses=list(sources.ip_addresses) or discover_ip_addresses(),
        os=read_os(sources.os_release_file),
    )


def read_machine_id(path: Path) -> str:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip().lower()
    except OSError as exc:
        raise AgentError(
            f"cannot read the machine-id from {path}: {exc.strerror}",
            hint="run `systemd-machine-id-setup` (or `dbus-uuidgen --ensure=/etc/machine-id`), or pass "
            "--machine-id-file",
        ) from None
    if not _MACHINE_ID.fullmatch(text):
        raise AgentError(
            f"{path} does not hold a machine-id (32 hex digits)",
            hint="an empty or 'uninitialized' file means first boot is not finished; see machine-id(5)",
        )
    return text


def resolve_hostname(given: str | None) -> str:
    name = (given if given is not None else socket.gethostname()).strip().rstrip(".")
    if not name:
        raise AgentError("this host has no hostname", hint="set one (hostnamectl) or pass --hostname")
    return name


def short_name(name: str) -> str:
    """The host's own label (``hostname -s``): ``web1`` of ``web1.example.com``, whichever of the two was given."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name.split(".", 1)[0]
    return name


def resolve_fqdn(hostname: str, *, given: bool) -> str:
    """``--hostname`` if it is already qualified, else what the resolver says, else the plain hostname."""
    if "." in hostname:
        return hostname
    try:
        candidate = (socket.getfqdn(hostname) if given else socket.getfqdn()).strip().rstrip(".")
    except OSError:
        candidate = ""
    if "." in candidate and candidate.lower() not in _LOCAL_NAMES:
        return candidate
    return hostname


def validate_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


def _reachable(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast)


def discover_ip_addresses() -> list[str]:
    """The host's own addresses others may reach it at: ``ip -j addr`` when iproute2 is there, else the socket
    tricks (the source address a route would use, and what the hostname resolves to)."""
    found = _from_ip_command()
    if found is None:
        found = _from_sockets()
    return list(dict.fromkeys(a for a in found if _reachable(a)))


def _from_ip_command() -> list[str] | None:
    ip = shutil.which("ip")
    if ip is None:
        return None
    try:
        done = subprocess.run(  # noqa: S603 - a fixed argv, no shell, no input from anyone
            [ip, "-j", "addr", "show"], capture_output=True, timeout=5, check=True
        )
        interfaces = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.debug("`ip -j addr` gave nothing usable (%s); using sockets", exc)
        return None
    addresses = []
    for interface in interfaces if isinstance(interfaces, list) else []:
        if not isinstance(interface, dict) or "LOOPBACK" in (interface.get("flags") or []):
            continue
        for info in interface.get("addr_info") or []:
            if (
                isinstance(info, dict)
                and info.get("scope") in ("global", "site")
                and isinstance(info.get("local"), str)
            ):
                addresses.append(info["local"])
    return addresses


def _from_sockets() -> list[str]:
    addresses = []
    # connect() on a UDP socket sends nothing; it only asks the kernel which source address the route would use.
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((probe, 9))
            addresses.append(str(sock.getsockname()[0]))
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP):
            addresses.append(str(info[4][0]))
    return addresses


def read_os(path: Path) -> dict[str, str | None]:
    values = _parse_os_release(path)
    if values is None and path == DEFAULT_OS_RELEASE_FILE:
        values = _parse_os_release(_FALLBACK_OS_RELEASE)
    values = values or {}
    return {"id": values.get("ID"), "version": values.get("VERSION_ID"), "kernel": platform.release() or None}


def _parse_os_release(path: Path) -> dict[str, str] | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, sep, raw = line.strip().partition("=")
        if not sep or key.startswith("#") or not key.isidentifier():
            continue
        values[key] = _unquote(raw.strip())
    return values


def _unquote(raw: str) -> str:
    """os-release values are shell-style: optionally quoted, with backslash escapes inside double quotes."""
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        inner = raw[1:-1]
        return re.sub(r"\\(.)", r"\1", inner) if raw[0] == '"' else inner
    return raw
