"""Config generation against Talos's own output, and the talosconfig client file.

The golden fixtures are Talos v1.13.9's encoding-stability fixtures for the "base" input (see
tests/fixtures/talos/SOURCE.md). The v1.11 and v1.12 expectations are derived from them by the differences
Talos v1.13.9's stability fixtures for those contracts show.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ktizo.domain.errors import ValidationFailed
from ktizo.pki.certs import load_private_key
from ktizo.talos.generate import ClusterInput, generate_config, generate_configs
from ktizo.talos.secrets import SecretsBundle, generate_secrets, load_secrets
from ktizo.talos.talosconfig import ADMIN_CERT_VALIDITY, make_talosconfig
from ktizo.talos.versions import TalosVersion
from ktizo.talos.yamlio import dump_documents, load_documents

FIXTURES = Path(__file__).parent.parent / "fixtures" / "talos"
V1_11, V1_12, V1_13 = TalosVersion(1, 11), TalosVersion(1, 12), TalosVersion(1, 13)


@pytest.fixture(scope="module")
def fixture_bundle() -> SecretsBundle:
    return load_secrets((FIXTURES / "secrets.yaml").read_bytes())


@pytest.fixture(scope="module")
def fresh_bundle() -> SecretsBundle:
    # RSA-4096 takes about a second; one bundle serves the whole module.
    return generate_secrets()


def _golden(machine_type: str) -> list[dict[str, Any]]:
    return load_documents((FIXTURES / f"{machine_type}.yaml").read_bytes())


def _base(version: TalosVersion = V1_13, **changes: Any) -> ClusterInput:
    return dataclasses.replace(ClusterInput("base", "https://base:6443", "1.28.0", version), **changes)


def first_difference(got: Any, want: Any, path: str = "") -> str | None:
    """The first path where two YAML structures differ, with both values; None when equal."""
    where = path or "<root>"
    if type(got) is not type(want):
        return f"{where}: got {type(got).__name__} {got!r:.200}, want {type(want).__name__} {want!r:.200}"
    if isinstance(got, dict):
        for key in want:
            if key not in got:
                return f"{path}.{key}: missing (want {want[key]!r:.200})"
        for key in got:
            if key not in want:
                return f"{path}.{key}: unexpected (got {got[key]!r:.200})"
        for key in want:
            found = first_difference(got[key], want[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(got, list):
        for index, (g, w) in enumerate(zip(got, want, strict=False)):
            found = first_difference(g, w, f"{path}[{index}]")
            if found:
                return found
        if len(got) != len(want):
            return f"{where}: got {len(got)} items, want {len(want)}"
        return None
    if got != want:
        return f"{where}: got {got!r:.200}, want {want!r:.200}"
    return None


def assert_same(got: Any, want: Any) -> None:
    difference = first_difference(got, want)
    assert difference is None, difference


# --- golden check ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("machine_type", ["controlplane", "worker"])
def test_golden_v1_13(fixture_bundle: SecretsBundle, machine_type: str) -> None:
    docs = generate_configs(_base(), fixture_bundle)[machine_type]
    assert_same(docs, _golden(machine_type))


@pytest.mark.parametrize("machine_type", ["controlplane", "worker"])
def test_golden_survives_yaml_round_trip(fixture_bundle: SecretsBundle, machine_type: str) -> None:
    docs = generate_config(_base(), fixture_bundle, machine_type)  # type: ignore[arg-type]
    assert_same(load_documents(dump_documents(docs)), _golden(machine_type))


def _v1_12(machine_type: str) -> list[dict[str, Any]]:
    docs = _golden(machine_type)
    machine = docs[0]["machine"]
    # Talos 1.12 still reads KubeSpan from machine.network, so its generator writes the empty section.
    rebuilt: dict[str, Any] = {}
    for key, value in machine.items():
        if key == "install":
            rebuilt["network"] = {}
        rebuilt[key] = value
    docs[0]["machine"] = rebuilt
    return docs


def _v1_11(machine_type: str) -> list[dict[str, Any]]:
    docs = _v1_12(machine_type)[:1]  # no HostnameConfig before 1.12
    machine = docs[0]["machine"]
    del machine["install"]["grubUseUKICmdline"]
    machine["features"] = {
        "rbac": True,
        "stableHostname": True,
        "apidCheckExtKeyUsage": True,
        **machine["features"],
    }
    if machine_type == "controlplane":
        api = docs[0]["cluster"]["apiServer"]
        docs[0]["cluster"]["apiServer"] = {
            "image": api["image"],
            "certSANs": ["base"],
            "disablePodSecurityPolicy": True,
            **{k: v for k, v in api.items() if k != "image"},
        }
    return docs


@pytest.mark.parametrize("machine_type", ["controlplane", "worker"])
def test_v1_12_contract(fixture_bundle: SecretsBundle, machine_type: str) -> None:
    assert_same(generate_configs(_base(V1_12), fixture_bundle)[machine_type], _v1_12(machine_type))


@pytest.mark.parametrize("machine_type", ["controlplane", "worker"])
def test_v1_11_contract(fixture_bundle: SecretsBundle, machine_type: str) -> None:
    docs = generate_configs(_base(V1_11), fixture_bundle)[machine_type]
    assert_same(docs, _v1_11(machine_type))
    assert all(doc.get("kind") != "HostnameConfig" for doc in docs)


@pytest.mark.parametrize("version", [V1_11, V1_12, V1_13])
def test_extra_sans_disk_image_and_domain(fixture_bundle: SecretsBundle, version: TalosVersion) -> None:
    inp = _base(
        version,
        install_disk="/dev/vda",
        install_image="ghcr.io/siderolabs/installer:v1.13.9",
        dns_domain="example.com",
        cert_sans=("foo", "bar", "10.0.0.1"),
    )
    configs = generate_configs(inp, fixture_bundle)
    for machine_type, docs in configs.items():
        machine, cluster = docs[0]["machine"], docs[0]["cluster"]
        assert machine["certSANs"] == ["foo", "bar", "10.0.0.1"]
        assert list(machine["install"])[:2] == ["disk", "image"]
        assert machine["install"]["disk"] == "/dev/vda"
        assert machine["install"]["image"] == "ghcr.io/siderolabs/installer:v1.13.9"
        assert machine["install"]["wipe"] is False
        assert cluster["network"]["dnsDomain"] == "example.com"
        if machine_type == "controlplane":
            expected = ["foo", "bar", "10.0.0.1"]
            if version == V1_11:
                expected = ["base", *expected]
            assert cluster["apiServer"]["certSANs"] == expected
        else:
            assert "apiServer" not in cluster


def test_kubernetes_version_drives_every_image(fixture_bundle: SecretsBundle) -> None:
    docs = generate_configs(_base(kubernetes_version="v1.33.2"), fixture_bundle)["controlplane"]
    cluster = docs[0]["cluster"]
    assert docs[0]["machine"]["kubelet"]["image"] == "ghcr.io/siderolabs/kubelet:v1.33.2"
    assert cluster["apiServer"]["image"] == "registry.k8s.io/kube-apiserver:v1.33.2"
    assert cluster["controllerManager"]["image"] == "registry.k8s.io/kube-controller-manager:v1.33.2"
    assert cluster["proxy"]["image"] == "registry.k8s.io/kube-proxy:v1.33.2"
    assert cluster["scheduler"]["image"] == "registry.k8s.io/kube-scheduler:v1.33.2"


def test_documents_are_independent(fixture_bundle: SecretsBundle) -> None:
    first = generate_configs(_base(), fixture_bundle)
    first["controlplane"][0]["cluster"]["apiServer"]["admissionControl"][0]["name"] = "changed"
    first["controlplane"][0]["cluster"]["apiServer"]["auditPolicy"]["rules"].append({"level": "None"})
    assert_same(generate_configs(_base(), fixture_bundle)["controlplane"], _golden("controlplane"))


# --- workers and secrets ---------------------------------------------------------------------------------

CONTROLPLANE_ONLY = (
    "secretboxEncryptionSecret",
    "aescbcEncryptionSecret",
    "aggregatorCA",
    "serviceAccount",
    "apiServer",
    "controllerManager",
    "proxy",
    "scheduler",
    "etcd",
    "extraManifests",
    "inlineManifests",
)


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in _strings(value)]
    return [node] if isinstance(node, str) else []


@pytest.mark.parametrize("version", [V1_11, V1_12, V1_13])
def test_worker_carries_no_private_key(fresh_bundle: SecretsBundle, version: TalosVersion) -> None:
    docs = generate_configs(_base(version), fresh_bundle)["worker"]
    config = docs[0]
    assert config["machine"]["ca"] == {"crt": base64.b64encode(fresh_bundle.os.crt).decode(), "key": ""}
    assert config["cluster"]["ca"] == {"crt": base64.b64encode(fresh_bundle.k8s.crt).decode(), "key": ""}
    for field in CONTROLPLANE_ONLY:
        assert field not in config["cluster"], field
    assert "nodeLabels" not in config["machine"]
    secrets_text = b"".join(
        [
            fresh_bundle.os.key,
            fresh_bundle.k8s.key,
            fresh_bundle.etcd.key,
            fresh_bundle.k8s_aggregator.key,
            fresh_bundle.k8s_service_account_key,
        ]
    )
    for value in _strings(docs):
        assert "PRIVATE KEY" not in value
        try:
            decoded = base64.b64decode(value, validate=True)
        except ValueError:
            continue
        assert b"PRIVATE KEY" not in decoded
        assert decoded == b"" or decoded not in secrets_text


def test_controlplane_carries_every_ca_key(fresh_bundle: SecretsBundle) -> None:
    config = generate_configs(_base(), fresh_bundle)["controlplane"][0]
    keys = {
        "machine.ca": config["machine"]["ca"]["key"],
        "cluster.ca": config["cluster"]["ca"]["key"],
        "cluster.aggregatorCA": config["cluster"]["aggregatorCA"]["key"],
        "cluster.etcd.ca": config["cluster"]["etcd"]["ca"]["key"],
        "cluster.serviceAccount": config["cluster"]["serviceAccount"]["key"],
    }
    for where, value in keys.items():
        assert value, where
        assert load_private_key(base64.b64decode(value)), where
    assert config["cluster"]["secretboxEncryptionSecret"] == fresh_bundle.secretbox_encryption_secret
    assert config["cluster"]["id"] == fresh_bundle.cluster_id
    assert config["cluster"]["token"] == fresh_bundle.bootstrap_token
    assert config["machine"]["token"] == fresh_bundle.trustd_token


def test_aescbc_bundle_keeps_its_encryption_key(fixture_bundle: SecretsBundle) -> None:
    doc = yaml.safe_load((FIXTURES / "secrets.yaml").read_text())
    doc["secrets"]["aescbcencryptionsecret"] = doc["secrets"].pop("secretboxencryptionsecret")
    bundle = load_secrets(yaml.safe_dump(doc))
    cluster = generate_configs(_base(), bundle)["controlplane"][0]["cluster"]
    assert cluster["aescbcEncryptionSecret"] == fixture_bundle.secretbox_encryption_secret
    assert "secretboxEncryptionSecret" not in cluster


@pytest.mark.parametrize("version", [V1_11, V1_12, V1_13])
def test_fresh_bundle_configs_pass_the_schema(fresh_bundle: SecretsBundle, version: TalosVersion) -> None:
    schema = pytest.importorskip("ktizo.talos.schema")
    inp = _base(version, install_disk="/dev/sda", cert_sans=("api.example.com",))
    for docs in generate_configs(inp, fresh_bundle).values():
        schema.validate_documents(docs)
        schema.validate_documents(load_documents(dump_documents(docs)))


# --- input validation ------------------------------------------------------------------------------------


def test_endpoint_normalisation(fixture_bundle: SecretsBundle) -> None:
    def endpoint(value: str) -> str:
        docs = generate_configs(_base(endpoint=value), fixture_bundle)["worker"]
        result: str = docs[0]["cluster"]["controlPlane"]["endpoint"]
        return result

    assert endpoint("https://base") == "https://base:6443"
    assert endpoint("https://base:6443/") == "https://base:6443"
    assert endpoint("https://10.0.0.5:443") == "https://10.0.0.5:443"
    assert endpoint("https://[fd00::1]") == "https://[fd00::1]:6443"


def test_v1_11_cert_san_from_ipv6_endpoint(fixture_bundle: SecretsBundle) -> None:
    docs = generate_configs(_base(V1_11, endpoint="https://[fd00::1]:6443"), fixture_bundle)["controlplane"]
    assert docs[0]["cluster"]["apiServer"]["certSANs"] == ["fd00::1"]


def test_leading_v_and_dual_stack_are_accepted(fixture_bundle: SecretsBundle) -> None:
    inp = _base(
        kubernetes_version="v1.30.1",
        pod_subnets=("10.244.0.0/16", "fd00:10:244::/56"),
        service_subnets=("10.96.0.0/12", "fd00:10:96::/112"),
    )
    cluster = generate_configs(inp, fixture_bundle)["controlplane"][0]["cluster"]
    assert cluster["apiServer"]["image"].endswith(":v1.30.1")
    assert cluster["network"]["podSubnets"] == ["10.244.0.0/16", "fd00:10:244::/56"]


BAD_INPUTS: list[tuple[str, dict[str, Any], str]] = [
    ("http endpoint", {"endpoint": "http://base:6443"}, "endpoint"),
    ("no scheme", {"endpoint": "base:6443"}, "endpoint"),
    ("no host", {"endpoint": "https://:6443"}, "endpoint"),
    ("endpoint path", {"endpoint": "https://base:6443/api"}, "endpoint"),
    ("endpoint userinfo", {"endpoint": "https://user:pw@base:6443"}, "endpoint"),
    ("endpoint bad port", {"endpoint": "https://base:99999"}, "endpoint"),
    ("endpoint bad host", {"endpoint": "https://ba_se!:6443"}, "endpoint"),
    ("empty endpoint", {"endpoint": ""}, "endpoint"),
    ("k8s version words", {"kubernetes_version": "latest"}, "kubernetes_version"),
    ("k8s version short", {"kubernetes_version": "1.28"}, "kubernetes_version"),
    ("k8s version junk", {"kubernetes_version": "1.28.0; rm -rf"}, "kubernetes_version"),
    ("cluster name spaces", {"cluster_name": "my cluster"}, "cluster_name"),
    ("cluster name empty", {"cluster_name": ""}, "cluster_name"),
    ("cluster name too long", {"cluster_name": "a" * 64}, "cluster_name"),
    ("cluster name leading dash", {"cluster_name": "-base"}, "cluster_name"),
    ("overlapping subnets", {"service_subnets": ("10.244.128.0/20",)}, "service_subnets"),
    ("same subnet twice", {"pod_subnets": ("10.96.0.0/12",)}, "service_subnets"),
    ("pod subnet not a CIDR", {"pod_subnets": ("10.244.0.0/33",)}, "pod_subnets"),
    ("pod subnet host bits", {"pod_subnets": ("10.244.0.1/16",)}, "pod_subnets"),
    ("pod subnet no prefix", {"pod_subnets": ("10.244.0.0",)}, "pod_subnets"),
    ("no pod subnet", {"pod_subnets": ()}, "pod_subnets"),
    ("two IPv4 service ranges", {"service_subnets": ("10.96.0.0/16", "10.97.0.0/16")}, "service_subnets"),
    ("service subnet junk", {"service_subnets": ("nope",)}, "service_subnets"),
    ("unsupported contract", {"talos_version": TalosVersion(1, 10)}, "talos_version"),
    ("future contract", {"talos_version": TalosVersion(1, 14)}, "talos_version"),
    ("install disk relative", {"install_disk": "sda"}, "install_disk"),
    ("install disk spaces", {"install_disk": "/dev/sd a"}, "install_disk"),
    ("install image spaces", {"install_image": "ghcr.io/x y"}, "install_image"),
    ("cert SAN with space", {"cert_sans": ("a b",)}, "cert_sans"),
    ("dns domain junk", {"dns_domain": "cluster..local"}, "dns_domain"),
]


@pytest.mark.parametrize(("case", "changes", "field"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_naming_the_field(
    fixture_bundle: SecretsBundle, case: str, changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationFailed) as info:
        generate_configs(_base(**changes), fixture_bundle)
    assert info.value.field == field, f"{case}: {info.value}"


def test_unknown_machine_type_is_refused(fixture_bundle: SecretsBundle) -> None:
    with pytest.raises(ValidationFailed) as info:
        generate_config(_base(), fixture_bundle, "init")  # type: ignore[arg-type]
    assert info.value.field == "machine_type"


def test_first_difference_reports_the_path() -> None:
    want = _golden("worker")
    got = copy.deepcopy(want)
    got[0]["cluster"]["network"]["podSubnets"][0] = "10.0.0.0/8"
    assert first_difference(got, want) == ("[0].cluster.network.podSubnets[0]: got '10.0.0.0/8', want '10.244.0.0/16'")
    del got[0]["machine"]["install"]
    assert (
        first_difference(got, want) == "[0].machine.install: missing (want {'wipe': False, 'grubUseUKICmdline': True})"
    )


# --- talosconfig -----------------------------------------------------------------------------------------


def _talosconfig(bundle: SecretsBundle, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    text = make_talosconfig(bundle, "base", ["10.0.0.2", "cp1.example.com:50000"], **kwargs)
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc, doc["contexts"]["base"]


def test_talosconfig_layout(fresh_bundle: SecretsBundle) -> None:
    doc, context = _talosconfig(fresh_bundle)
    assert doc["context"] == "base"
    assert list(doc["contexts"]) == ["base"]
    assert list(context) == ["endpoints", "ca", "crt", "key"]
    assert context["endpoints"] == ["10.0.0.2", "cp1.example.com:50000"]
    assert base64.b64decode(context["ca"]) == fresh_bundle.os.crt


def test_talosconfig_admin_certificate(fresh_bundle: SecretsBundle) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    _, context = _talosconfig(fresh_bundle, now=now)
    cert = x509.load_pem_x509_certificate(base64.b64decode(context["crt"]))
    ca = fresh_bundle.os.certificate()
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "os:admin"
    assert len(cert.subject) == 1
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.BasicConstraints)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    skid = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == skid.digest
    assert cert.not_valid_before_utc == now
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == ADMIN_CERT_VALIDITY == timedelta(days=365)
    assert isinstance(cert.public_key(), ed25519.Ed25519PublicKey)

    key_pem = base64.b64decode(context["key"])
    assert key_pem.startswith(b"-----BEGIN ED25519 PRIVATE KEY-----\n")
    key = load_private_key(key_pem)
    raw = serialization.Encoding.Raw
    assert key.public_key().public_bytes(raw, serialization.PublicFormat.Raw) == cert.public_key().public_bytes(
        raw, serialization.PublicFormat.Raw
    )


def test_talosconfig_from_fixture_bundle_and_empty_endpoints(fixture_bundle: SecretsBundle) -> None:
    text = make_talosconfig(fixture_bundle, "base", [])
    context = yaml.safe_load(text)["contexts"]["base"]
    assert context["endpoints"] == []
    cert = x509.load_pem_x509_certificate(base64.b64decode(context["crt"]))
    cert.verify_directly_issued_by(fixture_bundle.os.certificate())


def test_talosconfig_mints_a_new_key_each_time(fresh_bundle: SecretsBundle) -> None:
    _, first = _talosconfig(fresh_bundle)
    _, second = _talosconfig(fresh_bundle)
    assert first["key"] != second["key"]
    assert first["crt"] != second["crt"]


@pytest.mark.parametrize(
    ("context", "endpoints", "field"),
    [("", [], "context"), ("base", ["has space"], "endpoints"), ("base", [""], "endpoints")],
)
def test_talosconfig_bad_input(fresh_bundle: SecretsBundle, context: str, endpoints: list[str], field: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        make_talosconfig(fresh_bundle, context, endpoints)
    assert info.value.field == field
