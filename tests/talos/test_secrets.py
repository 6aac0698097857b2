"""The Talos secrets bundle: generation as talosctl does it, and the gen-secrets YAML format both ways."""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ktizo.domain.errors import ValidationFailed
from ktizo.pki.certs import load_private_key, pem_ed25519_to_pkcs8, talos_ed25519_pem
from ktizo.talos.secrets import (
    CA_VALIDITY,
    MAX_SECRETS_BYTES,
    TOKEN_PATTERN,
    CertAndKey,
    SecretsBundle,
    dump_secrets,
    generate_secrets,
    generate_token,
    load_secrets,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "talos"
FIXTURE_TEXT = (FIXTURES / "secrets.yaml").read_text()

CAS = ("os", "k8s", "k8s_aggregator", "etcd")
YAML_NAME = {"os": "os", "k8s": "k8s", "k8s_aggregator": "k8saggregator", "etcd": "etcd"}


@pytest.fixture(scope="module")
def generated() -> SecretsBundle:
    # RSA-4096 takes about a second; one bundle serves the whole module.
    return generate_secrets()


@pytest.fixture(scope="module")
def fixture_bundle() -> SecretsBundle:
    return load_secrets(FIXTURE_TEXT)


def _fixture_doc() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(FIXTURE_TEXT)
    return doc


def _pem(doc: dict[str, Any], name: str, part: str) -> bytes:
    return base64.b64decode(doc["certs"][name][part])


def _encode(pem: bytes) -> str:
    return base64.b64encode(pem).decode("ascii")


def _key_kind(key: Any) -> str:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ecdsa-{key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    return type(key).__name__


def _profile(cert: x509.Certificate) -> dict[str, Any]:
    """Everything about a CA certificate that must not vary between two bundles."""
    ext = cert.extensions
    return {
        "subject": cert.subject.rfc4514_string(),
        "subject_der": cert.subject.public_bytes(),
        "self_issued": cert.issuer == cert.subject,
        "extensions": [(e.oid.dotted_string, e.critical) for e in ext],
        "key_usage": ext.get_extension_for_class(x509.KeyUsage).value,
        "eku": list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value),
        "basic": ext.get_extension_for_class(x509.BasicConstraints).value,
        "validity": cert.not_valid_after_utc - cert.not_valid_before_utc,
        "key_type": _key_kind(cert.public_key()),
        "signature": cert.signature_algorithm_oid,
        "version": cert.version,
    }


# --- generation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CAS)
def test_generated_ca_matches_the_fixture_ca(
    generated: SecretsBundle, fixture_bundle: SecretsBundle, name: str
) -> None:
    ours = getattr(generated, name).certificate()
    theirs = getattr(fixture_bundle, name).certificate()
    assert _profile(ours) == _profile(theirs)
    assert _profile(ours)["validity"] == CA_VALIDITY == timedelta(days=3650)
    assert 0 < ours.serial_number < 1 << 128
    skid = ours.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert len(skid) == 20
    ours.verify_directly_issued_by(ours)


def test_generated_ca_subjects_and_key_types(generated: SecretsBundle) -> None:
    subjects = {name: getattr(generated, name).certificate().subject for name in CAS}
    assert subjects["os"].get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "talos"
    assert subjects["k8s"].get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "kubernetes"
    assert subjects["etcd"].get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "etcd"
    assert len(subjects["k8s_aggregator"]) == 0
    assert isinstance(generated.os.private_key(), ed25519.Ed25519PrivateKey)
    for name in ("k8s", "k8s_aggregator", "etcd"):
        key = getattr(generated, name).private_key()
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP256R1)
        assert getattr(generated, name).certificate().signature_hash_algorithm.name == "sha256"


def test_generated_ca_usages_and_validity(generated: SecretsBundle) -> None:
    before = datetime.now(UTC) - timedelta(minutes=5)
    for name in CAS:
        cert = getattr(generated, name).certificate()
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert usage.critical
        assert usage.value.key_cert_sign
        assert usage.value.digital_signature
        assert not usage.value.crl_sign
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        assert not eku.critical
        assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert basic.critical
        assert basic.value.ca
        assert basic.value.path_length is None
        assert before <= cert.not_valid_before_utc <= datetime.now(UTC)


def test_generate_secrets_takes_the_clock() -> None:
    now = datetime(2030, 1, 2, 3, 4, 5, 678, tzinfo=UTC)
    bundle = generate_secrets(now=now)
    cert = bundle.etcd.certificate()
    assert cert.not_valid_before_utc == now.replace(microsecond=0)
    assert cert.not_valid_after_utc == now.replace(microsecond=0) + CA_VALIDITY


def test_generated_keys_match_their_certificates(generated: SecretsBundle) -> None:
    def spki(key: Any) -> bytes:
        der: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return der

    for name in CAS:
        pair: CertAndKey = getattr(generated, name)
        assert spki(pair.private_key().public_key()) == spki(pair.certificate().public_key())


def test_generated_pem_labels_are_talos_labels(generated: SecretsBundle) -> None:
    assert generated.os.key.startswith(b"-----BEGIN ED25519 PRIVATE KEY-----\n")
    assert generated.os.key.rstrip().endswith(b"-----END ED25519 PRIVATE KEY-----")
    for name in ("k8s", "k8s_aggregator", "etcd"):
        assert getattr(generated, name).key.startswith(b"-----BEGIN EC PRIVATE KEY-----\n")
        assert getattr(generated, name).crt.startswith(b"-----BEGIN CERTIFICATE-----\n")
    assert generated.k8s_service_account_key.startswith(b"-----BEGIN RSA PRIVATE KEY-----\n")
    sa = load_private_key(generated.k8s_service_account_key)
    assert isinstance(sa, rsa.RSAPrivateKey)
    assert sa.key_size == 4096
    assert sa.public_key().public_numbers().e == 65537


def test_generated_tokens_and_secrets(generated: SecretsBundle) -> None:
    assert TOKEN_PATTERN.fullmatch(generated.bootstrap_token)
    assert TOKEN_PATTERN.fullmatch(generated.trustd_token)
    assert generated.bootstrap_token != generated.trustd_token
    assert len(base64.urlsafe_b64decode(generated.cluster_id)) == 32
    for value in (generated.cluster_secret, generated.secretbox_encryption_secret):
        assert len(base64.b64decode(value, validate=True)) == 32
    assert generated.aescbc_encryption_secret == ""
    assert {generate_token() for _ in range(20)}.__len__() == 20
    assert all(TOKEN_PATTERN.fullmatch(generate_token()) for _ in range(50))


def test_two_bundles_share_nothing(generated: SecretsBundle) -> None:
    other = generate_secrets()
    assert other.cluster_id != generated.cluster_id
    assert other.os.key != generated.os.key
    assert other.k8s.certificate().serial_number != generated.k8s.certificate().serial_number


# --- YAML format -----------------------------------------------------------------------------------------


def test_dump_load_round_trip(generated: SecretsBundle) -> None:
    text = dump_secrets(generated)
    again = load_secrets(text)
    assert again == generated
    assert dump_secrets(again) == text
    assert load_secrets(text.encode()) == generated


def test_fixture_loads_and_dumps_to_the_same_document(fixture_bundle: SecretsBundle) -> None:
    dumped = dump_secrets(fixture_bundle)
    assert yaml.safe_load(dumped) == yaml.safe_load(FIXTURE_TEXT)
    # Byte-for-byte too, apart from the fixture's leading comment line.
    assert dumped == FIXTURE_TEXT.split("\n", 1)[1]


def test_fixture_values(fixture_bundle: SecretsBundle) -> None:
    assert fixture_bundle.cluster_id == "0raF93qnkMvF-FZNuvyGozXNdLiT2FOWSlyBaW4PR-w="
    assert fixture_bundle.bootstrap_token == "inn7ol.u4ehnti8qyls9ymo"
    assert fixture_bundle.trustd_token == "d8cwfa.eyvpi0xwxyarbfid"
    # This (old) test bundle carries an ECDSA service-account key; Talos still accepts it.
    assert isinstance(load_private_key(fixture_bundle.k8s_service_account_key), ec.EllipticCurvePrivateKey)


def test_aescbc_only_bundle_is_accepted_and_round_trips() -> None:
    doc = _fixture_doc()
    secret = doc["secrets"].pop("secretboxencryptionsecret")
    doc["secrets"]["aescbcencryptionsecret"] = secret
    bundle = load_secrets(yaml.safe_dump(doc))
    assert bundle.aescbc_encryption_secret == secret
    assert bundle.secretbox_encryption_secret == ""
    assert yaml.safe_load(dump_secrets(bundle)) == doc


def test_legacy_admin_certificate_is_ignored() -> None:
    doc = _fixture_doc()
    doc["certs"]["admin"] = copy.deepcopy(doc["certs"]["os"])
    assert load_secrets(yaml.safe_dump(doc)) == load_secrets(FIXTURE_TEXT)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for part in parents:
            node = node[part]
        node[last] = value

    return mutate


def _delete(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for part in parents:
            node = node[part]
        del node[last]

    return mutate


def _copy_field(source: str, target: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        node = doc
        for part in source.split("."):
            node = node[part]
        _set(target, copy.deepcopy(node))(doc)

    return mutate


def _double_pem(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for part in parents:
            node = node[part]
        pem = base64.b64decode(node[last])
        node[last] = _encode(pem + pem)

    return mutate


def _bad_cert_pem() -> str:
    return _encode(b"-----BEGIN CERTIFICATE-----\nAAAAAAAA\n-----END CERTIFICATE-----\n")


def _non_ca_pair() -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kubernetes")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return _encode(cert.public_bytes(serialization.Encoding.PEM)), _encode(key_pem)


def _ed25519_key_b64() -> str:
    return _encode(talos_ed25519_pem(ed25519.Ed25519PrivateKey.generate()))


BAD_BUNDLES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("missing section", _delete("cluster"), "cluster"),
    ("missing cluster id", _delete("cluster.id"), "cluster.id"),
    ("missing os key", _delete("certs.os.key"), "certs.os.key"),
    ("missing service account", _delete("certs.k8sserviceaccount"), "certs.k8sserviceaccount"),
    ("missing trustd token", _delete("trustdinfo.token"), "trustdinfo.token"),
    (
        "missing encryption secret",
        _delete("secrets.secretboxencryptionsecret"),
        "secrets.secretboxencryptionsecret",
    ),
    ("section not a mapping", _set("certs.etcd", "nope"), "certs.etcd"),
    ("number instead of string", _set("cluster.secret", 12345), "cluster.secret"),
    ("unknown top-level key", _set("extra", {}), "extra"),
    ("unknown nested key", _set("certs.os.extra", "x"), "certs.os.extra"),
    ("cluster id not base64", _set("cluster.id", "not base64 at all!"), "cluster.id"),
    (
        "cluster secret wrong size",
        _set("cluster.secret", base64.b64encode(b"short").decode()),
        "cluster.secret",
    ),
    (
        "secretbox not base64",
        _set("secrets.secretboxencryptionsecret", "%%%"),
        "secrets.secretboxencryptionsecret",
    ),
    ("crt not base64", _set("certs.k8s.crt", "@@not-base64@@"), "certs.k8s.crt"),
    ("key not base64", _set("certs.os.key", "@@not-base64@@"), "certs.os.key"),
    ("crt base64 of junk", _set("certs.k8s.crt", _encode(b"hello")), "certs.k8s.crt"),
    ("crt does not parse", _set("certs.etcd.crt", _bad_cert_pem()), "certs.etcd.crt"),
    (
        "key does not parse",
        _set("certs.etcd.key", _encode(b"-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n")),
        "certs.etcd.key",
    ),
    ("key of cert A with cert B", _copy_field("certs.etcd.key", "certs.k8s.key"), "certs.k8s.key"),
    (
        "key of the aggregator CA with the k8s CA",
        _copy_field("certs.k8saggregator.key", "certs.k8s.key"),
        "certs.k8s.key",
    ),
    ("ECDSA CA where the OS CA belongs", _copy_field("certs.k8s", "certs.os"), "certs.os.crt"),
    ("Ed25519 CA where an ECDSA one belongs", _copy_field("certs.os", "certs.etcd"), "certs.etcd.crt"),
    (
        "Ed25519 service account key",
        _set("certs.k8sserviceaccount.key", _ed25519_key_b64()),
        "certs.k8sserviceaccount.key",
    ),
    ("certificate as a key", _copy_field("certs.k8s.crt", "certs.k8s.key"), "certs.k8s.key"),
    ("two PEM blocks", _double_pem("certs.os.crt"), "certs.os.crt"),
    (
        "bad bootstrap token",
        _set("secrets.bootstraptoken", "ABCDEF.0123456789abcdef"),
        "secrets.bootstraptoken",
    ),
    ("short trustd token", _set("trustdinfo.token", "abc.def"), "trustdinfo.token"),
    ("token with extra text", _set("trustdinfo.token", "d8cwfa.eyvpi0xwxyarbfid\nx"), "trustdinfo.token"),
    (
        "both encryption secrets",
        _copy_field("secrets.secretboxencryptionsecret", "secrets.aescbcencryptionsecret"),
        "secrets.aescbcencryptionsecret",
    ),
]


@pytest.mark.parametrize(("case", "mutate", "field"), BAD_BUNDLES, ids=[c[0] for c in BAD_BUNDLES])
def test_bad_bundle_is_refused_naming_the_field(
    case: str, mutate: Callable[[dict[str, Any]], None], field: str
) -> None:
    doc = _fixture_doc()
    mutate(doc)
    with pytest.raises(ValidationFailed) as info:
        load_secrets(yaml.safe_dump(doc, sort_keys=False))
    assert info.value.field == field, str(info.value)


def test_non_ca_certificate_is_refused() -> None:
    doc = _fixture_doc()
    crt, key = _non_ca_pair()
    doc["certs"]["k8s"] = {"crt": crt, "key": key}
    with pytest.raises(ValidationFailed) as info:
        load_secrets(yaml.safe_dump(doc))
    assert info.value.field == "certs.k8s.crt"
    assert "CA" in info.value.message


@pytest.mark.parametrize(
    "text",
    [
        "",
        "- a list\n",
        "just a string\n",
        "cluster: [unclosed\n",
        "a: 1\n---\nb: 2\n",
        "cluster: &c {id: x}\nsecrets: *c\n",
        "cluster: {}\ncluster: {}\n",
    ],
    ids=["empty", "list", "scalar", "syntax", "two documents", "alias", "duplicate key"],
)
def test_malformed_yaml_is_refused(text: str) -> None:
    with pytest.raises(ValidationFailed):
        load_secrets(text)


def test_oversized_bundle_is_refused() -> None:
    padding = "# " + "x" * 80 + "\n"
    text = FIXTURE_TEXT + padding * (MAX_SECRETS_BYTES // len(padding) + 1)
    with pytest.raises(ValidationFailed, match="larger than"):
        load_secrets(text)


def test_not_utf8_is_refused() -> None:
    with pytest.raises(ValidationFailed, match="UTF-8"):
        load_secrets(b"cluster: \xff\xfe\n")


def test_pkcs8_labelled_ed25519_key_is_accepted_as_is() -> None:
    doc = _fixture_doc()
    relabelled = pem_ed25519_to_pkcs8(_pem(doc, "os", "key"))
    doc["certs"]["os"]["key"] = _encode(relabelled)
    bundle = load_secrets(yaml.safe_dump(doc))
    assert bundle.os.key == relabelled
    assert isinstance(bundle.os.private_key(), ed25519.Ed25519PrivateKey)


# --- PEM helpers -----------------------------------------------------------------------------------------


def test_ed25519_label_helpers_round_trip() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    talos_pem = talos_ed25519_pem(key)
    assert talos_pem.startswith(b"-----BEGIN ED25519 PRIVATE KEY-----\n")
    with pytest.raises(ValueError):  # noqa: PT011 - cryptography's own message
        serialization.load_pem_private_key(talos_pem, password=None)
    standard = pem_ed25519_to_pkcs8(talos_pem)
    assert standard.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    loaded = serialization.load_pem_private_key(standard, password=None)
    assert isinstance(loaded, ed25519.Ed25519PrivateKey)
    assert loaded.private_bytes_raw() == key.private_bytes_raw()
    # Same DER body as Talos's: the fixture key decodes identically either way.
    fixture_key = _pem(_fixture_doc(), "os", "key")
    assert isinstance(load_private_key(fixture_key), ed25519.Ed25519PrivateKey)


def test_load_private_key_refuses_foreign_labels() -> None:
    with pytest.raises(ValueError, match="label"):
        load_private_key(b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="PEM"):
        load_private_key(b"no pem here")


def test_cluster_id_may_be_std_base64_but_secrets_must_be() -> None:
    doc = _fixture_doc()
    raw = base64.urlsafe_b64decode(doc["cluster"]["id"])
    doc["cluster"]["id"] = base64.b64encode(raw).decode()
    assert load_secrets(yaml.safe_dump(doc)).cluster_id == doc["cluster"]["id"]
    doc = _fixture_doc()
    doc["secrets"]["secretboxencryptionsecret"] = base64.urlsafe_b64encode(b"\xfb" * 32).decode()
    with pytest.raises(ValidationFailed) as info:
        load_secrets(yaml.safe_dump(doc))
    assert info.value.field == "secrets.secretboxencryptionsecret"
