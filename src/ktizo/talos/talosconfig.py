"""The ``talosconfig`` client file: the OS CA plus a fresh admin client certificate for ``talosctl``.

Layout as ``pkg/machinery/client/config`` writes it; the certificate as Talos's ``NewAdminCertificateAndKey``
makes it: Ed25519, ``O=os:admin`` (the role), signed by the cluster's OS CA, valid one year, KeyUsage
DigitalSignature and ExtKeyUsage ClientAuth (apid refuses client certificates without it).
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ktizo.domain.errors import ValidationFailed
from ktizo.pki.certs import key_usage, serial_number, talos_ed25519_pem
from ktizo.talos.secrets import SecretsBundle

try:
    from yaml import CSafeDumper as _SafeDumper
except ImportError:  # pragma: no cover - only where PyYAML was built without libyaml
    from yaml import SafeDumper as _SafeDumper  # type: ignore[assignment]

# Talos's TalosAPIDefaultCertificateValidityDuration (8760h).
ADMIN_CERT_VALIDITY = timedelta(hours=8760)
ADMIN_ROLE = "os:admin"


def _admin_certificate(bundle: SecretsBundle, now: datetime) -> tuple[bytes, bytes]:
    ca_cert = bundle.os.certificate()
    ca_key = bundle.os.private_key()
    key = ed25519.Ed25519PrivateKey.generate()
    builder = (
        x509.CertificateBuilder()
        # Roles travel as Organization values; Go writes them as PrintableString.
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ADMIN_ROLE, _ASN1Type.PrintableString)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(serial_number())
        .not_valid_before(now)
        .not_valid_after(now + ADMIN_CERT_VALIDITY)
        .add_extension(
            key_usage(cert_sign=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    # Go links a leaf to its issuer's SKID automatically; without one, chain building has only the name.
    try:
        skid = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(skid), critical=False
        )
    except x509.ExtensionNotFound:
        pass
    algorithm = None if isinstance(ca_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    cert = builder.sign(ca_key, algorithm)
    return cert.public_bytes(serialization.Encoding.PEM), talos_ed25519_pem(key)


def make_talosconfig(bundle: SecretsBundle, context: str, endpoints: list[str], *, now: datetime | None = None) -> str:
    """talosconfig YAML with one context named ``context``, pointing ``talosctl`` at ``endpoints``.

    Every call mints a new admin certificate (``now`` is its NotBefore, default the current time); the
    private key exists only in the returned text.
    """
    if not isinstance(context, str) or not context.strip() or not context.isprintable():
        raise ValidationFailed("must be a non-empty printable name", "context")
    for endpoint in endpoints:
        # talosctl takes host, host:port or an IP; anything with spaces would break its dialer.
        if not isinstance(endpoint, str) or not endpoint or not endpoint.isprintable() or " " in endpoint:
            raise ValidationFailed(f"{endpoint!r} is not a host or host:port", "endpoints")
    moment = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    crt, key = _admin_certificate(bundle, moment)
    document = {
        "context": context,
        "contexts": {
            context: {
                "endpoints": list(endpoints),
                "ca": base64.b64encode(bundle.os.crt).decode("ascii"),
                "crt": base64.b64encode(crt).decode("ascii"),
                "key": base64.b64encode(key).decode("ascii"),
            }
        },
    }
    return yaml.dump(document, Dumper=_SafeDumper, sort_keys=False, default_flow_style=False, indent=4, width=1 << 30)
