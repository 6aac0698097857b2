"""Hosts for the agent tests: keys and CSRs made the way a host makes them, and enrollment bodies."""

from __future__ import annotations

import secrets
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def machine_id() -> str:
    return secrets.token_hex(16)


def key(kind: str = "p256") -> Any:
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    bits = int(kind.removeprefix("rsa"))
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def csr_pem(private_key: Any, cn: str = "web-01", *, greedy: bool = False) -> str:
    """A CSR; ``greedy`` asks for everything a hostile host might: extra SANs, CA:true, code signing."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evil.example.com" if greedy else cn)])
    )
    if greedy:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("kubernetes.default"),
                    x509.DNSName("*.example.com"),
                    x509.UniformResourceIdentifier("urn:ktizo:manager"),
                ]
            ),
            critical=False,
        )
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    algorithm = None if isinstance(private_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(private_key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


def body(mid: str | None = None, *, hostname: str = "web-01", private_key: Any = None, **over: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "machine_id": mid or machine_id(),
        "fqdn": f"{hostname}.lab.example.com",
        "hostname": hostname,
        "ip_addresses": ["10.0.7.21"],
        "os": {"id": "debian", "version": "12", "kernel": "6.1.0-27-amd64"},
        "csr_pem": csr_pem(private_key or key()),
    }
    out.update(over)
    return out
