"""Life after enrollment, over mTLS with Ktizo: checking in with facts, and renewing the certificate with a new key.

An agent holding a ``cak_`` API key (a site enrollment gave it) sends it as ``Authorization: Bearer`` beside its
client certificate on every call: Ktizo refuses an agent that has a key and does not show it."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from ktizo_agent import config, files, identity, install, manager, pki
from ktizo_agent.config import Paths
from ktizo_agent.errors import AgentError, Gone, Rejected, Throttled

log = logging.getLogger(__name__)

ENROLL_FIRST = (
    "run `ktizo-agent enroll MANAGER_URL --ca-fingerprint sha256:…` first (with `--site CODE --enrollment-key-file "
    "FILE` to enroll in a site)"
)


@dataclass(frozen=True)
class Membership:
    """What the config says about the Ktizo this host is enrolled with."""

    manager_url: str
    mtls_url: str
    ca_fingerprint: str
    addresses: list[str]


def membership(paths: Paths) -> Membership:
    known = config.section(config.load(paths.config), "manager", paths.config)
    if not known.get("url") or not paths.server_cert.exists() or not paths.server_key.exists():
        raise AgentError(
            f"this host is not enrolled (no `manager:` in {paths.config}, or no certificate in {paths.cert_dir})",
            hint=ENROLL_FIRST,
        )
    if not known.get("mtls_url"):
        raise AgentError(
            f"{paths.config} has no manager.mtls_url: Ktizo did not say where agents reach it over mTLS",
            hint="set manager.mtls_url (https://HOST:PORT of Ktizo's agent listener) in the config",
        )
    try:
        fingerprint = pki.normalize_fingerprint(str(known.get("ca_fingerprint") or ""))
    except ValueError:
        raise AgentError(
            f"manager.ca_fingerprint in {paths.config} is missing or malformed", hint=ENROLL_FIRST
        ) from None
    return Membership(
        manager_url=str(known["url"]),
        mtls_url=str(known["mtls_url"]).rstrip("/"),
        ca_fingerprint=fingerprint,
        addresses=[str(a) for a in known.get("addresses") or []],
    )


def _post(paths: Paths, member: Membership, path: str, body: dict[str, Any]) -> manager.Reply:
    api_key = install.held_api_key(paths)  # read each time: a renewal or a new enrollment may have replaced it
    headers = {"Authorization": f"Bearer {api_key.reveal()}"} if api_key is not None else None
    with manager.mtls_door(member.mtls_url, paths) as door:
        try:
            return door.request("POST", path, body, headers=headers)
        except manager.Unreachable as exc:
            raise manager.Unreachable(
                f"could not reach Ktizo's agent listener: {exc.message}",
                hint="check the network; a refused handshake can also mean the certificate expired or was revoked "
                "(`ktizo-agent status`)",
            ) from None


def _check(reply: manager.Reply, what: str) -> Any:
    if reply.status == 200:
        return reply.json()
    if reply.status == 403:
        raise Rejected(
            f"Ktizo refused the {what}: {reply.detail}",
            hint="the agent was revoked, rejected or purged in Ktizo, or its agent API key (agent-api-key in the "
            "certificate directory) is missing or stale: ask the operator (`ktizo agents show ID`), or enroll again",
        )
    if reply.status in (404, 410):
        raise Gone(f"Ktizo does not know this agent ({what}: {reply.detail})", hint="enroll again")
    if reply.status == 429:
        raise Throttled(f"Ktizo is busy (429) and asked to wait before the {what}", reply.retry_after)
    raise AgentError(f"Ktizo answered HTTP {reply.status} to the {what}: {reply.detail}")


@dataclass(frozen=True)
class CheckinAnswer:
    interval: float | None
    renew_after: dt.datetime | None
    serial: int  # of the certificate the check-in went out with: a renew_after hint is about that one


def checkin(paths: Paths, member: Membership, facts: dict[str, Any], listen_port: int | None) -> CheckinAnswer:
    cert = pki.load_certificate_file(paths.server_cert)
    reply = _post(paths, member, "/api/v1/agent/checkin", {"facts": facts, "listen_port": listen_port})
    body = _check(reply, "check-in")
    body = body if isinstance(body, dict) else {}
    interval = body.get("checkin_interval_seconds")
    if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
        interval = None
    return CheckinAnswer(
        interval=float(interval) if interval is not None else None,
        renew_after=pki.parse_iso(body.get("renew_after")),
        serial=cert.serial_number,
    )


def renew(paths: Paths, member: Membership, sources: identity.Sources) -> install.Installed:
    """A new key of the current key's type, a CSR for it over mTLS with the current certificate, and the answer
    checked and installed exactly as at enrollment (the old files kept as ``.prev``)."""
    current = pki.load_private_key(paths.server_key)
    kind = pki.key_kind(current)
    key = pki.generate_key(kind if kind in pki.KEY_TYPES else pki.DEFAULT_KEY_TYPE)
    pem = pki.private_pem(key)
    with files.locked(paths.cert_lock):
        files.clean_stale_temps(paths.cert_dir, paths.cert_names)
        files.write_atomic(paths.pending_key, pem, install.KEY_MODE)
    name = identity.resolve_hostname(sources.hostname)
    fqdn = identity.resolve_fqdn(name, given=sources.hostname is not None)
    csr = pki.build_csr(key, identity.short_name(name), fqdn)
    reply = _post(paths, member, "/api/v1/agent/renew", {"csr_pem": csr})
    try:
        body = _check(reply, "renewal")
    except (Rejected, Gone):
        files.remove(paths.pending_key)
        raise
    try:
        bundle = pki.check_bundle(body, key=key, pin=member.ca_fingerprint, now=dt.datetime.now(dt.UTC))
        # Ktizo may rotate the API key with the certificate; a renewal that brings none leaves the held one.
        api_key = install.parse_api_key(body["agent_api_key"]) if body.get("agent_api_key") is not None else None
    except (pki.BadBundle, ValueError) as exc:
        raise pki.BadBundle(
            f"refused the renewed certificate, nothing was installed: {getattr(exc, 'message', exc)}",
            hint=getattr(exc, "hint", None)
            or "the current certificate stays in use; ask the operator, then run `ktizo-agent renew`",
        ) from None
    return install.install(
        paths,
        bundle,
        manager_url=member.manager_url,
        ca_fingerprint=member.ca_fingerprint,
        key_pem=pem,
        credentials=install.Credentials(agent_api_key=api_key),
    )
