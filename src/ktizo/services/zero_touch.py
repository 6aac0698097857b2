"""Zero-touch enrollment (seed 004, ``POST /api/enroll``): a site's key lets its agents in without an operator, and
the collision gate keeps duplicates and impostors from being minted anything.

Order of the checks, each before anything is stored: requests per address (all enrollment doors), the lockout of
this (site code, address) pair, the body, the key (Argon2 under a semaphore; an unknown site costs the same and
answers the same as a wrong key). Then dedup on ``machine_uid``, in one transaction holding the row:

- **new**: registered; with ``auto-approve`` approved at once (certificate + ``cak_`` key in the answer), with
  ``manual`` pending and polled like any enrollment;
- **reuse**: the same site, with proof of the existing credential (its current certificate over mTLS, or its
  ``cak_`` key): a fresh certificate and key, the old ones revoked;
- **site move**: the same proof and a valid key of another site: as reuse, audited ``agent.site_moved``;
- **collision**: no proof, or the existing agent online under another hostname: the claim waits for an operator
  at the gate (an enrollment with ``collision``), nothing minted, audited ``agent.collision``.
"""

from __future__ import annotations

import builtins
import datetime as dt
import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ktizo.db import Database
from ktizo.db.engine import keep_on_refusal
from ktizo.db.models import AgentCertificate, Device, Enrollment, Refusal, Site
from ktizo.db.types import utcnow
from ktizo.domain.devices import DeviceStatus, MachineKind, Source
from ktizo.domain.errors import Conflict, KtizoError, NotFound, TooManyAttempts, Unauthenticated, ValidationFailed
from ktizo.domain.identity import normalize_hostname
from ktizo.domain.users import UserRole
from ktizo.pki import authority as pki
from ktizo.services import audit, refusals
from ktizo.services.agents import AgentService, Bundle, Endpoint, EnrollRequest, token_hash, validate_request
from ktizo.services.context import Actor
from ktizo.services.devices import DeviceChanges, DeviceService
from ktizo.services.first_contact import FirstContact, Knock, insert_ignoring_conflict
from ktizo.services.sites import SiteService, normalize_site_code, shown

_UID = re.compile(r"[0-9a-f]{64}")
REFUSED = "enrollment refused: unknown site, or a wrong, rotated, expired or used-up key"


class KeyRefused(Unauthenticated):
    """401 for every refused key: unknown site, wrong, rotated-away, expired or used-up key (one answer)."""


@dataclass(frozen=True)
class SiteEnrollRequest:
    site_code: str
    enrollment_key: str
    machine_uid: str
    identity: EnrollRequest  # hostname, fqdn, addresses, os, csr (its machine_id unused: the uid stands for it)
    agent_api_key: str | None = None


@dataclass(frozen=True)
class Outcome:
    state: str  # active | pending
    outcome: str  # new | reuse | site_move | pending | collision
    agent_id: int
    bundle: Bundle | None = None
    polling_token: str | None = None


@dataclass(frozen=True)
class Collision:
    enrollment_id: int
    device: Device  # the machine the claim collides with
    claim: dict[str, Any]
    site_code: str | None
    created_at: dt.datetime
    expires_at: dt.datetime


class ZeroTouch:
    def __init__(
        self,
        db: Database,
        sites: SiteService,
        agents: AgentService,
        devices: DeviceService,
        first_contact: FirstContact,
        *,
        requests_per_minute: int = 60,
        failures_before_lockout: int = 5,
        lockout: dt.timedelta = dt.timedelta(minutes=15),
        online_window: dt.timedelta = dt.timedelta(minutes=15),
    ) -> None:
        self.db = db
        self.sites = sites
        self.agents = agents
        self.devices = devices
        self.first_contact = first_contact
        self.requests_per_minute = requests_per_minute
        self.failures_before_lockout = failures_before_lockout
        self.lockout = lockout
        self.online_window = online_window

    # -- the door --------------------------------------------------------------------------------------

    def enroll(
        self, req: SiteEnrollRequest, source_ip: str | None, endpoint: Endpoint, client_cert: bytes | None = None
    ) -> Outcome:
        actor = Actor.device(source_ip)
        code = _code_or_raw(req.site_code)
        uid_hash = hashlib.sha256(req.machine_uid.encode()).hexdigest()[:16]  # the audit keeps a hash, never the uid
        # Refusals are evidence: each is written in a transaction of its own that commits, then raised.
        with self.db.write() as s:
            refused = self._budget(s, actor, source_ip, code, uid_hash) or self._lockout(
                s, actor, source_ip, code, uid_hash
            )
        if refused is not None:
            keep_on_refusal()
            raise refused
        fields = validate_request(req.identity, with_machine_id=False)
        uid = _normalize_uid(req.machine_uid)
        csr = pki.check_csr(req.identity.csr_pem)
        with self.db.write() as s:
            verified, reason = self.sites.verify(s, code, req.enrollment_key)
            if verified is None:
                _refused(s, actor, code, reason, uid_hash)
                self._count_failure(s, actor, code)
        if verified is None:
            keep_on_refusal()
            raise KeyRefused(REFUSED)
        with self.db.write() as s:
            site = s.get(Site, verified.site.id, with_for_update=True)
            if site is None:
                raise KeyRefused(REFUSED)  # deleted a moment ago
            key = verified.key
            attempt = {
                "site": site.site_code,
                "key": shown(key.version, key.fingerprint),
                "machine_uid_hash": uid_hash,
                "hostname": fields["hostname"],
            }
            knock = Knock(
                door=Source.ENROLL,
                kind=MachineKind.AGENT,
                machine_uid=uid,
                source_ip=source_ip,
                facts={k: fields[k] for k in ("hostname", "fqdn", "ip_addresses", "os")},
            )
            existing = self.first_contact.find(s, knock, lock=True)
            if existing is None:
                return self._new(s, actor, site, key.version, knock, fields, req, csr, endpoint, attempt)
            proof = self._proof(s, existing, client_cert, req.agent_api_key)
            online_elsewhere = self._online_as_other(existing, fields["hostname"])
            if proof and not online_elsewhere:
                moved = existing.site_id != site.id
                return self._refresh(s, actor, existing, site, key.version, csr, endpoint, attempt, moved=moved)
            return self._collide(s, actor, existing, site, key.version, fields, req, csr, attempt, proof=proof)

    # -- the branches ----------------------------------------------------------------------------------

    def _new(
        self,
        s: Session,
        actor: Actor,
        site: Site,
        version: int,
        knock: Knock,
        fields: dict[str, Any],
        req: SiteEnrollRequest,
        csr: Any,
        endpoint: Endpoint,
        attempt: dict[str, Any],
    ) -> Outcome:
        self._check_limits(s, site)
        arrival = self.first_contact.arrive(s, knock)  # the budget of new machines per address applies here too
        device = arrival.device
        if not arrival.created:  # a racing enrollment made it a moment ago: this one is a collision with it
            return self._collide(s, actor, device, site, version, fields, req, csr, attempt, proof=False)
        device.site_id, device.key_version = site.id, version
        token, enrollment = self._waiting(s, actor, device, site, version, req.identity.csr_pem, csr)
        taken = s.scalar(
            select(Device.id).where(
                Device.status == DeviceStatus.APPROVED.value,
                Device.hostname == fields["hostname"],
                Device.id != device.id,
            )
        )
        if site.enrollment_policy != "auto-approve" or taken is not None:
            # An approved machine has this hostname already: an operator picks another, nothing is refused.
            why = "manual" if taken is None else "hostname_taken"
            audit.record(s, actor, "enroll.attempt", device, {**attempt, "result": "pending", "reason": why})
            if taken is None:
                self.first_contact.decide(s, device, knock)  # a rule may decide what the site's policy leaves
            return Outcome("pending", "pending", device.id, polling_token=token)
        approver = Actor.site(site.site_code)
        self.devices.approve_in(s, approver, device, DeviceChanges(), details={"site": site.site_code})
        serial = enrollment.certificate_serial
        cert = s.get(AgentCertificate, serial) if serial else None
        assert cert is not None
        s.delete(enrollment)  # handed out in this answer: nothing left to pick up
        api_key = self.agents.mint_api_key(s, device)
        audit.record(s, actor, "enroll.attempt", device, {**attempt, "result": "active", "reason": "new"})
        return Outcome("active", "new", device.id, bundle=self.agents.bundle(cert, endpoint, api_key))

    def _refresh(
        self,
        s: Session,
        actor: Actor,
        device: Device,
        site: Site,
        version: int,
        csr: Any,
        endpoint: Endpoint,
        attempt: dict[str, Any],
        *,
        moved: bool,
    ) -> Outcome:
        """Reuse or site move: the agent proved it holds the existing credential. Fresh certificate and key."""
        if device.status != DeviceStatus.APPROVED.value:
            raise Conflict("this agent is not approved: an operator decides it first")
        issuer = Actor.site(site.site_code)
        self.agents.revoke_all(s, issuer, device, "site move" if moved else "re-enrolled")
        previous = device.site_id
        device.site_id, device.key_version = site.id, version
        cert = self.agents.issue(s, issuer, device, csr.public_key(), reason="site_move" if moved else "reuse")
        api_key = self.agents.mint_api_key(s, device)
        if moved:
            old = s.get(Site, previous) if previous is not None else None
            audit.record(s, actor, "agent.site_moved", device, {**attempt, "from": old.site_code if old else None})
        outcome = "site_move" if moved else "reuse"
        audit.record(s, actor, "enroll.attempt", device, {**attempt, "result": "active", "reason": outcome})
        return Outcome("active", outcome, device.id, bundle=self.agents.bundle(cert, endpoint, api_key))

    def _collide(
        self,
        s: Session,
        actor: Actor,
        device: Device,
        site: Site,
        version: int,
        fields: dict[str, Any],
        req: SiteEnrollRequest,
        csr: Any,
        attempt: dict[str, Any],
        *,
        proof: bool,
    ) -> Outcome:
        """The claim waits at the gate; nothing is minted. One claim per machine at a time."""
        waiting = s.scalar(select(Enrollment).where(Enrollment.device_id == device.id))
        if waiting is not None:
            raise Conflict(
                "an enrollment for this machine already waits for an operator: keep polling with the saved token",
                "machine_uid",
            )
        self._check_limits(s, site, pending_only=True)
        claim = {**fields, "source_ip": actor.source_ip, "site": site.site_code, "key_version": version}
        token, _ = self._waiting(s, actor, device, site, version, req.identity.csr_pem, csr, claim=claim)
        reason = "online_as_other" if proof else "no_proof"
        audit.record(s, actor, "agent.collision", device, {**attempt, "reason": reason})
        audit.record(s, actor, "enroll.attempt", device, {**attempt, "result": "pending", "reason": "collision"})
        return Outcome("pending", "collision", device.id, polling_token=token)

    def _waiting(
        self,
        s: Session,
        actor: Actor,
        device: Device,
        site: Site,
        version: int,
        csr_pem: str,
        csr: Any,
        *,
        claim: dict[str, Any] | None = None,
    ) -> tuple[str, Enrollment]:
        """A pending enrollment of ``device`` with a fresh polling token (stored as its hash); with ``claim``, one
        held at the collision gate."""
        token = secrets.token_urlsafe(32)
        now = utcnow()
        enrollment = Enrollment(
            device_id=device.id,
            token_hash=token_hash(token),
            csr_pem=csr_pem,
            key_type=pki.key_type(csr.public_key()),
            status="pending",
            created_at=now,
            expires_at=now + self.agents.enrollment_ttl,
            source_ip=actor.source_ip,
            site_id=site.id,
            key_version=version,
            collision=claim is not None,
            claim=claim or {},
        )
        s.add(enrollment)
        s.flush()
        return token, enrollment

    # -- operators at the gate -------------------------------------------------------------------------

    def collisions(self) -> builtins.list[Collision]:
        with self.db.read() as s:
            rows = s.execute(
                select(Enrollment, Device, Site)
                .join(Device, Device.id == Enrollment.device_id)
                .outerjoin(Site, Site.id == Enrollment.site_id)
                .where(Enrollment.collision.is_(True), Enrollment.status == "pending")
                .order_by(Enrollment.id)
            ).all()
            return [
                Collision(e.id, d, dict(e.claim or {}), site.site_code if site else None, e.created_at, e.expires_at)
                for e, d, site in rows
            ]

    def resolve(self, actor: Actor, enrollment_id: int, action: str, hostname: str | None = None) -> Device:
        """``reject`` the claim; ``replace`` the existing agent by the claimant (its credentials revoked, the record
        handed over); or approve the claimant as a ``new`` machine of its own."""
        actor.require(UserRole.OPERATOR)
        with self.db.write() as s:
            row = s.get(Enrollment, enrollment_id, with_for_update=True)
            if row is None or not row.collision or row.status != "pending":
                raise NotFound(f"no collision {enrollment_id} waits at the gate")
            device = s.get(Device, row.device_id, with_for_update=True)
            assert device is not None
            claim = dict(row.claim or {})
            details = {"enrollment": row.id, "action": action, "claimed_hostname": claim.get("hostname")}
            if action == "reject":
                row.status = "rejected"
                audit.record(s, actor, "agent.collision_rejected", device, details)
                return device
            name = normalize_hostname(hostname) if hostname else claim.get("hostname")
            csr = pki.check_csr(row.csr_pem)
            if action == "replace":
                self.agents.revoke_all(s, actor, device, "replaced")
                device.facts = {k: claim.get(k) for k in ("hostname", "fqdn", "ip_addresses", "os")}
                device.addresses = list(claim.get("ip_addresses") or [])
                device.fqdn = None
                if name and name != device.hostname:
                    device.hostname = name  # the approved-hostname index refuses a name another machine holds
                device.site_id = row.site_id
                device.key_version = row.key_version
                cert = self.agents.issue(s, actor, device, csr.public_key(), reason="replace")
                row.collision, row.status, row.certificate_serial = False, "approved", cert.serial
                row.expires_at = utcnow() + self.agents.enrollment_ttl
                audit.record(s, actor, "agent.replaced", device, details)
                return device
            if action != "new":
                raise ValidationFailed("action is new, replace or reject", "action")
            twins = s.scalar(select(func.count()).where(Device.machine_uid.like(f"{device.machine_uid}%"))) or 1
            now = utcnow()
            # Core insert: the ORM would fill in the Talos role default for a None.
            twin_id = insert_ignoring_conflict(
                s,
                Device,
                {
                    "kind": MachineKind.AGENT.value,
                    "machine_uid": f"{device.machine_uid}:{twins}",  # told apart by its own credentials from now on
                    "status": DeviceStatus.PENDING.value,
                    "role": None,
                    "notes": "",
                    "source": Source.ENROLL.value,
                    "facts": {k: claim.get(k) for k in ("hostname", "fqdn", "ip_addresses", "os")},
                    "first_seen": now,
                    "last_seen": now,
                    "first_ip": claim.get("source_ip"),
                    "last_ip": claim.get("source_ip"),
                    "site_id": row.site_id,
                    "key_version": row.key_version,
                    "revision": 1,
                },
                returning=Device.id,
            )
            if twin_id is None:
                raise Conflict("that collision is being resolved by someone else: reload")
            twin = s.get(Device, twin_id)
            assert twin is not None
            row.device_id, row.collision = twin.id, False
            s.flush()
            audit.record(s, actor, "register", twin, {"source": "collision", "twin_of": device.id})
            changes = DeviceChanges(hostname=name) if name else DeviceChanges()
            self.devices.approve_in(s, actor, twin, changes, details={"collision_of": device.id})
            return twin

    # -- limits ----------------------------------------------------------------------------------------

    def _budget(
        self, s: Session, actor: Actor, source_ip: str | None, code: str, uid_hash: str
    ) -> TooManyAttempts | None:
        """Requests per address across every enrollment door, counted in the database (replicas share it)."""
        if not self.requests_per_minute or not source_ip:
            return None
        now = utcnow()
        n = refusals.tally(s, "enroll.request", source_ip, source_ip)
        if n > self.requests_per_minute:
            _refused(s, actor, code, "rate_limited", uid_hash)
            return TooManyAttempts(
                f"too many enrollment requests from {source_ip} this minute; try again shortly",
                max(1, 60 - now.second),
            )
        return None

    def _lockout(
        self, s: Session, actor: Actor, source_ip: str | None, code: str, uid_hash: str
    ) -> TooManyAttempts | None:
        """Refused keys lock out the (site code, address) pair, not the site: one host cannot lock a site out."""
        since = utcnow() - self.lockout
        failures, _oldest = refusals.count(s, "enroll.failed", since, subject=code, source_ip=source_ip or "")
        if failures >= self.failures_before_lockout:
            last = s.scalar(
                select(func.max(Refusal.last_at)).where(
                    Refusal.action == "enroll.failed",
                    Refusal.subject == code,
                    Refusal.source_ip == (source_ip or ""),
                )
            )
            wait = TooManyAttempts.seconds_until((last or utcnow()) + self.lockout, utcnow())
            _refused(s, actor, code, "locked", uid_hash)
            return TooManyAttempts(
                f"too many refused keys for site {code} from this address; try again in {-(-wait // 60)} minute(s)",
                wait,
            )
        return None

    @staticmethod
    def _count_failure(s: Session, actor: Actor, code: str) -> None:
        refusals.tally(s, "enroll.failed", code, actor.source_ip or "")

    @staticmethod
    def _check_limits(s: Session, site: Site, *, pending_only: bool = False) -> None:
        if site.max_pending is not None:
            pending = s.scalar(
                select(func.count()).where(Enrollment.site_id == site.id, Enrollment.status == "pending")
            )
            if (pending or 0) >= site.max_pending:
                raise Conflict(f"site {site.site_code} has {pending} enrollments waiting, its limit: ask an operator")
        if site.max_agents is not None and not pending_only:
            agents = s.scalar(
                select(func.count()).where(Device.site_id == site.id, Device.status != DeviceStatus.REJECTED.value)
            )
            if (agents or 0) >= site.max_agents:
                raise Conflict(f"site {site.site_code} has {agents} agents, its limit: an admin can raise it")

    # -- proof -----------------------------------------------------------------------------------------

    def _proof(self, s: Session, device: Device, client_cert: bytes | None, api_key: str | None) -> bool:
        """Whether the request proves it is the existing agent: its live certificate, or its live cak_ key."""
        if api_key and self.agents.api_key_owner(s, api_key) == device.id:
            return True
        if client_cert:
            try:
                owner, _cert = self.agents.authenticate(s, client_cert, api_key)
            except KtizoError:
                return False
            return owner.id == device.id
        return False

    def _online_as_other(self, device: Device, hostname: str) -> bool:
        """The existing agent checked in lately under another hostname: a second live machine, not a re-install."""
        if device.last_seen is None or device.status != DeviceStatus.APPROVED.value:
            return False
        recent = utcnow() - device.last_seen <= self.online_window
        checked_in = bool((device.facts or {}).get("checked_in"))
        return recent and checked_in and bool(device.hostname) and device.hostname != hostname


def _refused(s: Session, actor: Actor, code: str, reason: str, uid_hash: str) -> None:
    """``enroll.attempt`` refused, counted per site code, address and minute (the first of each minute audited)."""
    details = {"result": "refused", "reason": reason, "site": code, "machine_uid_hash": uid_hash}
    refusals.refuse(s, actor, "enroll.attempt", code, None, details)


def _normalize_uid(value: str) -> str:
    text = value.strip().lower() if isinstance(value, str) else ""
    if not _UID.fullmatch(text):
        raise ValidationFailed("machine_uid is 64 hex digits (SHA-256 of the machine-id and the CA pin)", "machine_uid")
    return text


def _code_or_raw(value: str) -> str:
    """The site code as counted by the lockout: normalised when it is one, else a bounded form of what was sent."""
    try:
        return normalize_site_code(value)
    except ValidationFailed:
        return (value or "")[:64].strip().lower() or "?"
