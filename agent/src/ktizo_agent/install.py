"""Putting a checked bundle in place: certificate files, then the config, then the whitelist.

Ktizo hands an enrollment bundle out once, so before any of that the bundle is stashed (``bundle.json.pending``,
0600, beside the pending key). A crash or a full disk part-way leaves the stash, and the next run of any command
finishes the install from it instead of asking Ktizo for a bundle it will not give again."""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from ktizo_agent import config, files, pki, whitelist
from ktizo_agent.config import Paths
from ktizo_agent.errors import AgentError

log = logging.getLogger(__name__)

CERT_MODE = 0o644
KEY_MODE = 0o600
STASH_VERSION = 1


@dataclass(frozen=True)
class Installed:
    cert: x509.Certificate
    manager_url: str
    mtls_url: str | None
    added_addresses: list[str]


def install(paths: Paths, bundle: pki.Bundle, *, manager_url: str, ca_fingerprint: str, key_pem: bytes) -> Installed:
    """Install ``bundle`` whose key is ``key_pem`` (also on disk as the pending key)."""
    files.ensure_dir(paths.cert_dir)
    with files.locked(paths.cert_lock):
        files.clean_stale_temps(paths.cert_dir, paths.cert_names)
        stash: dict[str, Any] = {
            "version": STASH_VERSION,
            "manager_url": manager_url,
            "ca_fingerprint": ca_fingerprint,
            "bundle": bundle.raw,
        }
        files.remove(paths.stash)
        try:
            files.write_new(paths.stash, json.dumps(stash).encode(), KEY_MODE)
        except OSError as exc:
            log.error("could not stash the bundle in %s (%s); installing it straight away", paths.stash, exc)
        return _finish(paths, bundle, manager_url, ca_fingerprint, key_pem)


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
        return _finish(paths, bundle, manager_url, fingerprint, key_pem)


def _put(target: Path, data: bytes, mode: int) -> None:
    try:
        if target.read_bytes() == data:
            return  # written by the interrupted run already: rewriting would push the real previous off .prev
    except FileNotFoundError:
        pass
    files.write_atomic(target, data, mode, keep_prev=True)


def _finish(paths: Paths, bundle: pki.Bundle, manager_url: str, ca_fingerprint: str, key_pem: bytes) -> Installed:
    try:
        # Key before certificate: a reader catching the set between the two sees a pair that does not match
        # and keeps what it has, rather than a certificate it cannot use.
        _put(paths.ca, bundle.ca_pem, CERT_MODE)
        _put(paths.server_key, key_pem, KEY_MODE)
        _put(paths.server_cert, bundle.cert_pem, CERT_MODE)

        def enrolled(data: dict[str, Any]) -> None:
            enrollment = config.section(data, "enrollment", paths.config)
            enrollment["manager_url"] = manager_url
            enrollment.pop("polling_token", None)
            enrollment.pop("ca_fingerprint", None)  # kept under manager: from now on
            data["enrollment"] = enrollment
            previous = config.section(data, "manager", paths.config)
            manager = {
                "url": manager_url,
                "mtls_url": bundle.mtls_url or previous.get("mtls_url"),
                "ca_fingerprint": pki.normalize_fingerprint(ca_fingerprint),
                "addresses": bundle.manager_addresses or list(previous.get("addresses") or []),
            }
            data["manager"] = {**manager, **{k: v for k, v in previous.items() if k not in manager}}

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
