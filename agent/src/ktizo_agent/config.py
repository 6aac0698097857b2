"""Where the agent keeps its state: the YAML config (``enrollment:`` while waiting, ``manager:`` once enrolled)
and the certificate directory. Keys the agent does not own are kept as they are."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ktizo_agent import files
from ktizo_agent.errors import AgentError

DEFAULT_CONFIG = Path("/etc/ktizo-agent/config.yaml")
DEFAULT_CERT_DIR = Path("/etc/ktizo-agent/certs")
DEFAULT_WHITELIST = Path("/etc/ktizo-agent/whitelist.yaml")
DEFAULT_POLL_INTERVAL = 60.0

CA_FILE = "ca.pem"
CERT_FILE = "server.pem"
KEY_FILE = "server.key.pem"
PENDING_KEY_FILE = "server.key.pem.pending"
STASH_FILE = "bundle.json.pending"
AGENT_API_KEY_FILE = "agent-api-key"  # the cak_ key a site enrollment gives, sent as a Bearer token over mTLS


@dataclass(frozen=True)
class Paths:
    config: Path = DEFAULT_CONFIG
    cert_dir: Path = DEFAULT_CERT_DIR
    whitelist: Path = DEFAULT_WHITELIST

    @property
    def ca(self) -> Path:
        return self.cert_dir / CA_FILE

    @property
    def server_cert(self) -> Path:
        return self.cert_dir / CERT_FILE

    @property
    def server_key(self) -> Path:
        return self.cert_dir / KEY_FILE

    @property
    def pending_key(self) -> Path:
        return self.cert_dir / PENDING_KEY_FILE

    @property
    def stash(self) -> Path:
        return self.cert_dir / STASH_FILE

    @property
    def agent_api_key(self) -> Path:
        return self.cert_dir / AGENT_API_KEY_FILE

    @property
    def cert_lock(self) -> Path:
        return self.cert_dir / ".lock"

    @property
    def cert_names(self) -> tuple[str, ...]:
        return (CA_FILE, CERT_FILE, KEY_FILE, PENDING_KEY_FILE, AGENT_API_KEY_FILE)


def load(path: Path) -> dict[str, Any]:
    """The config as a mapping; a missing file is an empty one."""
    return load_mapping(path, "the config", hint="fix or remove the file")


def load_mapping(path: Path, what: str, *, hint: str, shape: str = "") -> dict[str, Any]:
    """A YAML file that holds a mapping (the config, the whitelist); a missing or empty file is an empty one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise AgentError(f"cannot read {what} {path}: {exc.strerror}", hint=hint) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise AgentError(f"{what} {path} is not valid YAML: {exc}", hint=hint) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AgentError(f"{what} {path} must be a YAML mapping{shape}", hint=hint)
    return data


def section(data: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    """``data[name]`` as a mapping (empty when absent); refuses anything else rather than overwrite it."""
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AgentError(f"`{name}` in {path} must be a mapping", hint=f"fix or remove the `{name}` key")
    return value


def dump(data: dict[str, Any]) -> bytes:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True).encode()


def update(path: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Read, change and write the config back under its lock (``NAME.lock``), atomically, mode 0600: it holds the
    polling token, a credential until the bundle is picked up."""
    files.ensure_dir(path.parent)
    with files.locked(path.with_name(path.name + ".lock")):
        files.clean_stale_temps(path.parent, [path.name])
        data = load(path)
        change(data)
        files.write_atomic(path, dump(data), 0o600)
        return data


@dataclass(frozen=True)
class Enrollment:
    """The ``enrollment:`` section as the agent reads it."""

    manager_url: str | None
    polling_token: str | None
    polling_interval_seconds: float
    max_poll_attempts: int
    ca_fingerprint: str | None
    site: str | None  # while a site enrollment waits for approval

    @classmethod
    def read(cls, data: dict[str, Any], path: Path) -> Enrollment:
        raw = section(data, "enrollment", path)
        return cls(
            manager_url=_text(raw.get("manager_url")),
            polling_token=_text(raw.get("polling_token")),
            polling_interval_seconds=_number(raw.get("polling_interval_seconds"), DEFAULT_POLL_INTERVAL, path),
            max_poll_attempts=int(_number(raw.get("max_poll_attempts"), 0, path)),
            ca_fingerprint=_text(raw.get("ca_fingerprint")),
            site=_text(raw.get("site")),
        )


def _text(value: Any) -> str | None:
    return value.strip() or None if isinstance(value, str) else None


def _number(value: Any, default: float, path: Path) -> float:
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise AgentError(f"enrollment numbers in {path} must be zero or positive, not {value!r}")
    return float(value)


def same_url(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.rstrip("/") == b.rstrip("/")


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten (atomic replaces give a new inode even within one mtime tick)."""
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)
    return None
