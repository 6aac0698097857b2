"""Linux hosts running ``ktizo-agent``: enrollment (first contact keyed by machine-id, a CSR, a polling token), the
certificate issued on approval and picked up once, mTLS check-in and renewal, revocation, purge and probing.

Agents are machines of kind ``agent`` in the one registry: approval, rejection and deletion go through the device
state machine (``DeviceService``), whose hooks this service fills: approving issues the certificate from the
database record, rejecting revokes every certificate, deleting (purge) ends every credential."""

from __future__ import annotations

import builtins
import datetime as dt
import hashlib
import hmac
import http.client
import ipaddress
import json
import secrets
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from ktizo.db import Database
from ktizo.db.engine import keep_on_refusal
from ktizo.db.models import AgentApiKey, AgentCertificate, Device, Enrollment
from ktizo.db.types import utcnow
from ktizo.domain.devices import DeviceStatus, MachineKind, Source
from ktizo.domain.errors import Conflict, FailedPrecondition, NotFound, PermissionDenied, ValidationFailed
from ktizo.domain.identity import normalize_hostname, normalize_ip, normalize_machine_id
from ktizo.domain.users import UserRole
from ktizo.pki import authority as pki
from ktizo.pki.certs import cert_pem, public_der
from ktizo.services import audit, refusals
from ktizo.services.authority import AuthorityService
from ktizo.services.context import Actor
from ktizo.services.devices import DeviceChanges, DeviceService
from ktizo.services.first_contact import FirstContact, Knock

TOKEN_BYTES = 32  # 256 bits
API_KEY_PREFIX = "cak_"
MAX_ADDRESSES = 32
MAX_OS_FIELD = 128
MAX_FACTS_BYTES = 256 * 1024
PROBE_TIMEOUT = 10.0
LIVE_ENROLLMENT = (
    "this machine-id already has an enrollment in Ktizo: keep polling with the saved token, or ask an operator to "
    "approve it, or to purge it (`ktizo agents purge MACHINE_ID`) so that the host can start over"
)


@dataclass(frozen=True)
class EnrollRequest:
    """What ``POST /api/v1/enroll`` carries, as the adapter parsed it (not yet validated)."""

    machine_id: str
    hostname: str
    fqdn: str | None
    ip_addresses: Sequence[str]
    os: dict[str, str]
    csr_pem: str


@dataclass(frozen=True)
class Bundle:
    """What an approved agent picks up (once), and what a renewal returns."""

    ca_crt: str
    server_crt: str
    chain: str
    not_after: str
    manager_addresses: list[str]
    mtls_url: str | None
    agent_api_key: str | None = None  # zero-touch agents: their cak_ key, shown once

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ca_crt": self.ca_crt,
            "server_crt": self.server_crt,
            "chain": self.chain,
            "not_after": self.not_after,
            "manager_addresses": self.manager_addresses,
            "mtls_url": self.mtls_url,
        }
        if self.agent_api_key is not None:
            out["agent_api_key"] = self.agent_api_key
        return out


@dataclass(frozen=True)
class PollAnswer:
    state: str  # pending | approved | rejected | unknown
    bundle: Bundle | None = None


@dataclass(frozen=True)
class Endpoint:
    """Where agents reach Ktizo, as the request that asks saw it: the mTLS URL and the addresses to whitelist."""

    mtls_url: str | None
    manager_addresses: list[str]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def validate_request(req: EnrollRequest, *, with_machine_id: bool = True) -> dict[str, Any]:
    """The enrollment's fields checked and normalised; the CSR is checked by ``pki.check_csr``. Zero-touch
    enrollment sends a machine_uid instead of the machine-id (``with_machine_id=False``)."""
    machine_id = normalize_machine_id(req.machine_id) if with_machine_id else None
    hostname = normalize_hostname(req.hostname, "hostname")
    fqdn = normalize_hostname(req.fqdn, "fqdn") if req.fqdn else None
    if len(req.ip_addresses) > MAX_ADDRESSES:
        raise ValidationFailed(f"at most {MAX_ADDRESSES} addresses", "ip_addresses")
    addresses = []
    for raw in req.ip_addresses:
        ip = ipaddress.ip_address(normalize_ip(raw, "ip_addresses"))
        if ip.is_loopback or ip.is_unspecified or ip.is_multicast:
            raise ValidationFailed(f"{ip} is not an address others can reach the host at", "ip_addresses")
        addresses.append(str(ip))
    os_info = {}
    for key in ("id", "version", "kernel"):
        value = str(req.os.get(key) or "")
        if len(value) > MAX_OS_FIELD or not value.isprintable():
            raise ValidationFailed(f"os.{key} must be printable text of at most {MAX_OS_FIELD} characters", "os")
        os_info[key] = value
    return {
        "machine_id": machine_id,
        "hostname": hostname,
        "fqdn": fqdn,
        "ip_addresses": list(dict.fromkeys(addresses)),
        "os": os_info,
    }


class AgentService:
    def __init__(
        self,
        db: Database,
        devices: DeviceService,
        authority: AuthorityService,
        first_contact: FirstContact,
        *,
        cert_days: float = 30.0,
        enrollment_ttl: dt.timedelta = dt.timedelta(days=7),
        poll_seconds: int = 60,
        checkin_seconds: int = 300,
        work_dir: Path | None = None,
    ) -> None:
        self.db = db
        self.devices = devices
        self.authority = authority
        self.first_contact = first_contact
        self.cert_days = cert_days
        self.enrollment_ttl = enrollment_ttl
        self.poll_seconds = poll_seconds
        self.checkin_seconds = checkin_seconds
        self.work_dir = work_dir
        devices.on_approve.append(self._issue_on_approval)
        devices.on_reject.append(self._revoke_on_reject)
        devices.on_delete.append(self._end_credentials)

    # -- the enrollment door (unauthenticated) ---------------------------------------------------------

    def enroll(self, req: EnrollRequest, source_ip: str | None) -> str:
        """Register the host as a pending agent with its CSR; returns the polling token (shown once, stored as its
        hash). ``Conflict`` when the machine-id has a live enrollment, or is enrolled or decided already."""
        fields = validate_request(req)
        csr = pki.check_csr(req.csr_pem)
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = utcnow()
        knock = Knock(
            door=Source.ENROLL,
            kind=MachineKind.AGENT,
            machine_id=fields["machine_id"],
            source_ip=source_ip,
            facts={k: fields[k] for k in ("hostname", "fqdn", "ip_addresses", "os")},
        )
        # The refusal is evidence: counted in a block that commits, then raised (a block that raises rolls back).
        with self.db.write() as s:
            existing = self.first_contact.find(s, knock, lock=True)
            live = existing is not None and (
                existing.kind != MachineKind.AGENT.value or not self._may_enroll_again(s, existing)
            )
            if live:
                refusals.refuse(s, knock.who, "enroll_refused", knock.subject, existing, {"reason": "live"})
        if live:
            keep_on_refusal()
            raise Conflict(LIVE_ENROLLMENT, "machine_id")
        with self.db.write() as s:
            arrival = self.first_contact.arrive(s, knock)
            device = arrival.device
            if not arrival.created:
                device.facts = dict(knock.facts)  # a pending host re-enrolling reports itself afresh
            s.add(
                Enrollment(
                    device_id=device.id,
                    token_hash=token_hash(token),
                    csr_pem=req.csr_pem,
                    key_type=pki.key_type(csr.public_key()),
                    status="pending",
                    created_at=now,
                    expires_at=now + self.enrollment_ttl,
                    source_ip=source_ip,
                )
            )
            s.flush()
            audit.record(
                s,
                knock.who,
                "enroll",
                device,
                {
                    "machine_id": device.machine_id,
                    "hostname": fields["hostname"],
                    "key_type": pki.key_type(csr.public_key()),
                },
            )
            self.first_contact.decide(s, device, knock)  # an auto-approval rule may take it now
        return token

    @staticmethod
    def _may_enroll_again(s: Session, device: Device) -> bool:
        """A pending agent whose enrollment expired or never existed may enroll again; anything decided, or with a
        live enrollment, may not (an operator purges it first)."""
        if device.status != DeviceStatus.PENDING.value:
            return False
        live = s.scalar(select(Enrollment.id).where(Enrollment.device_id == device.id))
        return live is None

    def poll(self, token: str, source_ip: str | None, endpoint: Endpoint) -> PollAnswer:
        """``GET /api/v1/enroll/status/{token}``: pending, approved (the bundle, handed out once: the enrollment and
        its token die with the pickup), rejected, or unknown (never issued, expired, purged or picked up)."""
        if not token or len(token) > 128:
            return PollAnswer("unknown")
        digest = token_hash(token)
        with self.db.write() as s:
            row = s.scalar(select(Enrollment).where(Enrollment.token_hash == digest).with_for_update())
            if row is None or not hmac.compare_digest(row.token_hash, digest) or row.expires_at <= utcnow():
                refusals.refuse(
                    s,
                    Actor.device(source_ip),
                    "enroll_refused",
                    source_ip or "unknown",
                    None,
                    {"reason": "unknown token"},
                )
                return PollAnswer("unknown")
            device = s.get(Device, row.device_id)
            assert device is not None
            if row.status == "rejected" or device.status == DeviceStatus.REJECTED.value:
                return PollAnswer("rejected")
            if device.status == DeviceStatus.PENDING.value or row.status != "approved":
                self.first_contact.seen(device, source_ip)
                return PollAnswer("pending")
            cert = s.get(AgentCertificate, row.certificate_serial) if row.certificate_serial else None
            gone = s.execute(delete(Enrollment).where(Enrollment.id == row.id))
            if cert is None or not getattr(gone, "rowcount", 0):
                return PollAnswer("unknown")
            self.first_contact.seen(device, source_ip)
            audit.record(s, Actor.device(source_ip), "cert_pickup", device, {"serial": cert.serial})
            api_key = self.mint_api_key(s, device) if row.site_id is not None else None
            return PollAnswer("approved", self.bundle(cert, endpoint, api_key))

    def bundle(self, cert: AgentCertificate, endpoint: Endpoint, api_key: str | None = None) -> Bundle:
        ca = self.authority.ca_pem()
        return Bundle(
            ca_crt=ca,
            server_crt=cert.cert_pem,
            chain=cert.cert_pem + ca,
            not_after=cert.not_after.isoformat().replace("+00:00", "Z"),
            manager_addresses=endpoint.manager_addresses,
            mtls_url=endpoint.mtls_url,
            agent_api_key=api_key,
        )

    # -- agent API keys (cak_) ---------------------------------------------------------------------------

    @staticmethod
    def mint_api_key(s: Session, device: Device) -> str:
        """A new ``cak_<id>_<secret>`` for the agent, its earlier ones revoked; only the secret's SHA-256 is kept."""
        now = utcnow()
        s.execute(
            update(AgentApiKey)
            .where(AgentApiKey.device_id == device.id, AgentApiKey.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        secret = secrets.token_urlsafe(TOKEN_BYTES)
        row = AgentApiKey(device_id=device.id, secret_hash=token_hash(secret), created_at=now)
        s.add(row)
        s.flush()
        return f"{API_KEY_PREFIX}{row.id}_{secret}"

    @staticmethod
    def api_key_owner(s: Session, key: str | None) -> int | None:
        """The device a live ``cak_`` key belongs to, or None (malformed, unknown, revoked, wrong secret)."""
        if not key or not key.startswith(API_KEY_PREFIX) or len(key) > 128:
            return None
        key_id, _, secret = key[len(API_KEY_PREFIX) :].partition("_")
        if not key_id.isdigit() or len(key_id) > 9 or not secret:
            return None
        row = s.get(AgentApiKey, int(key_id))
        if row is None or row.revoked_at is not None:
            return None
        if not hmac.compare_digest(row.secret_hash, token_hash(secret)):
            return None
        return row.device_id

    @staticmethod
    def has_api_key(s: Session, device_id: int) -> bool:
        return (
            s.scalar(select(AgentApiKey.id).where(AgentApiKey.device_id == device_id, AgentApiKey.revoked_at.is_(None)))
            is not None
        )

    # -- the state machine's hooks ---------------------------------------------------------------------

    def _issue_on_approval(self, s: Session, actor: Actor, device: Device) -> None:
        if device.kind != MachineKind.AGENT.value:
            return
        enrollment = s.scalar(select(Enrollment).where(Enrollment.device_id == device.id).with_for_update())
        if enrollment is None or enrollment.status != "pending":
            raise FailedPrecondition(
                "this agent has no pending enrollment (it expired, or its certificate was issued already): run "
                "`ktizo-agent enroll` on the host again"
            )
        csr = pki.check_csr(enrollment.csr_pem)
        reported = device.facts or {}
        if not device.addresses:
            device.addresses = list(reported.get("ip_addresses") or [])
        if not device.fqdn:
            device.fqdn = _fqdn_for(device.hostname or "", reported.get("hostname"), reported.get("fqdn"))
        cert = self.issue(s, actor, device, csr.public_key(), reason="enroll")
        enrollment.status = "approved"
        enrollment.certificate_serial = cert.serial
        # The pickup window starts now: a bundle nobody collects dies with its token.
        enrollment.expires_at = utcnow() + self.enrollment_ttl

    def issue(self, s: Session, actor: Actor, device: Device, public_key: Any, *, reason: str) -> AgentCertificate:
        ca = self.authority.authority()
        now = utcnow()
        names = [n for n in (device.hostname, device.fqdn) if n]
        issued = pki.issue(
            ca,
            public_key,
            common_name=device.hostname or device.machine_id or "agent",
            dns_names=names,
            ip_addresses=list(device.addresses or []),
            now=now,
            days=self.cert_days,
        )
        row = AgentCertificate(
            serial=pki.serial_hex(issued.serial_number),
            device_id=device.id,
            machine_id=device.machine_id or "",
            cert_pem=cert_pem(issued).decode(),
            not_before=issued.not_valid_before_utc,
            not_after=issued.not_valid_after_utc,
            issued_at=now,
            issued_by=actor.name,
            reason=reason,
        )
        s.add(row)
        s.flush()
        audit.record(
            s,
            actor,
            "cert_issue",
            device,
            {
                "serial": row.serial,
                "reason": reason,
                "not_after": row.not_after.isoformat(),
                "dns": names,
                "ip": list(device.addresses or []),
            },
        )
        return row

    def _revoke_on_reject(self, s: Session, actor: Actor, device: Device) -> None:
        if device.kind == MachineKind.AGENT.value:
            self.revoke_all(s, actor, device, "rejected")
            s.execute(
                update(Enrollment)
                .where(Enrollment.device_id == device.id, Enrollment.status == "approved")
                .values(certificate_serial=None)
            )

    def _end_credentials(self, s: Session, actor: Actor, device: Device) -> None:
        if device.kind != MachineKind.AGENT.value:
            return
        self.revoke_all(s, actor, device, "purged")
        s.execute(delete(Enrollment).where(Enrollment.device_id == device.id))

    @staticmethod
    def revoke_all(s: Session, actor: Actor, device: Device, why: str) -> list[str]:
        now = utcnow()
        s.execute(
            update(AgentApiKey)
            .where(AgentApiKey.device_id == device.id, AgentApiKey.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        serials = list(
            s.scalars(
                select(AgentCertificate.serial).where(
                    AgentCertificate.device_id == device.id,
                    AgentCertificate.revoked_at.is_(None),
                    AgentCertificate.not_after > now,
                )
            )
        )
        if serials:
            s.execute(
                update(AgentCertificate)
                .where(AgentCertificate.serial.in_(serials))
                .values(revoked_at=now, revoked_by=actor.name)
            )
            audit.record(s, actor, "cert_revoke", device, {"serials": serials, "reason": why})
        return serials

    # -- operators -------------------------------------------------------------------------------------

    def list(
        self,
        status: DeviceStatus | None = None,
        limit: int = 1000,
        *,
        site_id: int | None = None,
        key_version: int | None = None,
        enrolled_after: dt.datetime | None = None,
    ) -> builtins.list[Device]:
        """Agents, oldest first; by site, by the site key version they enrolled with, first seen after a moment
        ("who enrolled with v3 after T")."""
        with self.db.read() as s:
            stmt = select(Device).where(Device.kind == MachineKind.AGENT.value)
            if status is not None:
                stmt = stmt.where(Device.status == status.value)
            if site_id is not None:
                stmt = stmt.where(Device.site_id == site_id)
            if key_version is not None:
                stmt = stmt.where(Device.key_version == key_version)
            if enrolled_after is not None:
                stmt = stmt.where(Device.first_seen > enrolled_after)
            return list(s.scalars(stmt.order_by(Device.id).limit(limit)))

    def resolve(self, ref: str) -> Device:
        """An agent by id or machine-id."""
        text = ref.strip().lower()
        with self.db.read() as s:
            device: Device | None = None
            if text.isdigit() and len(text) < 10:
                device = s.get(Device, int(text))
            if device is None:
                try:
                    device = s.scalar(select(Device).where(Device.machine_id == normalize_machine_id(text)))
                except ValidationFailed:
                    device = None
            if device is None or device.kind != MachineKind.AGENT.value:
                raise NotFound(f"no agent {ref[:80]!r}: give its id or machine-id (`ktizo agents list`)")
            return device

    def certificates(self, device_id: int) -> builtins.list[AgentCertificate]:
        with self.db.read() as s:
            return list(
                s.scalars(
                    select(AgentCertificate)
                    .where(AgentCertificate.device_id == device_id)
                    .order_by(AgentCertificate.issued_at.desc())
                )
            )

    def enrollment(self, device_id: int) -> Enrollment | None:
        with self.db.read() as s:
            return s.scalar(select(Enrollment).where(Enrollment.device_id == device_id))

    def approve(self, actor: Actor, ref: str, *, hostname: str | None = None, notes: str | None = None) -> Device:
        device = self.resolve(ref)
        changes = DeviceChanges()
        if hostname is not None:
            changes.hostname = hostname
        if notes is not None:
            changes.notes = notes
        return self.devices.approve(actor, device.id, changes)

    def reject(self, actor: Actor, ref: str, notes: str | None = None) -> Device:
        device = self.resolve(ref)
        if device.status != DeviceStatus.PENDING.value:
            raise Conflict(f"agent {device.id} is {device.status}: revoke an approved agent, purge a rejected one")
        return self.devices.reject(actor, device.id, notes)

    def revoke(self, actor: Actor, ref: str, notes: str | None = None) -> Device:
        """An approved agent becomes rejected and every certificate it holds is revoked (CRL, every mTLS request)."""
        device = self.resolve(ref)
        if device.status != DeviceStatus.APPROVED.value:
            raise Conflict(f"agent {device.id} is {device.status}: only an approved agent can be revoked")
        return self.devices.reject(actor, device.id, notes)

    def purge(self, actor: Actor, ref: str) -> Device:
        """Forget the agent: its record, enrollment and token; its certificates revoked. It may enroll again."""
        actor.require(UserRole.OPERATOR)
        device = self.resolve(ref)
        self.devices.delete(actor, device.id)
        with self.db.write() as s:
            audit.record(s, actor, "purge", device, {"machine_id": device.machine_id})
        return device

    # -- the mTLS door ---------------------------------------------------------------------------------

    def authenticate(
        self, s: Session, cert_der: bytes | None, api_key: str | None = None
    ) -> tuple[Device, AgentCertificate]:
        """The agent presenting ``cert_der``: a certificate of this CA, issued to an agent, not revoked, not
        expired, whose machine is approved; an agent that holds a ``cak_`` key must present it too. Anything else
        is ``PermissionDenied``."""
        if not cert_der:
            raise PermissionDenied("this door needs the agent's client certificate (mTLS)")
        try:
            cert = x509.load_der_x509_certificate(cert_der)
        except ValueError:
            raise PermissionDenied("the client certificate could not be read") from None
        if not pki.signed_by(cert, self.authority.authority()):
            raise PermissionDenied("the client certificate is not from Ktizo's agent CA")
        row = s.get(AgentCertificate, pki.serial_hex(cert.serial_number))
        now = utcnow()
        if row is None or row.revoked_at is not None or row.device_id is None:
            raise PermissionDenied("this certificate is revoked or unknown: enroll the host again")
        if row.not_after <= now:
            raise PermissionDenied("this certificate has expired: enroll the host again")
        device = s.get(Device, row.device_id, with_for_update=True)
        if device is None or device.status != DeviceStatus.APPROVED.value:
            raise PermissionDenied("this agent is not approved")
        if (api_key or self.has_api_key(s, device.id)) and self.api_key_owner(s, api_key) != device.id:
            raise PermissionDenied("this agent's API key (Authorization: Bearer cak_…) is missing or wrong")
        return device, row

    def checkin(
        self,
        cert_der: bytes | None,
        peer_ip: str | None,
        facts: dict[str, Any],
        listen_port: int | None,
        api_key: str | None = None,
    ) -> dict[str, Any]:
        if len(json.dumps(facts)) > MAX_FACTS_BYTES:
            raise ValidationFailed(f"facts are at most {MAX_FACTS_BYTES} bytes of JSON", "facts")
        with self.db.write() as s:
            device, cert = self.authenticate(s, cert_der, api_key)
            now = utcnow()
            device.last_seen, device.last_ip = now, peer_ip
            device.facts = {**(device.facts or {}), "host": facts, "host_at": now.isoformat()}
            if listen_port and peer_ip:
                host = f"[{peer_ip}]" if ":" in peer_ip else peer_ip
                device.agent_address = f"{host}:{listen_port}"
            lifetime = cert.not_after - cert.not_before
            renew_after = cert.not_before + lifetime * 2 / 3
            audit_due = device.facts.get("checked_in") is None
            if audit_due:
                device.facts = {**device.facts, "checked_in": now.isoformat()}
                audit.record(s, Actor.device(peer_ip), "checkin", device, {"serial": cert.serial, "first": True})
            return {
                "status": "approved",
                "checkin_interval_seconds": self.checkin_seconds,
                "renew_after": renew_after.isoformat().replace("+00:00", "Z"),
                "not_after": cert.not_after.isoformat().replace("+00:00", "Z"),
            }

    def renew(
        self, cert_der: bytes | None, peer_ip: str | None, csr_pem: str, endpoint: Endpoint, api_key: str | None = None
    ) -> Bundle:
        """A new certificate for a new key, same profile from the record; the old one lives out its lifetime."""
        csr = pki.check_csr(csr_pem)
        with self.db.write() as s:
            device, old = self.authenticate(s, cert_der, api_key)
            actor = Actor(name="agent", kind="device", source_ip=peer_ip)
            if _same_key(csr, old.cert_pem):
                raise ValidationFailed(
                    "renewal needs a new key: the CSR carries the current certificate's key", "csr_pem"
                )
            row = self.issue(s, actor, device, csr.public_key(), reason="renew")
            device.last_seen, device.last_ip = utcnow(), peer_ip
            return self.bundle(row, endpoint)

    def probe(self, actor: Actor, ref: str, address: str | None = None) -> dict[str, Any]:
        """Connect to the agent's own mTLS listener as Ktizo's manager, fetch ``/v1/facts`` and store them."""
        actor.require(UserRole.OPERATOR)
        device = self.resolve(ref)
        target = address or device.agent_address
        if not target:
            raise FailedPrecondition(
                "this agent has not checked in yet, so Ktizo does not know where it listens: pass --address HOST:PORT"
            )
        host, port = _split_address(target)
        serials = {c.serial for c in self.certificates(device.id) if c.revoked_at is None}
        with tempfile.TemporaryDirectory(dir=self.work_dir) as tmp:
            files = self.authority.manager_files(Path(tmp))
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca))
            context.check_hostname = False  # the agent is identified by its certificate's serial below
            context.load_cert_chain(str(files.cert), str(files.key))
            conn = http.client.HTTPSConnection(host, port, context=context, timeout=PROBE_TIMEOUT)
            try:
                conn.connect()
                peer = conn.sock.getpeercert(binary_form=True) if isinstance(conn.sock, ssl.SSLSocket) else None
                peer_serial = pki.serial_hex(x509.load_der_x509_certificate(peer).serial_number) if peer else None
                if peer_serial not in serials:
                    raise PermissionDenied(
                        f"the listener at {target} is not agent {device.id} (certificate {peer_serial})"
                    )
                conn.request("GET", "/v1/facts", headers={"Accept": "application/json"})
                response = conn.getresponse()
                body = response.read(MAX_FACTS_BYTES + 1)
            except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
                raise FailedPrecondition(f"could not reach the agent at {target}: {exc}") from None
            finally:
                conn.close()
        if response.status != 200:
            raise FailedPrecondition(f"the agent at {target} answered {response.status}: {body[:200]!r}")
        if len(body) > MAX_FACTS_BYTES:
            raise ValidationFailed("the agent's facts are too large", "facts")
        facts = json.loads(body)
        with self.db.write() as s:
            row = s.get(Device, device.id, with_for_update=True)
            if row is None:
                raise NotFound("the agent was purged meanwhile")
            now = utcnow()
            row.facts = {**(row.facts or {}), "host": facts, "host_at": now.isoformat()}
            audit.record(s, actor, "probe", row, {"address": target})
        return dict(facts)

    # -- housekeeping ----------------------------------------------------------------------------------

    def expire(self) -> int:
        """Enrollments past their time: a pending one goes with its never-approved machine; an approved one whose
        bundle nobody picked up has its certificate revoked. Their tokens die either way."""
        now = utcnow()
        actor = Actor.system("expiry")
        with self.db.write() as s:
            rows = list(s.scalars(select(Enrollment).where(Enrollment.expires_at <= now).limit(1000)))
            for row in rows:
                device = s.get(Device, row.device_id)
                if device is None:
                    continue
                audit.record(s, actor, "enrollment_expired", device, {"status": row.status})
                if row.status == "approved":
                    self.revoke_all(s, actor, device, "not picked up")
                s.delete(row)
                if device.status == DeviceStatus.PENDING.value:
                    s.flush()
                    s.delete(device)
        return len(rows)


def _fqdn_for(hostname: str, reported_host: Any, reported_fqdn: Any) -> str | None:
    """The approved hostname in the domain the host reported: ``web1`` + ``old.example.com`` -> ``web1.example.com``."""
    fqdn = str(reported_fqdn or "")
    short = str(reported_host or "")
    domain = ""
    if fqdn and "." in fqdn:
        domain = fqdn[len(short) + 1 :] if short and fqdn.startswith(short + ".") else fqdn.split(".", 1)[1]
    if not hostname or not domain:
        return None
    if "." in hostname:
        return hostname
    try:
        return normalize_hostname(f"{hostname}.{domain}", "fqdn")
    except ValidationFailed:
        return None


def _same_key(csr: x509.CertificateSigningRequest, current_pem: str) -> bool:
    current = x509.load_pem_x509_certificate(current_pem.encode())
    return public_der(csr.public_key()) == public_der(current.public_key())


def _split_address(address: str) -> tuple[str, int]:
    text = address.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.lstrip(":")
    else:
        host, _, port_text = text.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValidationFailed(f"{address[:80]!r} is not HOST:PORT", "address")
    return host, int(port_text)
