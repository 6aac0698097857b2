"""Putting a checked bundle in place: certificate files, then the config, then the whitelist.

Ktizo hands an enrollment bundle out once, so before any of that the bundle is stashed (``bundle.json.pending``,
0600, beside the pending key). A crash or a full disk part-way leaves the stash, and the next run of any command
finishes the install from it instead of asking Ktizo for a bundle it will not give again.

A site enrollment's bundle also carries the agent's ``cak_`` API key: it is stashed with the rest, and installed
beside the certificate as ``agent-api-key`` (0600, the previous one kept as ``.prev``). Ktizo checks it on every
mTLS call of an agent that has one and revokes the old one when it mints a new one, so the agent must always
hold exactly the latest: a new enrollment that brings none retires the old one (to ``.prev``)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from ktizo_agent import config, files, pki, whitelist
from ktizo_agent.config import Paths
from ktizo_agent.errors import AgentError
from ktizo_agent.redact import Secret

log = logging.getLogger(__name__)

CERT_MODE = 0o644
KEY_MODE = 0o600
STASH_VERSION = 1  # later fields (agent_api_key, site, agent_id, enrollment) are optional: old stashes still read
_API_KEY = re.compile(r"cak_[0-9]+_[A-Za-z0-9_\-]+")
MAX_API_KEY_LENGTH = 512


@dataclass(frozen=True)
class Installed:
    cert: x509.Certificate
    manager_url: str
    mtls_url: str | None
    added_addresses: list[str]


@dataclass(frozen=True)
class Credentials:
    """What comes with a bundle besides the certificate. ``enrollment``: the bundle ends an enrollment, so it
    replaces the whole set (a key it does not bring is retired, the site is what it says); a renewal (False)
    replaces only what it brings."""

    agent_api_key: Secret | None = None
    site: str | None = None
    agent_id: int | None = None
    enrollment: bool = False


def parse_api_key(value: Any) -> Secret:
    """The ``cak_<id>_<secret>`` Ktizo sent, or ValueError (which never quotes it)."""
    if not isinstance(value, str) or len(value) > MAX_API_KEY_LENGTH or not _API_KEY.fullmatch(value):
        raise ValueError("agent_api_key is not a cak_<id>_<secret> key")
    return Secret(value)


def held_api_key(paths: Paths) -> Secret | None:
    """The agent's ``cak_`` key from ``agent-api-key``, or None when it holds none (or the file is unusable)."""
    try:
        text = paths.agent_api_key.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read %s (%s): going on without the agent API key", paths.agent_api_key, exc.strerror)
        return None
    try:
        return parse_api_key(text.strip())
    except ValueError:
        log.warning("%s does not hold a cak_ key: going on without it", paths.agent_api_key)
        return None


def install(
    paths: Paths,
    bundle: pki.Bundle,
    *,
    manager_url: str,
    ca_fingerprint: str,
    key_pem: bytes,
    credentials: Credentials | None = None,
) -> Installed:
    """Install ``bundle`` whose key is ``key_pem`` (also on disk as the pending key)."""
    extra = credentials or Credentials()
    files.ensure_dir(paths.cert_dir)
    with files.locked(paths.cert_lock):
        files.clean_stale_temps(paths.cert_dir, paths.cert_names)
        stash: dict[str, Any] = {
            "version": STASH_VERSION,
            "manager_url": manager_url,
            "ca_fingerprint": ca_fingerprint,
            "bundle": bundle.raw,
            "agent_api_key": extra.agent_api_key.reveal() if extra.agent_api_key else None,
            "site": extra.site,
            "agent_id": extra.agent_id,
            "enrollment": extra.enrollment,
        }
        files.remove(paths.stash)
        try:
            files.write_new(paths.stash, json.dumps(stash).encode(), KEY_MODE)
        except OSError as exc:
            log.error("could not stash the bundle in %s (%s); installing it straight away", paths.stash, exc)
        return _finish(paths, bundle, manager_url, ca_fingerprint, key_pem, extra)


def _stashed_credentials(stash: dict[str, Any]) -> Credentials:
    key, site, agent_id = stash.get("agent_api_key"), stash.get("site"), stash.get("agent_id")
    if site is not None and not isinstance(site, str):
        raise ValueError("unknown layout")
    if agent_id is not None and (isinstance(agent_id, bool) or not isinstance(agent_id, int)):
        raise ValueError("unknown layout")
    return Credentials(
        agent_api_key=parse_api_key(key) if key is not None else None,
        site=site,
        agent_id=agent_id,
        enrollment=stash.get("enrollment") is True,
    )


def resume(paths: Paths, now: dt.datetime | None = None) -> Installed | None:
    """Finish an install an earlier run left half-done, if there is one."""
    if not paths.stash.exists():
        return None
    with files.locked(paths.cert_lock):
        files.clean_stale_temps(paths.cert_dir, paths.cert_names)
        try:
            stash = json.loads(paths.stash.read_bytes())
            manager_url, fingerprint = stash["manager_url"], stash["ca_fingerprint"]
            if (
                stash.get("version") != STASH_VERSION
                or not isinstance(manager_url, str)
                or not isinstance(fingerprint, str)
            ):
                raise ValueError("unknown layout")
            extra = _stashed_credentials(stash)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("discarding %s, an interrupted install that cannot be read (%s)", paths.stash, exc)
            files.remove(paths.stash)
            return None
        try:
            key = pki.load_private_key(paths.pending_key)
            key_pem = paths.pending_key.read_bytes()
            bundle = pki.check_bundle(stash["bundle"], key=key, pin=fingerprint, now=now or dt.datetime.now(dt.UTC))
        except (AgentError, OSError, ValueError) as exc:
            log.error("discarding %s, an interrupted install that no longer checks out: %s", paths.stash, exc)
            files.remove(paths.stash)
            return None
        log.info("finishing the install an earlier run left half-done (%s)", paths.stash)
        return _finish(paths, bundle, manager_url, fingerprint, key_pem, extra)


def _put(target: Path, data: bytes, mode: int) -> None:
    try:
        if target.read_bytes() == data:
            return  # written by the interrupted run already: rewriting would push the real previous off .prev
    except FileNotFoundError:
        pass
    files.write_atomic(target, data, mode, keep_prev=True)


def _retire(target: Path) -> None:
    """Move ``target`` to ``NAME.prev``: no longer in use, still there for a person to look at."""
    if target.exists():
        os.replace(target, target.with_name(target.name + ".prev"))
        files.fsync_dir(target.parent)
        log.info("retired %s (kept as %s.prev): this enrollment brought no agent API key", target, target.name)


def _finish(
    paths: Paths, bundle: pki.Bundle, manager_url: str, ca_fingerprint: str, key_pem: bytes, extra: Credentials
) -> Installed:
    try:
        # Key before certificate: a reader catching the set between the two sees a pair that does not match
        # and keeps what it has, rather than a certificate it cannot use.
        _put(paths.ca, bundle.ca_pem, CERT_MODE)
        _put(paths.server_key, key_pem, KEY_MODE)
        _put(paths.server_cert, bundle.cert_pem, CERT_MODE)
        if extra.agent_api_key is not None:
            _put(paths.agent_api_key, extra.agent_api_key.reveal().encode() + b"\n", KEY_MODE)
        elif extra.enrollment:
            _retire(paths.agent_api_key)  # Ktizo minted none for this enrollment: the old one is not ours any more

        def enrolled(data: dict[str, Any]) -> None:
            enrollment = config.section(data, "enrollment", paths.config)
            enrollment["manager_url"] = manager_url
            enrollment.pop("polling_token", None)
            enrollment.pop("ca_fingerprint", None)  # kept under manager: from now on
            enrollment.pop("site", None)
            data["enrollment"] = enrollment
            previous = config.section(data, "manager", paths.config)
            manager: dict[str, Any] = {
                "url": manager_url,
                "mtls_url": bundle.mtls_url or previous.get("mtls_url"),
                "site": extra.site if extra.enrollment else extra.site or previous.get("site"),
                "ca_fingerprint": pki.normalize_fingerprint(ca_fingerprint),
                "addresses": bundle.manager_addresses or list(previous.get("addresses") or []),
                "agent_id": extra.agent_id if extra.enrollment else extra.agent_id or previous.get("agent_id"),
            }
            merged = {**manager, **{k: v for k, v in previous.items() if k not in manager}}
            data["manager"] = {k: v for k, v in merged.items() if v is not None or k not in ("site", "agent_id")}

        config.update(paths.config, enrolled)
        added = whitelist.append(paths.whitelist, bundle.manager_addresses)
    except (OSError, AgentError) as exc:
        raise AgentError(
            f"installing the certificate failed: {exc.message if isinstance(exc, AgentError) else exc}",
            hint=f"the bundle is kept in {paths.stash}: fix the cause and run the command again to finish",
        ) from None
    files.remove(paths.stash)
    files.remove(paths.pending_key)
    files.fsync_dir(paths.cert_dir)
    cert = bundle.cert
    log.info(
        "installed %s (serial %x, valid until %s)",
        paths.server_cert,
        cert.serial_number,
        pki.iso(cert.not_valid_after_utc),
    )
    return Installed(cert=cert, manager_url=manager_url, mtls_url=bundle.mtls_url, added_addresses=added)
