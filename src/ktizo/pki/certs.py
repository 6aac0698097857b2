"""Certificate and key plumbing Ktizo's CAs share (Talos's and, with the agents, Ktizo's own): PEM labels and
parsing, serials, key usage. Pure cryptography, no storage."""

from __future__ import annotations

import re
import secrets as _random
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

PEM_CERTIFICATE = "CERTIFICATE"
PEM_RSA_PRIVATE = "RSA PRIVATE KEY"
PEM_EC_PRIVATE = "EC PRIVATE KEY"
PEM_ED25519_PRIVATE = "ED25519 PRIVATE KEY"
PEM_PKCS8_PRIVATE = "PRIVATE KEY"

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n([A-Za-z0-9+/=\r\n]*?)-----END \1-----\r?\n?",
)


def pem_ed25519_to_pkcs8(pem: bytes) -> bytes:
    """Relabel Talos's ``ED25519 PRIVATE KEY`` PEM as ``PRIVATE KEY``; the body is PKCS#8 DER either way."""
    return pem.replace(b"-----BEGIN ED25519 PRIVATE KEY-----", b"-----BEGIN PRIVATE KEY-----").replace(
        b"-----END ED25519 PRIVATE KEY-----", b"-----END PRIVATE KEY-----"
    )


def talos_ed25519_pem(key: ed25519.Ed25519PrivateKey) -> bytes:
    """PKCS#8 PEM of an Ed25519 key under the label Talos (siderolabs/crypto) writes and expects."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem.replace(b"-----BEGIN PRIVATE KEY-----", b"-----BEGIN ED25519 PRIVATE KEY-----").replace(
        b"-----END PRIVATE KEY-----", b"-----END ED25519 PRIVATE KEY-----"
    )


def pem_label(pem: bytes) -> str:
    """The label of the single PEM block in ``pem``; ``ValueError`` unless there is exactly one."""
    stripped = pem.strip()
    match = _PEM_BLOCK.fullmatch(stripped + b"\n")
    if match is None:
        count = len(_PEM_BLOCK.findall(pem))
        # A second block or stray text would be silently ignored by Go's pem.Decode; refuse the ambiguity.
        raise ValueError("not a single PEM block" if count != 1 else "text around the PEM block")
    return match.group(1).decode("ascii")


def load_private_key(pem: bytes) -> CertificateIssuerPrivateKeyTypes:
    """Parse a private key under any label Talos reads (RSA/EC traditional, Ed25519, PKCS#8).

    Raises ``ValueError`` for anything else, including encrypted keys and key types Talos cannot sign with.
    """
    label = pem_label(pem)
    if label == PEM_ED25519_PRIVATE:
        pem = pem_ed25519_to_pkcs8(pem)
    elif label not in (PEM_RSA_PRIVATE, PEM_EC_PRIVATE, PEM_PKCS8_PRIVATE):
        raise ValueError(f"PEM label {label!r} is not a private key label Talos reads")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ValueError("the key is encrypted; Talos needs it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        # cryptography's own message is a parser trace; the label is what the user can act on.
        raise ValueError(f"the {label} block does not hold a key in the format its label names") from None
    expected: dict[str, tuple[type, ...]] = {
        PEM_RSA_PRIVATE: (rsa.RSAPrivateKey,),
        PEM_EC_PRIVATE: (ec.EllipticCurvePrivateKey,),
        PEM_ED25519_PRIVATE: (ed25519.Ed25519PrivateKey,),
        PEM_PKCS8_PRIVATE: (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey),
    }
    if not isinstance(key, expected[label]):
        raise ValueError(f"a {type(key).__name__} under the PEM label {label!r}")
    return key  # type: ignore[return-value]  # narrowed by the isinstance check above


def public_der(key: Any) -> bytes:
    der: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def key_usage(*, cert_sign: bool, crl_sign: bool = False, key_encipherment: bool = False) -> x509.KeyUsage:
    """Digital signature always; certificate signing for CAs (Talos sets nothing else). Ktizo's agent CA also
    signs CRLs, and an RSA end-entity key may need key encipherment."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def serial_number() -> int:
    # siderolabs/crypto draws below 2**128; X.509 wants a positive serial, so zero is drawn again.
    while True:
        serial = _random.randbelow(1 << 128)
        if serial:
            return serial


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def ec_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
