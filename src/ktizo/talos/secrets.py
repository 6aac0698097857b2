"""The Talos secrets bundle: the CAs, keys and tokens every config of one cluster shares.

The bundle is made the way ``talosctl gen secrets`` makes it (Talos v1.13, siderolabs/crypto v0.6) and is read
and written in that command's YAML layout, so a bundle can move between Ktizo and ``talosctl`` both ways.
Certificates and keys are kept as the PEM bytes Talos expects, labels included: Talos writes Ed25519 keys
under the non-standard label ``ED25519 PRIVATE KEY``, which ``cryptography`` does not read without help.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets as _random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ktizo.domain.errors import ValidationFailed
from ktizo.pki.certs import (
    PEM_CERTIFICATE,
    cert_pem,
    ec_pem,
    key_usage,
    load_private_key,
    pem_label,
    public_der,
    serial_number,
    talos_ed25519_pem,
)

try:
    from yaml import CSafeDumper as _SafeDumper
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # pragma: no cover - only where PyYAML was built without libyaml
    from yaml import SafeDumper as _SafeDumper  # type: ignore[assignment]
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]

MAX_SECRETS_BYTES = 256 * 1024

# Talos's CAValidityTime; NotBefore is "now", without backdating.
CA_VALIDITY = timedelta(hours=87600)

# kubeadm bootstrap-token format, which Talos also uses for the trustd token.
TOKEN_PATTERN = re.compile(r"[0-9a-z]{6}\.[0-9a-z]{16}")
_ID_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"

_CA_SUBJECTS = {
    "os": "talos",
    "k8s": "kubernetes",
    "etcd": "etcd",
    "k8saggregator": None,  # Talos gives the front-proxy CA an empty subject.
}

# YAML key of each CA in the bundle's ``certs`` section, in the order talosctl writes them.
_CERT_KEYS = ("etcd", "k8s", "k8saggregator", "k8sserviceaccount", "os")
# A bundle from a Talos before v1.3 may still carry the admin client certificate; Ktizo mints its own.
_IGNORED_CERT_KEYS = frozenset({"admin"})


@dataclass(frozen=True)
class CertAndKey:
    """A CA certificate and its private key, both PEM exactly as Talos writes them."""

    crt: bytes
    key: bytes

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.crt)

    def private_key(self) -> CertificateIssuerPrivateKeyTypes:
        return load_private_key(self.key)


@dataclass(frozen=True)
class SecretsBundle:
    """Everything ``talosctl gen secrets`` writes; field names follow Talos's, values are as in its YAML.

    ``secretbox_encryption_secret`` and ``aescbc_encryption_secret`` are std-base64 32-byte keys; exactly
    one is non-empty (bundles made for Talos 1.2 and older carry the AES-CBC one).
    """

    cluster_id: str
    cluster_secret: str
    bootstrap_token: str
    secretbox_encryption_secret: str
    trustd_token: str
    os: CertAndKey
    k8s: CertAndKey
    k8s_aggregator: CertAndKey
    etcd: CertAndKey
    k8s_service_account_key: bytes
    aescbc_encryption_secret: str = ""


# --- generation ------------------------------------------------------------------------------------------


def generate_token() -> str:
    """A ``[0-9a-z]{6}.[0-9a-z]{16}`` token, as Talos's genToken(6, 16) makes bootstrap and trustd tokens."""
    pick = _random.choice
    return "".join(pick(_ID_CHARS) for _ in range(6)) + "." + "".join(pick(_ID_CHARS) for _ in range(16))


def _self_signed_ca(key: CertificateIssuerPrivateKeyTypes, organization: str | None, now: datetime) -> x509.Certificate:
    # Go's pkix encodes printable names as PrintableString; cryptography would pick UTF8String.
    attrs = (
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization, _ASN1Type.PrintableString)] if organization else []
    )
    name = x509.Name(attrs)
    # Extensions in the order, and with the critical flags, of Go's x509.CreateCertificate (and the fixture).
    # siderolabs/crypto uses a random SKID rather than a SHA-1 of the key (FIPS 140-3), and so does Ktizo.
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial_number())
        .not_valid_before(now)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(
            key_usage(cert_sign=True),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier(_random.token_bytes(20)), critical=False)
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)


def _ecdsa_ca(organization: str | None, now: datetime) -> CertAndKey:
    key = ec.generate_private_key(ec.SECP256R1())
    return CertAndKey(cert_pem(_self_signed_ca(key, organization, now)), ec_pem(key))


def _random_b64(*, urlsafe: bool = False) -> str:
    raw = _random.token_bytes(32)
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(raw).decode("ascii")


def generate_secrets(*, now: datetime | None = None) -> SecretsBundle:
    """A fresh bundle, as ``talosctl gen secrets`` (Talos v1.13) makes one.

    ``now`` (default: the current time) becomes every CA's NotBefore. Takes about a second: the service
    account key is RSA-4096, as Talos generates it for version contracts after 1.6.
    """
    moment = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    os_key = ed25519.Ed25519PrivateKey.generate()
    os_ca = CertAndKey(cert_pem(_self_signed_ca(os_key, _CA_SUBJECTS["os"], moment)), talos_ed25519_pem(os_key))
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    return SecretsBundle(
        # Talos v1.13 writes the cluster id URL-safe (v1.14 switches to std); both decode the same.
        cluster_id=_random_b64(urlsafe=True),
        cluster_secret=_random_b64(),
        bootstrap_token=generate_token(),
        secretbox_encryption_secret=_random_b64(),
        trustd_token=generate_token(),
        os=os_ca,
        k8s=_ecdsa_ca(_CA_SUBJECTS["k8s"], moment),
        k8s_aggregator=_ecdsa_ca(_CA_SUBJECTS["k8saggregator"], moment),
        etcd=_ecdsa_ca(_CA_SUBJECTS["etcd"], moment),
        k8s_service_account_key=sa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
    )


# --- YAML ------------------------------------------------------------------------------------------------


def _b64(pem: bytes) -> str:
    return base64.b64encode(pem).decode("ascii")


def secrets_document(bundle: SecretsBundle) -> dict[str, Any]:
    """The bundle as the mapping ``talosctl gen secrets`` writes (keys in its order)."""
    secrets_section: dict[str, str] = {"bootstraptoken": bundle.bootstrap_token}
    # Talos omits whichever of the two encryption secrets is empty.
    if bundle.aescbc_encryption_secret:
        secrets_section["aescbcencryptionsecret"] = bundle.aescbc_encryption_secret
    if bundle.secretbox_encryption_secret:
        secrets_section["secretboxencryptionsecret"] = bundle.secretbox_encryption_secret

    def pair(ca: CertAndKey) -> dict[str, str]:
        return {"crt": _b64(ca.crt), "key": _b64(ca.key)}

    return {
        "cluster": {"id": bundle.cluster_id, "secret": bundle.cluster_secret},
        "secrets": secrets_section,
        "trustdinfo": {"token": bundle.trustd_token},
        "certs": {
            "etcd": pair(bundle.etcd),
            "k8s": pair(bundle.k8s),
            "k8saggregator": pair(bundle.k8s_aggregator),
            "k8sserviceaccount": {"key": _b64(bundle.k8s_service_account_key)},
            "os": pair(bundle.os),
        },
    }


def dump_secrets(bundle: SecretsBundle) -> str:
    """The bundle as ``talosctl gen secrets`` YAML (4-space indent, base64 of PEM on one line each)."""
    return yaml.dump(
        secrets_document(bundle),
        Dumper=_SafeDumper,
        sort_keys=False,
        default_flow_style=False,
        indent=4,
        width=1 << 30,
        allow_unicode=False,
    )


class _StrictLoader(_SafeLoader):
    """Safe loader that refuses duplicate keys: a second ``key:`` would otherwise win silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str):
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(data: bytes | str) -> Any:
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if len(raw) > MAX_SECRETS_BYTES:
        raise ValidationFailed(f"secrets bundle is larger than {MAX_SECRETS_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationFailed(f"secrets bundle is not UTF-8 (bad byte at offset {exc.start})") from None
    try:
        for event in yaml.parse(text, Loader=_SafeLoader):
            # Aliases can expand a small file enormously, and talosctl never writes them.
            if isinstance(event, yaml.NodeEvent) and event.anchor is not None:
                raise ValidationFailed("YAML anchors and aliases are not allowed in a secrets bundle")
        docs = [doc for doc in yaml.load_all(text, Loader=_StrictLoader) if doc is not None]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValidationFailed(f"invalid YAML{where}: {exc.problem or exc.context}") from None
    except (yaml.YAMLError, ValueError) as exc:
        raise ValidationFailed(f"invalid YAML: {exc}") from None
    if len(docs) != 1:
        raise ValidationFailed(f"a secrets bundle is one YAML document, not {len(docs)}")
    return docs[0]


def _section(parent: Mapping[str, Any], key: str, path: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    value = parent.get(key)
    if value is None:
        raise ValidationFailed("is missing", path)
    if not isinstance(value, dict):
        raise ValidationFailed("must be a mapping", path)
    for name in value:
        if name not in allowed and not (path == "certs" and name in _IGNORED_CERT_KEYS):
            raise ValidationFailed("is not a field of a Talos secrets bundle", f"{path}.{name}")
    return value


def _string(parent: Mapping[str, Any], key: str, path: str, *, required: bool = True) -> str:
    value = parent.get(key)
    if value is None or value == "":
        if required:
            raise ValidationFailed("is missing", path)
        return ""
    if not isinstance(value, str):
        raise ValidationFailed(f"must be a string, not {type(value).__name__}", path)
    return value


def _b64decode(text: str, path: str, *, urlsafe_too: bool = False) -> bytes:
    compact = "".join(text.split())
    decoders: list[Callable[[str], bytes]] = [lambda s: base64.b64decode(s, validate=True)]
    if urlsafe_too:
        decoders.append(lambda s: base64.b64decode(s, altchars=b"-_", validate=True))
    for decode in decoders:
        try:
            return decode(compact)
        except (binascii.Error, ValueError):
            continue
    raise ValidationFailed("is not valid base64", path)


def _key_bytes(text: str, path: str, size: tuple[int, ...], *, urlsafe_too: bool = False) -> str:
    raw = _b64decode(text, path, urlsafe_too=urlsafe_too)
    if len(raw) not in size:
        wanted = " or ".join(str(n) for n in size)
        raise ValidationFailed(f"must be {wanted} bytes of base64, not {len(raw)}", path)
    return text


def _token(text: str, path: str) -> str:
    if not TOKEN_PATTERN.fullmatch(text):
        raise ValidationFailed("must look like abcdef.0123456789abcdef ([0-9a-z]{6}.[0-9a-z]{16})", path)
    return text


def _check_key_type(key: Any, kind: str, path: str) -> None:
    if kind == "ed25519":
        ok = isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey)
        wanted = "an Ed25519 key"
    elif kind == "p256":
        ok = isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and isinstance(
            key.curve, ec.SECP256R1
        )
        wanted = "an ECDSA P-256 key"
    else:
        # Talos makes RSA-4096 for contracts after 1.6 and ECDSA P-256 before; kube-apiserver takes both.
        ok = (isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048) or (
            isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
        )
        wanted = "an RSA (2048 bits or more) or ECDSA P-256 key"
    if not ok:
        raise ValidationFailed(f"must be {wanted}, not {_describe(key)}", path)


def _describe(key: Any) -> str:
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(key).__name__


def _pem_field(section: Mapping[str, Any], key: str, path: str) -> bytes:
    pem = _b64decode(_string(section, key, path), path)
    if b"-----BEGIN" not in pem:
        raise ValidationFailed("is not base64 of a PEM block", path)
    return pem


def _ca_pair(certs: Mapping[str, Any], name: str, kind: str) -> CertAndKey:
    path = f"certs.{name}"
    section = _section(certs, name, path, ("crt", "key"))
    crt = _pem_field(section, "crt", f"{path}.crt")
    key = _pem_field(section, "key", f"{path}.key")
    try:
        label = pem_label(crt)
    except ValueError as exc:
        raise ValidationFailed(f"is not a certificate: {exc}", f"{path}.crt") from None
    if label != PEM_CERTIFICATE:
        raise ValidationFailed(f"is not a certificate: PEM label is {label!r}", f"{path}.crt")
    try:
        cert = x509.load_pem_x509_certificate(crt)
    except ValueError:
        raise ValidationFailed("is not a certificate: the DER does not parse", f"{path}.crt") from None
    try:
        private = load_private_key(key)
    except ValueError as exc:
        raise ValidationFailed(f"is not a private key: {exc}", f"{path}.key") from None
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ValidationFailed("is not a CA certificate (needs basicConstraints CA:TRUE)", f"{path}.crt")
    _check_key_type(cert.public_key(), kind, f"{path}.crt")
    _check_key_type(private, kind, f"{path}.key")
    if public_der(private.public_key()) != public_der(cert.public_key()):
        raise ValidationFailed(f"does not belong to the certificate {path}.crt", f"{path}.key")
    return CertAndKey(crt, key)


def load_secrets(data: bytes | str) -> SecretsBundle:
    """Read and check a bundle in ``talosctl gen secrets`` YAML.

    Raises ``ValidationFailed`` naming the field (``certs.os.key``, ``secrets.bootstraptoken``, ...) for a
    missing, unknown or malformed field, bad base64, a certificate or key that does not parse, a key of the
    wrong type or one that does not match its certificate, or a token that is not in Talos's format.
    """
    doc = _parse_yaml(data)
    if not isinstance(doc, dict):
        raise ValidationFailed("a secrets bundle must be a YAML mapping")
    for name in doc:
        if name not in ("cluster", "secrets", "trustdinfo", "certs"):
            raise ValidationFailed("is not a field of a Talos secrets bundle", str(name))

    cluster = _section(doc, "cluster", "cluster", ("id", "secret"))
    # Talos v1.13 writes the id URL-safe and v1.14 std; the other secrets are std only (kube-apiserver's
    # encryption config decodes them that way).
    cluster_id = _key_bytes(_string(cluster, "id", "cluster.id"), "cluster.id", (32,), urlsafe_too=True)
    cluster_secret = _key_bytes(_string(cluster, "secret", "cluster.secret"), "cluster.secret", (32,))

    sec = _section(doc, "secrets", "secrets", ("bootstraptoken", "aescbcencryptionsecret", "secretboxencryptionsecret"))
    bootstrap_token = _token(_string(sec, "bootstraptoken", "secrets.bootstraptoken"), "secrets.bootstraptoken")
    secretbox = _string(sec, "secretboxencryptionsecret", "secrets.secretboxencryptionsecret", required=False)
    aescbc = _string(sec, "aescbcencryptionsecret", "secrets.aescbcencryptionsecret", required=False)
    if secretbox and aescbc:
        raise ValidationFailed(
            "only one of secretboxencryptionsecret and aescbcencryptionsecret may be set",
            "secrets.aescbcencryptionsecret",
        )
    if not secretbox and not aescbc:
        raise ValidationFailed("is missing", "secrets.secretboxencryptionsecret")
    if secretbox:
        _key_bytes(secretbox, "secrets.secretboxencryptionsecret", (32,))
    if aescbc:
        _key_bytes(aescbc, "secrets.aescbcencryptionsecret", (16, 24, 32))

    trustd = _section(doc, "trustdinfo", "trustdinfo", ("token",))
    trustd_token = _token(_string(trustd, "token", "trustdinfo.token"), "trustdinfo.token")

    certs = _section(doc, "certs", "certs", _CERT_KEYS)
    etcd = _ca_pair(certs, "etcd", "p256")
    k8s = _ca_pair(certs, "k8s", "p256")
    aggregator = _ca_pair(certs, "k8saggregator", "p256")
    os_ca = _ca_pair(certs, "os", "ed25519")
    sa_section = _section(certs, "k8sserviceaccount", "certs.k8sserviceaccount", ("key",))
    sa_key = _pem_field(sa_section, "key", "certs.k8sserviceaccount.key")
    try:
        sa_private = load_private_key(sa_key)
    except ValueError as exc:
        raise ValidationFailed(f"is not a private key: {exc}", "certs.k8sserviceaccount.key") from None
    _check_key_type(sa_private, "serviceaccount", "certs.k8sserviceaccount.key")

    return SecretsBundle(
        cluster_id=cluster_id,
        cluster_secret=cluster_secret,
        bootstrap_token=bootstrap_token,
        secretbox_encryption_secret=secretbox,
        trustd_token=trustd_token,
        os=os_ca,
        k8s=k8s,
        k8s_aggregator=aggregator,
        etcd=etcd,
        k8s_service_account_key=sa_key,
        aescbc_encryption_secret=aescbc,
    )
