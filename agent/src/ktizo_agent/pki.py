"""Keys, CSRs, CA fingerprints, and the checks a certificate bundle from Ktizo must pass before anything is written.

The key is made here and never leaves the host; Ktizo returns a certificate for it. A bundle is installed only
if its CA is the pinned one, the certificate is for our key, signed by that CA, and valid now."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import logging
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ktizo_agent.errors import AgentError

log = logging.getLogger(__name__)

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
KEY_TYPES = ("p256", "ed25519", "rsa2048", "rsa3072", "rsa4096")
DEFAULT_KEY_TYPE = "p256"
# A freshly booted host's clock may lag; Ktizo backdates by as much, so this only absorbs the odd few minutes.
CLOCK_SKEW = dt.timedelta(minutes=5)
_BEGIN_CERT = "-----BEGIN CERTIFICATE-----"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class BadBundle(AgentError):
    """What Ktizo handed over cannot be installed."""


# -- keys and CSRs -------------------------------------------------------------------------------------


def generate_key(kind: str) -> PrivateKey:
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind in ("rsa2048", "rsa3072", "rsa4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[3:]))
    raise ValueError(f"unknown key type {kind!r}: one of {', '.join(KEY_TYPES)}")


def key_kind(key: PrivateKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "p256" if isinstance(key.curve, ec.SECP256R1) else f"ec-{key.curve.name}"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    return f"rsa{key.key_size}"


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key(path: Path) -> PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AgentError(f"cannot read the key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise AgentError(f"{path} is not a readable unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        raise AgentError(f"{path} holds a {type(key).__name__}: the agent uses P-256, Ed25519 or RSA keys")
    return key


def public_der(key: Any) -> bytes:
    return bytes(
        key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
    )


def key_fingerprint(key: PrivateKey) -> str:
    """``sha256:<hex>`` of the public key, for the operator to compare with what Ktizo shows for the request."""
    return "sha256:" + hashlib.sha256(public_der(key.public_key())).hexdigest()


def build_csr(key: PrivateKey, hostname: str, fqdn: str | None) -> str:
    """A CSR with CN = hostname and DNS SANs for the names (Ktizo builds the certificate from its own record and
    ignores both; they only help an operator reading the request)."""
    sans: list[x509.GeneralName] = []
    for name in dict.fromkeys(n for n in (hostname, fqdn) if n):
        try:
            sans.append(x509.DNSName(name))
        except ValueError:  # not an A-label; the CN still carries it
            continue
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


# -- fingerprints ---------------------------------------------------------------------------------------


def fingerprint(cert: x509.Certificate) -> str:
    """``sha256:<64 hex>`` over the DER, as ``ktizo pki fingerprint`` prints it."""
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """``sha256:<lower hex>`` from what a person pasted: either case, with or without ``sha256:``, with or without
    the colons ``openssl x509 -fingerprint`` puts between bytes."""
    value = text.strip().lower()
    for prefix in ("sha256:", "sha256="):
        if value.startswith(prefix):
            value = value[len(prefix) :]
            break
    value = value.replace(":", "")
    if not _HEX64.fullmatch(value):
        raise ValueError("a CA fingerprint is sha256: followed by 64 hex digits")
    return "sha256:" + value


def same_fingerprint(a: str, b: str) -> bool:
    return hmac.compare_digest(normalize_fingerprint(a).encode(), normalize_fingerprint(b).encode())


# -- certificates ---------------------------------------------------------------------------------------


def load_one_certificate(text: Any, what: str) -> x509.Certificate:
    """Exactly one PEM certificate; a second block would be silently ignored by most readers, so refuse it."""
    if not isinstance(text, str) or text.count(_BEGIN_CERT) != 1:
        raise ValueError(f"{what} must be exactly one PEM certificate")
    try:
        return x509.load_pem_x509_certificate(text.encode())
    except ValueError as exc:
        raise ValueError(f"{what} is not a readable certificate ({exc})") from None


def load_certificate_file(path: Path) -> x509.Certificate:
    try:
        return load_one_certificate(path.read_text(encoding="ascii", errors="replace"), str(path))
    except OSError as exc:
        raise AgentError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise AgentError(str(exc)) from None


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def renewal_due(cert: x509.Certificate) -> dt.datetime:
    """Two thirds into the certificate's life (step-ca's rule): late enough not to churn, early enough that a
    Ktizo outage of a third of the lifetime goes unnoticed."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * 2 / 3


def iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def parse_iso(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


# -- the bundle -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    """A bundle that passed every check: what to install, and what to remember about the manager."""

    raw: dict[str, Any]
    ca: x509.Certificate
    cert: x509.Certificate
    manager_addresses: list[str]
    mtls_url: str | None

    @property
    def ca_pem(self) -> bytes:
        return cert_pem(self.ca)

    @property
    def cert_pem(self) -> bytes:
        return cert_pem(self.cert)


def check_bundle(body: Any, *, key: PrivateKey, pin: str, now: dt.datetime) -> Bundle:
    """The bundle if it is safe to install, else ``BadBundle`` saying why (and nothing has been written)."""
    if not isinstance(body, dict):
        raise BadBundle("Ktizo's approval carried no certificate bundle")
    try:
        ca = load_one_certificate(body.get("ca_crt"), "ca_crt")
        cert = load_one_certificate(body.get("server_crt"), "server_crt")
    except ValueError as exc:
        raise BadBundle(f"the bundle from Ktizo is malformed: {exc}") from None
    seen = fingerprint(ca)
    if not same_fingerprint(seen, pin):
        raise BadBundle(f"the CA in the bundle ({seen}) is not the one you pinned ({normalize_fingerprint(pin)})")
    if public_der(cert.public_key()) != public_der(key.public_key()):
        raise BadBundle("the certificate in the bundle is not for this host's key")
    if cert.issuer != ca.subject:
        raise BadBundle("the certificate in the bundle was not issued by the pinned CA (issuer differs)")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise BadBundle("the certificate in the bundle is not signed by the pinned CA") from None
    if now + CLOCK_SKEW < cert.not_valid_before_utc:
        raise BadBundle(
            f"the certificate is valid only from {iso(cert.not_valid_before_utc)} and this host's clock says "
            f"{iso(now)}",
            hint="fix the clock (NTP), then enroll again",
        )
    if now >= cert.not_valid_after_utc:
        raise BadBundle(f"the certificate in the bundle expired at {iso(cert.not_valid_after_utc)}")
    _check_chain(body.get("chain"), cert)
    if not _has_usage(cert, ExtendedKeyUsageOID.SERVER_AUTH) or not _has_usage(cert, ExtendedKeyUsageOID.CLIENT_AUTH):
        log.warning("the certificate lacks serverAuth or clientAuth: `serve` or the check-in may be refused")
    return Bundle(
        raw={k: body.get(k) for k in ("ca_crt", "server_crt", "chain", "not_after", "manager_addresses", "mtls_url")},
        ca=ca,
        cert=cert,
        manager_addresses=_addresses(body.get("manager_addresses")),
        mtls_url=_mtls_url(body.get("mtls_url")),
    )


def _check_chain(chain: Any, cert: x509.Certificate) -> None:
    if chain in (None, ""):
        return
    if not isinstance(chain, str):
        raise BadBundle("the bundle's chain is not PEM text")
    try:
        certs = x509.load_pem_x509_certificates(chain.encode())
    except ValueError as exc:
        raise BadBundle(f"the bundle's chain is not readable PEM ({exc})") from None
    if certs[0] != cert:
        raise BadBundle("the bundle's chain does not start with its server_crt")


def _has_usage(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bool:
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True  # no EKU extension: any use
    return oid in usages


def _addresses(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        log.warning("the bundle's manager_addresses is not a list: no address added to the whitelist")
        return []
    found: list[str] = []
    for item in value:
        try:
            text = str(item).strip()
            normal = str(ipaddress.ip_network(text, strict=False)) if "/" in text else str(ipaddress.ip_address(text))
        except ValueError:
            log.warning("ignoring %r in the bundle's manager_addresses: not an IP address", item)
            continue
        if normal not in found:
            found.append(normal)
    return found


def _mtls_url(value: Any) -> str | None:
    if value is None:
        return None
    parts = urllib.parse.urlsplit(str(value))
    if parts.scheme != "https" or not parts.hostname:
        log.warning("ignoring the bundle's mtls_url %r: not an https URL", value)
        return None
    return str(value).rstrip("/")
