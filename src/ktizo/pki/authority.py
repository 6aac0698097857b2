"""Ktizo's own CA for Linux agents: the CA itself, checking a host's CSR, and the certificate profiles Ktizo signs.

Every profile is built here from values the caller took from the database; nothing a CSR asks for (subject, SANs,
basic constraints, extended key usages) is copied into a certificate. The CSR contributes its public key and
nothing else, after its signature proved the host holds the private key."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ktizo.domain.errors import ValidationFailed
from ktizo.pki.certs import cert_pem, ec_pem, key_usage, serial_number

# The identity of Ktizo itself when it calls an agent (`ktizo agents probe`): a URI SAN no agent certificate can
# carry, since agents' certificates are built here with DNS and IP SANs only.
MANAGER_URI = "urn:ktizo:manager"
CA_NAME = "Ktizo agent CA"
CA_YEARS = 10
CSR_MAX_BYTES = 16 * 1024
RSA_MIN_BITS, RSA_MAX_BITS = 2048, 8192
_CSR_BEGIN = b"-----BEGIN CERTIFICATE REQUEST-----"
_BACKDATE = dt.timedelta(minutes=5)  # clocks of freshly booted hosts run a little behind


@dataclass(frozen=True)
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> str:
        return cert_pem(self.cert).decode()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)


def fingerprint(cert: x509.Certificate) -> str:
    """``sha256:<64 hex>`` over the DER: what an operator pins on the host (`ktizo-agent --ca-fingerprint`)."""
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def new_authority(now: dt.datetime) -> tuple[Authority, str]:
    """A new CA (P-256, ten years, path length 0) and its key as PEM for storage."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ktizo"), x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=365 * CA_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key), ec_pem(key).decode()


def load_authority(cert_text: str, key_text: str) -> Authority:
    cert = x509.load_pem_x509_certificate(cert_text.encode())
    key = serialization.load_pem_private_key(key_text.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the stored agent CA key is not an EC key")
    return Authority(cert, key)


def check_csr(text: str) -> x509.CertificateSigningRequest:
    """The host's CSR, if it is one well-formed request, signed by its own key, of an allowed key type.

    Raises ``ValidationFailed`` (field ``csr_pem``) saying what is wrong."""
    data = text.encode()
    if len(data) > CSR_MAX_BYTES:
        raise ValidationFailed(f"the CSR is larger than {CSR_MAX_BYTES} bytes", "csr_pem")
    if data.count(_CSR_BEGIN) != 1:
        raise ValidationFailed("csr_pem must hold exactly one PEM 'CERTIFICATE REQUEST' block", "csr_pem")
    try:
        csr = x509.load_pem_x509_csr(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValidationFailed(f"csr_pem is not a readable PKCS#10 request ({exc})", "csr_pem") from None
    check_public_key(csr.public_key())
    try:
        valid = csr.is_signature_valid
    except (InvalidSignature, UnsupportedAlgorithm, ValueError):
        valid = False
    if not valid:
        raise ValidationFailed(
            "the CSR's signature does not verify: it must be signed by the key it carries", "csr_pem"
        )
    return csr


def check_public_key(key: CertificatePublicKeyTypes) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return
        raise ValidationFailed(f"EC keys must be on P-256, not {key.curve.name}", "csr_pem")
    if isinstance(key, ed25519.Ed25519PublicKey):
        return
    if isinstance(key, rsa.RSAPublicKey):
        if RSA_MIN_BITS <= key.key_size <= RSA_MAX_BITS:
            return
        raise ValidationFailed(
            f"RSA keys must have {RSA_MIN_BITS} to {RSA_MAX_BITS} bits, not {key.key_size}", "csr_pem"
        )
    raise ValidationFailed("the key type is not allowed: use P-256, Ed25519 or RSA of 2048 bits or more", "csr_pem")


def key_type(key: CertificatePublicKeyTypes) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "p256"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa{key.key_size}"
    return "unknown"


def issue(
    ca: Authority,
    public_key: CertificatePublicKeyTypes,
    *,
    common_name: str,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    uris: Sequence[str] = (),
    now: dt.datetime,
    days: float,
    server: bool = True,
    client: bool = True,
) -> x509.Certificate:
    """An end-entity certificate from the given values only: no CA flag, the EKUs asked for here, SANs as given."""
    check_public_key(public_key)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [ExtendedKeyUsageOID.CLIENT_AUTH] * client
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in _unique(dns_names)]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in _unique(ip_addresses)]
    sans += [x509.UniformResourceIdentifier(uri) for uri in uris]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _usage(cert_sign=False, key_encipherment=isinstance(public_key, rsa.RSAPublicKey)), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return ec_pem(key)


def crl(
    ca: Authority, revoked: Iterable[tuple[int, dt.datetime]], *, number: int, now: dt.datetime, hours: float
) -> x509.CertificateRevocationList:
    """The CA's revocation list: every revoked certificate not yet expired, valid for ``hours``."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(hours=hours))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(ca.key, hashes.SHA256())


def signed_by(cert: x509.Certificate, ca: Authority) -> bool:
    """Whether ``cert`` was issued by this CA (name and signature)."""
    if cert.issuer != ca.cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def serial_hex(serial: int) -> str:
    return f"{serial:032x}"


def _usage(*, cert_sign: bool, key_encipherment: bool = False) -> x509.KeyUsage:
    return key_usage(cert_sign=cert_sign, crl_sign=cert_sign, key_encipherment=key_encipherment)


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))
