"""A small, faithful Ktizo for the agent's tests: the public enrollment door over plain HTTP and the agent door over
real mutual TLS, with a CA made here. It keeps the contract's promises (a bundle is handed out once; 202, 403, 404,
409, 429 where Ktizo gives them) and lets a test script the operator (approve, reject, purge, revoke) and the odd
misbehaviour (throttling, tampered bundles).

Site enrollment (``POST /api/enroll``, seed 004) too: a table of sites with their ``cek_`` key and policy, a strict
body (unknown fields refused), one 401 for every kind of bad site or key, lockout per (site, IP) with 429, 409
when a site is full, dedup on machine_uid (new; reuse or site_move with the agent's ``cak_`` key as proof; a
collision without it, held as pending and minting nothing), ``cak_`` keys minted per agent (the old one revoked),
and the mTLS door checking ``Authorization: Bearer cak_…`` as Ktizo does: an agent with a key must show it."""

from __future__ import annotations

import datetime as dt
import http.server
import ipaddress
import json
import re
import secrets
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MANAGER_URI = "urn:ktizo:manager"
_MACHINE_ID = re.compile(r"[0-9a-f]{32}")
_MACHINE_UID = re.compile(r"[0-9a-f]{64}")
SITE_FIELDS = {"site_code", "enrollment_key", "machine_uid", "hostname", "fqdn", "ip_addresses", "os", "csr_pem"}
SITE_OPTIONAL = {"agent_api_key"}
BAD_KEY = "unknown site, or a wrong, rotated, expired or used-up enrollment key"


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(moment: dt.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_der(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


class CA:
    """A CA like Ktizo's agent CA (P-256, path length 0), issuing the profiles Ktizo does."""

    def __init__(self, name: str = "Ktizo agent CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ktizo"), x509.NameAttribute(NameOID.COMMON_NAME, name)]
        )
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now() - dt.timedelta(minutes=5))
            .not_valid_after(now() + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> str:
        return pem(self.cert)

    @property
    def fingerprint(self) -> str:
        import hashlib

        return "sha256:" + hashlib.sha256(self.cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    def issue(
        self,
        public_key: Any,
        *,
        cn: str,
        dns: list[str] | tuple[str, ...] = (),
        ips: list[str] | tuple[str, ...] = (),
        uris: list[str] | tuple[str, ...] = (),
        days: float = 30.0,
        not_before: dt.datetime | None = None,
        server: bool = True,
        client: bool = True,
    ) -> x509.Certificate:
        start = not_before or now() - dt.timedelta(minutes=5)
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [ExtendedKeyUsageOID.CLIENT_AUTH] * client
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dict.fromkeys(dns)]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in dict.fromkeys(ips)]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def write_pair(self, directory: Path, name: str, **kwargs: Any) -> tuple[Path, Path]:
        """A fresh key and a certificate for it as files (for TLS clients and listeners in tests)."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.issue(key.public_key(), cn=name, **kwargs)
        cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
        cert_file.write_text(pem(cert))
        key_file.write_bytes(key_pem(key))
        return cert_file, key_file


@dataclass
class Record:
    token: str
    machine_id: str  # a site enrollment's machine_uid
    request: dict[str, Any]
    public_key: Any
    state: str = "pending"  # pending | approved | rejected
    cert: x509.Certificate | None = None
    picked: bool = False
    polls: int = 0
    site: str | None = None  # a site enrollment held for an admin: its pickup carries a fresh cak_ key
    outcome: str | None = None  # new | reuse | site_move | collision


@dataclass
class Site:
    code: str
    key: str
    policy: str = "auto-approve"  # | manual
    max_agents: int | None = None
    max_pending: int | None = None


@dataclass
class SiteAgent:
    id: int
    machine_uid: str
    site: str
    request: dict[str, Any]
    api_key: str | None = None  # the live cak_ key; minting another revokes it


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: Any
    raw: bytes
    headers: dict[str, str]
    peer: bytes | None
    client_ip: str


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


HANG_UP = Reply(0, None)


class FakeManager:
    def __init__(
        self, workdir: Path, *, poll_interval: float = 0.02, cert_days: float = 30.0, public_tls: bool = False
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca = CA()
        self.poll_interval = poll_interval
        self.cert_days = cert_days
        self.checkin_interval: float = 60
        self.addresses = ["127.0.0.1"]
        self.cond = threading.Condition()
        self.records: dict[str, Record] = {}
        self.issued: dict[int, str] = {}  # serial -> machine_id
        self.revoked: set[str] = set()
        # What happened, for the tests to check.
        self.enroll_posts = 0
        self.status_polls = 0
        self.checkins: list[dict[str, Any]] = []
        self.renewals: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every call on the public door
        self.site_posts: list[Request] = []  # every POST /api/enroll as it came (raw bytes and headers too)
        self.site_answers: list[Reply] = []
        # Sites (seed 004).
        self.sites: dict[str, Site] = {}
        self.site_agents: dict[str, SiteAgent] = {}  # by machine_uid
        self.api_keys: dict[str, str] = {}  # live cak_ key -> machine_uid
        self.failures: dict[tuple[str, str], int] = {}  # (site_code, ip) -> failed attempts
        self.lockout_after = 5
        self.lockout_seconds = "30"
        self.throttle_site = 0  # answer 429 (rate limited) this many times
        self.site_override: Reply | None = None
        self._next_id = 0
        # The operator and the weather, scripted.
        self.approve_after: int | None = None  # approve on the Nth poll of a record
        self.reject_after: int | None = None
        self.purge_after: int | None = None
        self.throttle_enroll = 0
        self.throttle_status = 0
        self.fail_status = 0  # answer 503
        self.drop_status = 0  # hang up without answering: a network failure as the agent sees it
        self.retry_after = "0"
        self.enroll_override: Reply | None = None
        self.tamper: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self.tamper_renew: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self.renew_soon = False  # the next check-in says "renew now"

        self.public = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, self._route_public))
        listener_cert, listener_key = self.ca.write_pair(
            workdir, "ktizo-listener", dns=["localhost"], ips=["127.0.0.1"], client=False
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=self.ca.pem)
        context.load_cert_chain(listener_cert, listener_key)
        self.mtls = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, self._route_mtls))
        self.mtls.socket = context.wrap_socket(self.mtls.socket, server_side=True)
        self.public_tls = public_tls
        if public_tls:  # the public door behind TLS with a certificate the system does not trust (a private CA)
            public = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            public.load_cert_chain(listener_cert, listener_key)
            self.public.socket = public.wrap_socket(self.public.socket, server_side=True)
        self._threads = [
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
            for s in (self.public, self.mtls)
        ]

    @property
    def url(self) -> str:
        return f"{'https' if self.public_tls else 'http'}://127.0.0.1:{self.public.server_address[1]}"

    @property
    def mtls_url(self) -> str:
        return f"https://127.0.0.1:{self.mtls.server_address[1]}"

    def start(self) -> FakeManager:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        for server in (self.public, self.mtls):
            server.shutdown()
            server.server_close()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError("the fake manager never saw what the test waited for")

    # -- the operator --------------------------------------------------------------------------------

    def _record_for(self, machine_id: str) -> Record:
        return next(r for r in self.records.values() if r.machine_id == machine_id and not r.picked)

    def approve(self, machine_id: str) -> None:
        with self.cond:
            self._approve(self._record_for(machine_id))

    def _approve(self, record: Record) -> None:
        request = record.request
        names = [n for n in (request["hostname"], request.get("fqdn")) if n]
        record.cert = self.ca.issue(
            record.public_key, cn=request["hostname"], dns=names, ips=request["ip_addresses"], days=self.cert_days
        )
        self.issued[record.cert.serial_number] = record.machine_id
        record.state = "approved"

    def revoke(self, machine_id: str) -> None:
        with self.cond:
            self.revoked.add(machine_id)

    def add_site(self, code: str, **kwargs: Any) -> Site:
        site = Site(code, "cek_" + secrets.token_urlsafe(32), **kwargs)
        self.sites[code] = site
        return site

    def rotate_key(self, code: str) -> str:
        with self.cond:
            self.sites[code].key = "cek_" + secrets.token_urlsafe(32)
            return self.sites[code].key

    def _mint(self, agent: SiteAgent) -> str:
        if agent.api_key is not None:
            self.api_keys.pop(agent.api_key, None)  # revoked the moment the next one exists
        agent.api_key = f"cak_{agent.id}_{secrets.token_urlsafe(32)}"
        self.api_keys[agent.api_key] = agent.machine_uid
        return agent.api_key

    def bundle(self, cert: x509.Certificate) -> dict[str, Any]:
        return {
            "ca_crt": self.ca.pem,
            "server_crt": pem(cert),
            "chain": pem(cert) + self.ca.pem,
            "not_after": iso(cert.not_valid_after_utc),
            "manager_addresses": list(self.addresses),
            "mtls_url": self.mtls_url,
        }

    # -- the public door -----------------------------------------------------------------------------

    def _route_public(self, request: Request) -> Reply:
        method, path, body = request.method, request.path, request.body
        with self.cond:
            self.requests.append((method, path))
        if method == "GET" and path == "/api/v1/pki/ca.pem":
            return Reply(200, self.ca.pem, {"Content-Type": "application/x-pem-file"})
        if method == "POST" and path == "/api/v1/enroll":
            return self._enroll(body)
        if method == "POST" and path == "/api/enroll":
            reply = self._site_enroll(request)
            with self.cond:
                self.site_answers.append(reply)
                self.cond.notify_all()
            return reply
        if method == "GET" and path.startswith("/api/v1/enroll/status/"):
            return self._status(path.rsplit("/", 1)[1])
        return Reply(404, {"detail": "not found"})

    # -- site enrollment ---------------------------------------------------------------------------------

    def _site_enroll(self, request: Request) -> Reply:
        body = request.body
        with self.cond:
            self.site_posts.append(request)
            self.cond.notify_all()
            if self.site_override is not None:
                return self.site_override
            if self.throttle_site:
                self.throttle_site -= 1
                return Reply(429, {"detail": "too many requests"}, {"Retry-After": self.retry_after})
        problem = _site_body_problem(body)
        if problem:
            return Reply(400, {"detail": problem})
        try:
            csr = x509.load_pem_x509_csr(body["csr_pem"].encode())
            assert csr.is_signature_valid
        except (ValueError, AssertionError):
            return Reply(400, {"detail": "csr_pem: not a CSR signed by its key"})
        code, uid, proof = body["site_code"], body["machine_uid"], body.get("agent_api_key")
        with self.cond:
            attempt = (code, request.client_ip)
            if self.failures.get(attempt, 0) >= self.lockout_after:
                return Reply(429, {"detail": "locked out: too many failures"}, {"Retry-After": self.lockout_seconds})
            site = self.sites.get(code)
            if site is None or not secrets.compare_digest(site.key.encode(), body["enrollment_key"].encode()):
                self.failures[attempt] = self.failures.get(attempt, 0) + 1
                return Reply(401, {"detail": BAD_KEY})
            self.failures.pop(attempt, None)
            known = self.site_agents.get(uid)
            proven = (
                known is not None and isinstance(proof, str) and known.api_key is not None and proof == known.api_key
            )
            if known is None:
                outcome = "new"
                if site.max_agents is not None and self._active(code) >= site.max_agents:
                    return Reply(409, {"detail": f"site {code} is full ({site.max_agents} agents)"})
            elif proven:
                outcome = "reuse" if known.site == code else "site_move"
            else:
                outcome = "collision"
            if outcome == "collision" or site.policy == "manual":
                pending = sum(1 for r in self.records.values() if r.site == code and r.state == "pending")
                if site.max_pending is not None and pending >= site.max_pending:
                    return Reply(409, {"detail": f"site {code} has too many pending agents"})
                token = secrets.token_urlsafe(32)
                self.records[token] = Record(token, uid, body, csr.public_key(), site=code, outcome=outcome)
                return Reply(
                    202,
                    {
                        "enrollment_state": "pending",
                        "polling_token": token,
                        "poll_interval_seconds": self.poll_interval,
                    },
                )
            agent = self._site_agent(uid, code, body)
            record = Record(secrets.token_urlsafe(16), uid, body, csr.public_key(), picked=True, outcome=outcome)
            self.records[record.token] = record
            self._approve(record)
            assert record.cert is not None
            return Reply(
                201,
                {
                    "enrollment_state": "active",
                    "outcome": outcome,
                    "agent_id": agent.id,
                    "agent_api_key": self._mint(agent),
                    **self.bundle(record.cert),
                },
            )

    def _active(self, code: str) -> int:
        return sum(1 for agent in self.site_agents.values() if agent.site == code)

    def _site_agent(self, uid: str, code: str, body: dict[str, Any]) -> SiteAgent:
        agent = self.site_agents.get(uid)
        if agent is None:
            self._next_id += 1
            agent = self.site_agents[uid] = SiteAgent(self._next_id, uid, code, body)
        agent.site, agent.request = code, body
        return agent

    def _enroll(self, body: Any) -> Reply:
        with self.cond:
            self.enroll_posts += 1
            self.cond.notify_all()
            if self.enroll_override is not None:
                return self.enroll_override
            if self.throttle_enroll:
                self.throttle_enroll -= 1
                return Reply(429, {"detail": "too many requests"}, {"Retry-After": self.retry_after})
        if not isinstance(body, dict):
            return Reply(400, {"detail": "the body must be a JSON object"})
        errors = []
        for name, kind in (
            ("machine_id", str),
            ("hostname", str),
            ("ip_addresses", list),
            ("os", dict),
            ("csr_pem", str),
        ):
            if not isinstance(body.get(name), kind):
                errors.append({"loc": ["body", name], "msg": "Field required", "type": "missing"})
        if errors:
            return Reply(422, {"detail": errors})
        if not _MACHINE_ID.fullmatch(body["machine_id"]):
            return Reply(422, {"detail": [{"loc": ["body", "machine_id"], "msg": "not 32 hex digits"}]})
        try:
            csr = x509.load_pem_x509_csr(body["csr_pem"].encode())
            assert csr.is_signature_valid
        except (ValueError, AssertionError):
            return Reply(422, {"detail": [{"loc": ["body", "csr_pem"], "msg": "not a CSR signed by its key"}]})
        with self.cond:
            live = [r for r in self.records.values() if r.machine_id == body["machine_id"] and not r.picked]
            if live:
                return Reply(409, {"detail": "this machine-id already has a live enrollment"})
            token = secrets.token_urlsafe(32)
            self.records[token] = Record(token, body["machine_id"], body, csr.public_key())
            return Reply(202, {"polling_token": token, "poll_interval_seconds": self.poll_interval})

    def _status(self, token: str) -> Reply:
        with self.cond:
            self.status_polls += 1
            self.cond.notify_all()
            if self.throttle_status:
                self.throttle_status -= 1
                return Reply(429, {"detail": "too many requests"}, {"Retry-After": self.retry_after})
            if self.fail_status:
                self.fail_status -= 1
                return Reply(503, {"detail": "the database is away"})
            if self.drop_status:
                self.drop_status -= 1
                return HANG_UP
            record = self.records.get(token)
            if record is None or record.picked:
                return Reply(404, {"detail": "unknown polling token"})
            record.polls += 1
            if self.purge_after is not None and record.polls >= self.purge_after:
                del self.records[token]
                return Reply(404, {"detail": "unknown polling token"})
            if self.reject_after is not None and record.polls >= self.reject_after:
                record.state = "rejected"
            if self.approve_after is not None and record.polls >= self.approve_after and record.state == "pending":
                self._approve(record)
            if record.state == "rejected":
                return Reply(403, {"detail": "an operator rejected this enrollment"})
            if record.state == "pending":
                return Reply(202, {"status": "pending", "poll_interval_seconds": self.poll_interval})
            assert record.cert is not None
            record.picked = True  # handed out once: the token dies with the pickup
            bundle = self.bundle(record.cert)
            if record.site is not None:  # approved by an admin: the agent (a new one, or the one it moves) is active
                agent = self._site_agent(record.machine_id, record.site, record.request)
                bundle = {**bundle, "agent_id": agent.id, "agent_api_key": self._mint(agent)}
            return Reply(200, self.tamper(bundle) if self.tamper else bundle)

    # -- the agent door (mTLS) -----------------------------------------------------------------------

    def _agent(self, peer: bytes | None) -> tuple[str, x509.Certificate] | None:
        if not peer:
            return None
        cert = x509.load_der_x509_certificate(peer)
        machine_id = self.issued.get(cert.serial_number)
        if machine_id is None or machine_id in self.revoked:
            return None
        return machine_id, cert

    def _route_mtls(self, request: Request) -> Reply:
        method, path, body = request.method, request.path, request.body
        authorization = request.headers.get("authorization")
        with self.cond:
            who = self._agent(request.peer)
            if who is not None:
                scheme, _, presented = (authorization or "").partition(" ")
                presented = presented.strip() if scheme.lower() == "bearer" else ""
                agent = self.site_agents.get(who[0])
                holds = agent is not None and agent.api_key is not None
                if (presented or holds) and self.api_keys.get(presented) != who[0]:
                    return Reply(
                        403, {"detail": "this agent's API key (Authorization: Bearer cak_…) is missing or wrong"}
                    )
        if who is None:
            return Reply(403, {"detail": "this certificate is revoked or unknown: enroll the host again"})
        machine_id, cert = who
        if method == "POST" and path == "/api/v1/agent/checkin":
            if not isinstance(body, dict) or not isinstance(body.get("facts"), dict):
                return Reply(422, {"detail": [{"loc": ["body", "facts"], "msg": "Field required"}]})
            renew_after = cert.not_valid_before_utc + (cert.not_valid_after_utc - cert.not_valid_before_utc) * 2 / 3
            with self.cond:
                if self.renew_soon:
                    self.renew_soon, renew_after = False, now() - dt.timedelta(seconds=1)
                self.checkins.append(
                    {"machine_id": machine_id, "serial": cert.serial_number, "authorization": authorization, **body}
                )
                self.cond.notify_all()
            return Reply(
                200,
                {
                    "status": "approved",
                    "checkin_interval_seconds": self.checkin_interval,
                    "renew_after": iso(renew_after),
                    "not_after": iso(cert.not_valid_after_utc),
                },
            )
        if method == "POST" and path == "/api/v1/agent/renew":
            try:
                csr = x509.load_pem_x509_csr(str(body["csr_pem"]).encode())
                assert csr.is_signature_valid
            except (ValueError, AssertionError, KeyError, TypeError):
                return Reply(422, {"detail": [{"loc": ["body", "csr_pem"], "msg": "not a CSR signed by its key"}]})
            if public_der(csr.public_key()) == public_der(cert.public_key()):
                return Reply(422, {"detail": [{"loc": ["body", "csr_pem"], "msg": "renewal needs a new key"}]})
            record = next(r for r in reversed(self.records.values()) if r.machine_id == machine_id)
            names = [n for n in (record.request["hostname"], record.request.get("fqdn")) if n]
            new = self.ca.issue(
                csr.public_key(),
                cn=record.request["hostname"],
                dns=names,
                ips=record.request["ip_addresses"],
                days=self.cert_days,
            )
            with self.cond:
                self.issued[new.serial_number] = machine_id
                self.renewals.append(
                    {"old_serial": cert.serial_number, "new_serial": new.serial_number, "authorization": authorization}
                )
                self.cond.notify_all()
            bundle = self.bundle(new)
            return Reply(200, self.tamper_renew(bundle) if self.tamper_renew else bundle)
        return Reply(404, {"detail": "not found"})


def _site_body_problem(body: Any) -> str | None:
    """What a strict model (extra fields forbidden) would say about a site enrollment body, or None."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    unknown = sorted(set(body) - SITE_FIELDS - SITE_OPTIONAL)
    if unknown:
        return f"unknown fields: {', '.join(unknown)}"
    missing = sorted(SITE_FIELDS - set(body))
    if missing:
        return f"missing fields: {', '.join(missing)}"
    for name in ("site_code", "enrollment_key", "machine_uid", "hostname", "fqdn", "csr_pem"):
        if not isinstance(body[name], str):
            return f"{name}: must be a string"
    if "agent_api_key" in body and not isinstance(body["agent_api_key"], str | None):
        return "agent_api_key: must be a string"
    if not _MACHINE_UID.fullmatch(body["machine_uid"]):
        return "machine_uid: 64 lower-case hex digits"
    if not isinstance(body["ip_addresses"], list) or not all(isinstance(i, str) for i in body["ip_addresses"]):
        return "ip_addresses: a list of strings"
    os_ = body["os"]
    if not isinstance(os_, dict) or set(os_) != {"id", "version", "kernel"}:
        return "os: an object with id, version and kernel, nothing else"
    return None


def _handler(manager: FakeManager, route: Callable[[Request], Reply]) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        wbufsize = 64 * 1024  # headers and body in one segment: two small writes meet Nagle and delayed ACKs

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = ValueError
            peer = self.connection.getpeercert(binary_form=True) if isinstance(self.connection, ssl.SSLSocket) else None
            if body is ValueError:
                reply = Reply(400, {"detail": "the body is not JSON"})
            else:
                headers = {name.lower(): value for name, value in self.headers.items()}
                reply = route(Request(self.command, self.path, body, raw, headers, peer, self.client_address[0]))
            if reply is HANG_UP:
                self.close_connection = True
                return
            data = reply.body.encode() if isinstance(reply.body, str) else json.dumps(reply.body).encode()
            self.send_response(reply.status)
            headers = {"Content-Type": "application/json", **reply.headers}
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

        do_GET = do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
