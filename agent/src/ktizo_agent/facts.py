"""Hardware facts from /proc and /sys: what ``GET /v1/facts`` answers and each check-in carries.

Every reader tolerates a missing or odd file by reporting null: facts are for people, and a container or an
unusual kernel must not stop the agent from serving them."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ktizo_agent.identity import Identity
from ktizo_agent.pki import iso

_SKIP_DISKS = ("loop", "ram", "zram")
# Drivers report an unknown speed as -1, or as that -1 read back unsigned (4294967295).
_UNKNOWN_SPEED = 2**31 - 1
_CPU_MODEL_KEYS = ("model name", "Model", "cpu model", "Processor", "cpu")


@dataclass(frozen=True)
class Roots:
    proc: Path = Path("/proc")
    sys: Path = Path("/sys")


def collect(identity: Identity, roots: Roots, now: dt.datetime | None = None) -> dict[str, Any]:
    return {
        "machine_id": identity.machine_id,
        "hostname": identity.hostname,
        "fqdn": identity.fqdn,
        "os": dict(identity.os),
        "cpu": cpu(roots.proc),
        "memory": memory(roots.proc),
        "disks": disks(roots.sys),
        "nics": nics(roots.sys),
        "ip_addresses": list(identity.ip_addresses),
        "collected_at": iso(now or dt.datetime.now(dt.UTC)),
    }


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:  # missing, or a sysfs attribute the driver refuses (speed of a down link: EINVAL)
        return None


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def _entries(directory: Path) -> list[str] | None:
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return None


def cpu(proc: Path) -> dict[str, Any]:
    text = _read(proc / "cpuinfo")
    if text is None:
        return {"model": None, "logical_cpus": None}
    model = None
    count = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "processor":
            count += 1
        elif model is None and key in _CPU_MODEL_KEYS and value:
            model = value
    return {"model": model, "logical_cpus": count or None}


def memory(proc: Path) -> dict[str, Any]:
    for line in (_read(proc / "meminfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "MemTotal":
            kib = _int(value)
            return {"total_bytes": kib * 1024 if kib is not None else None}
    return {"total_bytes": None}


def disks(sys: Path) -> list[dict[str, Any]] | None:
    names = _entries(sys / "block")
    if names is None:
        return None
    found = []
    for name in names:
        if name.startswith(_SKIP_DISKS):
            continue
        base = sys / "block" / name
        sectors = _int(_read(base / "size"))
        rotational = _read(base / "queue" / "rotational")
        found.append(
            {
                "name": name,
                "size_bytes": sectors * 512 if sectors is not None else None,  # sysfs counts 512-byte sectors
                "rotational": {"1": True, "0": False}.get(rotational or ""),
                "model": _read(base / "device" / "model") or None,
            }
        )
    return found


def nics(sys: Path) -> list[dict[str, Any]] | None:
    names = _entries(sys / "class" / "net")
    if names is None:
        return None
    found = []
    for name in names:
        if name == "lo":
            continue
        base = sys / "class" / "net" / name
        speed = _int(_read(base / "speed"))
        found.append(
            {
                "name": name,
                "mac": _read(base / "address") or None,
                "mtu": _int(_read(base / "mtu")),
                "operstate": _read(base / "operstate") or None,
                "speed_mbps": speed if speed is not None and 0 <= speed < _UNKNOWN_SPEED else None,
            }
        )
    return found
