"""The whitelist of addresses allowed to call the agent's listener (``allowed_ips:``, IPs or CIDRs).

Enrollment appends Ktizo's addresses to it; the operator may edit it by hand at any time, and other tools may
append too, so every change is read-modify-write under an exclusive lock on ``NAME.lock``."""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ktizo_agent import config, files
from ktizo_agent.errors import AgentError

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
KEY = "allowed_ips"


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _load(path: Path) -> dict[str, Any]:
    return config.load_mapping(path, "the whitelist", hint="fix the file; nothing was changed", shape=f" with `{KEY}:`")


def _key(entry: Any) -> str:
    """Entries compare as networks, so ``10.0.0.1`` and ``10.0.0.1/32`` are one entry."""
    text = str(entry).strip()
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        return text


def append(path: Path, addresses: Sequence[str]) -> list[str]:
    """Add the addresses not already listed; returns those added. Other keys and entries are kept as they are."""
    if not addresses:
        return []
    files.ensure_dir(path.parent)
    with files.locked(lock_path(path)):
        files.clean_stale_temps(path.parent, [path.name])
        data = _load(path)
        entries = data.get(KEY)
        if entries is None:
            entries = []
        if not isinstance(entries, list):
            raise AgentError(f"`{KEY}` in {path} must be a list", hint="fix the file; nothing was changed")
        present = {_key(e) for e in entries}
        added = []
        for address in addresses:
            if _key(address) not in present:
                present.add(_key(address))
                entries.append(address)
                added.append(address)
        if added:
            data[KEY] = entries
            try:
                mode = os.stat(path).st_mode & 0o777
            except FileNotFoundError:
                mode = 0o644
            files.write_atomic(path, config.dump(data), mode)
            for address in added:
                log.info("whitelist %s: added %s (Ktizo's manager address)", path, address)
        return added


def parse(data: Any) -> list[Network]:
    if data is None:
        return []
    if not isinstance(data, dict) or not isinstance(data.get(KEY, []), list):
        raise ValueError(f"expected a mapping with `{KEY}:` a list")
    networks = []
    for entry in data.get(KEY) or []:
        try:
            networks.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError:
            log.warning("whitelist: ignoring %r, not an IP address or CIDR", entry)
    return networks


class Allowlist:
    """The whitelist as the listener checks it: read again whenever the file changes, and closed (nobody
    allowed) while it is missing or unreadable, since an accident must not open the door."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._loaded = False
        self._networks: list[Network] = []

    def networks(self) -> list[Network]:
        stamp = config.file_stamp(self.path)
        with self._lock:
            if not self._loaded or stamp != self._stamp:
                self._networks = self._read() if stamp is not None else []
                self._stamp, self._loaded = stamp, True
            return self._networks

    def _read(self) -> list[Network]:
        try:
            return parse(yaml.safe_load(self.path.read_text(encoding="utf-8")))
        except (OSError, ValueError, yaml.YAMLError) as exc:
            log.error("whitelist %s is unreadable (%s): refusing every peer until it is fixed", self.path, exc)
            return []

    def allows(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
        return any(ip.version == net.version and ip in net for net in self.networks())
