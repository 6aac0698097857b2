"""Ktizo's agent CA as a service: made on first use (one row, every replica agrees on it), its key sealed at rest,
the CRL, and the certificates Ktizo itself presents (its mTLS listener's, and the manager identity it probes
agents with). The CA's key never leaves this module's callers in the services layer."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import func, select

from ktizo.db import Database
from ktizo.db.models import AgentCertificate
from ktizo.db.models import Authority as AuthorityRow
from ktizo.db.types import utcnow
from ktizo.pki import authority as pki
from ktizo.pki.authority import Authority
from ktizo.pki.certs import cert_pem
from ktizo.pki.sealing import Sealer
from ktizo.services import audit
from ktizo.services.context import Actor
from ktizo.services.first_contact import insert_ignoring_conflict

CRL_HOURS = 24.0
CRL_REISSUE = dt.timedelta(hours=CRL_HOURS / 2)  # a cached CRL is signed afresh this often, well before nextUpdate
LISTENER_DAYS = 30.0
MANAGER_DAYS = 1.0


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for an ``ssl.SSLContext``: a certificate (with the CA after it), its key, and the CA alone."""

    cert: Path
    key: Path
    ca: Path


class AuthorityService:
    def __init__(self, db: Database, sealer: Sealer) -> None:
        self.db = db
        self.sealer = sealer
        self._cached: Authority | None = None
        self._crl: tuple[int, x509.CertificateRevocationList] | None = None
        self._lock = threading.Lock()

    # -- the CA ----------------------------------------------------------------------------------------

    def authority(self) -> Authority:
        """The agent CA, created (and audited) on first use; concurrent first uses on several replicas make one."""
        cached = self._cached
        if cached is not None:
            return cached
        with self._lock:
            if self._cached is None:
                self._cached = self._load_or_create()
            return self._cached

    def init(self, actor: Actor) -> tuple[Authority, bool]:
        """``ktizo pki init``: the CA, and whether this call made it."""
        with self.db.read() as s:
            existed = s.get(AuthorityRow, 1) is not None
        ca = self._load_or_create(actor)
        self._cached = ca
        return ca, not existed

    def _load_or_create(self, actor: Actor | None = None) -> Authority:
        with self.db.read() as s:
            row = s.get(AuthorityRow, 1)
            if row is not None:
                return pki.load_authority(row.cert_pem, self.sealer.open(row.key))
        ca, key_pem = pki.new_authority(utcnow())
        with self.db.write() as s:
            values = {
                "id": 1,
                "cert_pem": ca.cert_pem,
                "key": self.sealer.seal(key_pem),
                "fingerprint": ca.fingerprint,
                "created_at": utcnow(),
            }
            if insert_ignoring_conflict(s, AuthorityRow, values, returning=AuthorityRow.id) is not None:
                audit.record(
                    s,
                    actor or Actor.system("pki"),
                    "ca_create",
                    None,
                    {"fingerprint": ca.fingerprint, "sealed": self.sealer.enabled},
                )
                return ca
            row = s.get(AuthorityRow, 1)
            assert row is not None
            return pki.load_authority(row.cert_pem, self.sealer.open(row.key))

    def ca_pem(self) -> str:
        return self.authority().cert_pem

    def fingerprint(self) -> str:
        return self.authority().fingerprint

    # -- revocation ------------------------------------------------------------------------------------

    def crl(self) -> x509.CertificateRevocationList:
        """The CA's CRL: every revoked certificate that has not expired yet.

        Its number is derived, not counted: the time of the latest revocation, or the start of the current
        half-validity window when that is later (microseconds since the epoch). It grows with every revocation and
        every reissue, every replica computes the same one, and fetching the CRL (an unauthenticated door) writes
        nothing; the signed CRL is kept per process until its number moves."""
        now = utcnow()
        with self.db.read() as s:
            latest = s.scalar(select(func.max(AgentCertificate.revoked_at)))
        window = _window_start(now, CRL_REISSUE)
        number = int(max(latest or window, window).timestamp() * 1_000_000)
        cached = self._crl
        if cached is not None and cached[0] == number:
            return cached[1]
        with self.db.read() as s:
            revoked = s.execute(
                select(AgentCertificate.serial, AgentCertificate.revoked_at).where(
                    AgentCertificate.revoked_at.is_not(None), AgentCertificate.not_after > now
                )
            ).all()
        crl = pki.crl(
            self.authority(),
            ((int(serial, 16), when) for serial, when in revoked if when is not None),
            number=number,
            now=now,
            hours=CRL_HOURS,
        )
        self._crl = (number, crl)
        return crl

    def crl_der(self) -> bytes:
        return self.crl().public_bytes(serialization.Encoding.DER)

    def crl_pem(self) -> bytes:
        return self.crl().public_bytes(serialization.Encoding.PEM)

    # -- Ktizo's own certificates ----------------------------------------------------------------------

    def listener_files(self, directory: Path, names: list[str]) -> TlsFiles:
        """A certificate for Ktizo's mTLS listener naming ``names`` (DNS names and addresses), written with its key
        (0600) and the CA into ``directory``. Made afresh at each start: nothing to rotate, nothing stored."""
        ca = self.authority()
        key = pki.new_key()
        dns = [n for n in names if not is_ip(n)]
        ips = [n for n in names if is_ip(n)]
        cert = pki.issue(
            ca,
            key.public_key(),
            common_name=(dns or ips or ["ktizo"])[0],
            dns_names=dns,
            ip_addresses=ips,
            uris=[pki.MANAGER_URI],
            now=utcnow(),
            days=LISTENER_DAYS,
        )
        return _write_tls(directory, "listener", cert, key, ca)

    def manager_files(self, directory: Path) -> TlsFiles:
        """Ktizo's manager identity (URI SAN ``urn:ktizo:manager``, client auth only, one day) for probing agents."""
        ca = self.authority()
        key = pki.new_key()
        cert = pki.issue(
            ca,
            key.public_key(),
            common_name="Ktizo manager",
            uris=[pki.MANAGER_URI],
            now=utcnow(),
            days=MANAGER_DAYS,
            server=False,
        )
        return _write_tls(directory, "manager", cert, key, ca)


def _window_start(moment: dt.datetime, width: dt.timedelta) -> dt.datetime:
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return epoch + ((moment - epoch) // width) * width


def listener_names(host: str, public_url: str | None, extra: list[str]) -> list[str]:
    """What the mTLS listener's certificate names: the public URL's host, the bind address unless it is a wildcard,
    this machine's name and addresses, and the operator's extra names."""
    from urllib.parse import urlsplit

    names: list[str] = []
    if public_url:
        public_host = urlsplit(public_url).hostname
        if public_host:
            names.append(public_host)
    if host not in ("0.0.0.0", "::", ""):  # noqa: S104 - comparing, not binding
        names.append(host)
    names += extra
    names += ["localhost", "127.0.0.1", socket.gethostname()]
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            names.append(str(info[4][0]))
    except OSError:
        pass
    names += _interface_addresses()
    return list(dict.fromkeys(n.strip("[]") for n in names if n))


def _interface_addresses() -> list[str]:
    """Every IPv4 address on this machine's interfaces (so agents can reach Ktizo by any of them)."""
    import fcntl
    import struct

    found: list[str] = []
    try:
        interfaces = [name for _index, name in socket.if_nameindex()]
    except OSError:
        return found
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name in interfaces:
            try:
                packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            found.append(socket.inet_ntoa(packed[20:24]))
    return found


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _write_tls(directory: Path, name: str, cert: x509.Certificate, key: object, ca: Authority) -> TlsFiles:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path, ca_path = directory / f"{name}.pem", directory / f"{name}.key.pem", directory / "ca.pem"
    _write_private(key_path, pki.key_pem(key))  # type: ignore[arg-type]
    _write_private(cert_path, cert_pem(cert) + ca.cert_pem.encode())
    _write_private(ca_path, ca.cert_pem.encode())
    return TlsFiles(cert=cert_path, key=key_path, ca=ca_path)


def _write_private(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
