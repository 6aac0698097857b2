"""Cluster configuration through the API: settings, generation, adopting a secrets bundle, the golden check
against Talos's own fixtures, talosconfig and the redacted config preview."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fastapi.testclient import TestClient

from ktizo.talos import load_documents
from tests.support import TALOS_FIXTURES, bearer

SECRETS_YAML = (TALOS_FIXTURES / "secrets.yaml").read_bytes()
GOLDEN = {
    "cluster_name": "base",
    "endpoint": "https://base:6443",
    "kubernetes_version": "1.28.0",
    "talos_version": "v1.13",
}
READY = {"cluster_name": "lab", "endpoint": "https://lab.example:6443", "kubernetes_version": "1.33.0"}
REDACTED = "***redacted***"


def _v1(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if "kind" not in d)


def _audit(client: TestClient, headers: dict[str, str], action: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = client.get(f"/api/v1/audit?action={action}", headers=headers).json()["items"]
    return items


def _adopt(client: TestClient, admin: dict[str, str], **settings: Any) -> None:
    """Talos's public test bundle as the cluster's secrets (no RSA key to make), settings, generate."""
    assert client.put("/api/v1/cluster", json={**GOLDEN, **settings}, headers=admin).status_code == 200
    r = client.post("/api/v1/cluster/secrets", content=SECRETS_YAML, headers=admin)
    assert r.status_code == 204, r.text
    r = client.post("/api/v1/cluster/generate", headers=admin)
    assert r.status_code == 200, r.text


def _device(client: TestClient, ops: dict[str, str], mac: str, **approve: Any) -> int:
    r = client.post("/api/v1/devices", json={"mac_address": mac}, headers=ops)
    assert r.status_code == 201, r.text
    device_id: int = r.json()["id"]
    r = client.post(f"/api/v1/devices/{device_id}/approve", json=approve, headers=ops)
    assert r.status_code == 200, r.text
    return device_id


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def _decoded(text: str) -> str:
    """The string, and what it says base64-decoded when it is base64 (Talos stores PEM that way)."""
    try:
        return text + base64.b64decode(text, validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return text


# -- settings ------------------------------------------------------------------------------------------


def test_defaults_before_anything_is_set(client: TestClient, viewer_token: str) -> None:
    r = client.get("/api/v1/cluster", headers=bearer(viewer_token))
    assert r.status_code == 200
    body = r.json()
    assert (body["cluster_name"], body["endpoint"], body["kubernetes_version"]) == (None, None, None)
    assert body["talos_version"] == "v1.13"
    assert body["install_disk"] == "/dev/sda"
    assert body["pod_subnets"] == ["10.244.0.0/16"]
    assert body["service_subnets"] == ["10.96.0.0/12"]
    assert body["dns_domain"] == "cluster.local"
    assert (body["secrets_present"], body["secrets_sealed"]) == (False, False)
    assert {role: b["present"] for role, b in body["bases"].items()} == {"controlplane": False, "worker": False}


def test_partial_updates_normalise_and_are_audited(client: TestClient, admin: dict[str, str]) -> None:
    r = client.put(
        "/api/v1/cluster",
        json={"cluster_name": "lab", "endpoint": "https://api.lab.example", "kubernetes_version": "v1.33.0"},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["endpoint"] == "https://api.lab.example:6443"
    assert body["kubernetes_version"] == "1.33.0"
    assert body["updated_by"] == "root"

    # Only the fields given change.
    r = client.put("/api/v1/cluster", json={"gateway": "10.0.0.1", "nameservers": ["1.1.1.1"]}, headers=admin)
    body = r.json()
    assert (body["cluster_name"], body["endpoint"], body["gateway"], body["nameservers"]) == (
        "lab",
        "https://api.lab.example:6443",
        "10.0.0.1",
        ["1.1.1.1"],
    )
    assert body["install_disk"] == "/dev/sda"

    events = _audit(client, admin, "cluster_update")
    assert len(events) == 2
    first = events[-1]["details"]
    assert first["endpoint"] == {"from": None, "to": "https://api.lab.example:6443"}
    assert first["kubernetes_version"] == {"from": None, "to": "1.33.0"}
    assert events[0]["details"] == {
        "gateway": {"from": None, "to": "10.0.0.1"},
        "nameservers": {"from": [], "to": ["1.1.1.1"]},
    }


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ({"endpoint": "https://[fd00::1]"}, {"endpoint": "https://[fd00::1]:6443"}),
        ({"endpoint": "HTTPS://Lab.Example/"}, {"endpoint": "https://lab.example:6443"}),
        ({"endpoint": "https://10.0.0.1:443"}, {"endpoint": "https://10.0.0.1:443"}),
        ({"talos_version": "1.12"}, {"talos_version": "v1.12"}),
        ({"talos_version": "v1.11.5"}, {"talos_version": "v1.11"}),
        (
            {"pod_subnets": ["10.244.0.0/16", "fd00:10:244::/56"]},
            {"pod_subnets": ["10.244.0.0/16", "fd00:10:244::/56"]},
        ),
        ({"cert_sans": ["a.example", "a.example", "10.0.0.1"]}, {"cert_sans": ["a.example", "10.0.0.1"]}),
        ({"gateway": "FD00::0001", "nameservers": ["FD00::53"]}, {"gateway": "fd00::1", "nameservers": ["fd00::53"]}),
    ],
)
def test_settings_are_stored_in_their_canonical_form(
    client: TestClient, admin: dict[str, str], given: dict[str, Any], stored: dict[str, Any]
) -> None:
    r = client.put("/api/v1/cluster", json=given, headers=admin)
    assert r.status_code == 200, r.text
    assert {k: r.json()[k] for k in stored} == stored
    body = client.get("/api/v1/cluster", headers=admin).json()
    assert {k: body[k] for k in stored} == stored


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"endpoint": "http://lab.example:6443"}, "endpoint", "https"),
        ({"endpoint": "https://lab.example:6443/k8s"}, "endpoint", "path"),
        ({"talos_version": "v1.10"}, "talos_version", "v1.11, v1.12, v1.13"),
        ({"talos_version": "v1.14"}, "talos_version", "v1.11, v1.12, v1.13"),
        ({"service_subnets": ["10.244.128.0/20"]}, "service_subnets", "overlaps"),
        ({"pod_subnets": ["10.96.0.0/16"]}, "service_subnets", "overlaps"),
        ({"gateway": "10.0.0.300"}, "gateway", "not an IP"),
        ({"nameservers": ["1.1.1.1", "dns.example"]}, "nameservers", "not an IP"),
        ({"kubernetes_version": "latest"}, "kubernetes_version", "1.28.0"),
        ({"cluster_name": "-bad-"}, "cluster_name", "letters"),
        ({"install_disk": "sda"}, "install_disk", "/dev/sda"),
        ({"endpoint": "https://admin@lab.example"}, "endpoint", "user"),
        ({"pod_subnets": ["10.244.0.1/16"]}, "pod_subnets", "host bits"),
        ({"pod_subnets": ["10.244.0.0/16", "10.245.0.0/16"]}, "pod_subnets", "more than one"),
        ({"colour": "blue"}, "colour", "Extra inputs"),
    ],
)
def test_bad_settings_are_refused_naming_the_field_and_change_nothing(
    client: TestClient, admin: dict[str, str], body: dict[str, Any], field: str, words: str
) -> None:
    assert client.put("/api/v1/cluster", json=READY, headers=admin).status_code == 200
    before = client.get("/api/v1/cluster", headers=admin).json()
    # A good change next to the bad one must not slip through either.
    r = client.put("/api/v1/cluster", json={"cluster_name": "other", **body}, headers=admin)
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert any(e["loc"][-1] == field and words in e["msg"] for e in errors), errors
    assert client.get("/api/v1/cluster", headers=admin).json() == before
    assert len(_audit(client, admin, "cluster_update")) == 1


@pytest.mark.parametrize("field", ["dns_domain", "pod_subnets", "service_subnets"])
def test_clearing_a_setting_the_cluster_needs_is_a_422(client: TestClient, admin: dict[str, str], field: str) -> None:
    before = client.get("/api/v1/cluster", headers=admin).json()
    r = client.put("/api/v1/cluster", json={field: None}, headers=admin)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"][-1] == field
    assert "empty" in r.json()["detail"][0]["msg"]
    assert client.get("/api/v1/cluster", headers=admin).json() == before


def test_an_empty_install_disk_or_image_means_none(client: TestClient, admin: dict[str, str]) -> None:
    r = client.put("/api/v1/cluster", json={**GOLDEN, "install_disk": "", "install_image": ""}, headers=admin)
    assert r.status_code == 200, r.text
    assert (r.json()["install_disk"], r.json()["install_image"]) == (None, None)
    assert client.post("/api/v1/cluster/secrets", content=SECRETS_YAML, headers=admin).status_code == 204
    r = client.post("/api/v1/cluster/generate", headers=admin)
    assert r.status_code == 200, r.text
    worker = load_documents(client.get("/api/v1/cluster/base/worker", headers=admin).content)
    assert "disk" not in _v1(worker)["machine"]["install"]
    # Optional settings may be cleared with null, and come back as null.
    r = client.put("/api/v1/cluster", json={"cert_sans": None, "nameservers": None, "gateway": None}, headers=admin)
    assert r.status_code == 200
    assert (r.json()["cert_sans"], r.json()["nameservers"], r.json()["gateway"]) == ([], [], None)


def test_viewer_reads_operator_cannot_change(
    client: TestClient, admin: dict[str, str], ops: dict[str, str], viewer_token: str
) -> None:
    client.put("/api/v1/cluster", json=READY, headers=admin)
    viewer = bearer(viewer_token)
    assert client.get("/api/v1/cluster", headers=viewer).json()["cluster_name"] == "lab"
    for who in (viewer, ops):
        r = client.put("/api/v1/cluster", json={"cluster_name": "mine"}, headers=who)
        assert r.status_code == 403
        assert client.post("/api/v1/cluster/generate", headers=who).status_code == 403
        assert client.get("/api/v1/cluster/secrets", headers=who).status_code == 403
        assert client.get("/api/v1/cluster/base/controlplane", headers=who).status_code == 403
    assert client.get("/api/v1/cluster", headers=admin).json()["cluster_name"] == "lab"
    assert client.get("/api/v1/cluster").status_code == 401


# -- generate --------------------------------------------------------------------------------------------


def test_generate_needs_the_settings_first(client: TestClient, admin: dict[str, str]) -> None:
    r = client.post("/api/v1/cluster/generate", headers=admin)
    assert r.status_code == 409
    message = r.json()["detail"]
    assert "cluster_name" in message and "endpoint" in message and "kubernetes_version" in message
    assert "ktizo cluster set" in message
    client.put("/api/v1/cluster", json={"cluster_name": "lab"}, headers=admin)
    message = client.post("/api/v1/cluster/generate", headers=admin).json()["detail"]
    assert "cluster_name" not in message.split(":")[0] and "endpoint" in message
    status = client.get("/api/v1/cluster", headers=admin).json()
    assert status["secrets_present"] is False
    assert not any(b["present"] for b in status["bases"].values())


def test_generate_makes_both_bases_and_keeps_its_secrets_unless_rotated(
    client: TestClient, admin: dict[str, str], settings: Any
) -> None:
    client.put("/api/v1/cluster", json=READY, headers=admin)
    r = client.post("/api/v1/cluster/generate", headers=admin)
    assert r.status_code == 200, r.text
    sizes = r.json()["bytes"]
    assert set(sizes) == {"controlplane", "worker"} and all(n > 1000 for n in sizes.values())
    assert r.json()["secrets_rotated"] is False

    status = client.get("/api/v1/cluster/base", headers=admin).json()
    assert {role: (b["present"], b["source"]) for role, b in status.items()} == {
        "controlplane": (True, "generated"),
        "worker": (True, "generated"),
    }
    assert client.get("/api/v1/cluster", headers=admin).json()["secrets_present"] is True
    cp = client.get("/api/v1/cluster/base/controlplane", headers=admin)
    assert cp.headers["content-type"] == "application/yaml"
    assert len(cp.content) == sizes["controlplane"]
    v1 = _v1(load_documents(cp.content))
    assert v1["cluster"]["clusterName"] == "lab"
    assert v1["cluster"]["controlPlane"]["endpoint"] == "https://lab.example:6443"
    assert v1["machine"]["type"] == "controlplane"
    assert v1["machine"]["install"]["disk"] == "/dev/sda"
    assert v1["machine"]["kubelet"]["image"].endswith(":v1.33.0")
    worker_text = client.get("/api/v1/cluster/base/worker", headers=admin).content
    worker = _v1(load_documents(worker_text))
    assert worker["machine"]["type"] == "worker"
    assert worker["machine"]["ca"]["key"] == ""  # a worker never carries the OS CA key
    # Without a sealing key the seed's layout is kept: the files mirror what is stored.
    assert (settings.base_templates_dir / "controlplane.yaml").read_bytes() == cp.content

    secrets = client.get("/api/v1/cluster/secrets", headers=admin).text
    bundle = yaml.safe_load(secrets)
    assert re.fullmatch(r"[0-9a-z]{6}\.[0-9a-z]{16}", bundle["trustdinfo"]["token"])
    assert re.fullmatch(r"[0-9a-z]{6}\.[0-9a-z]{16}", bundle["secrets"]["bootstraptoken"])
    assert base64.b64decode(bundle["certs"]["os"]["key"]).startswith(b"-----BEGIN ED25519 PRIVATE KEY-----")
    assert v1["machine"]["ca"]["key"] == bundle["certs"]["os"]["key"]
    # A worker carries no private key at all, in any field, in any encoding.
    assert not any("PRIVATE KEY" in _decoded(text) for text in _strings(load_documents(worker_text)))
    client.put("/api/v1/cluster", json={"cluster_name": "lab2"}, headers=admin)
    assert client.post("/api/v1/cluster/generate", headers=admin).status_code == 200
    assert client.get("/api/v1/cluster/secrets", headers=admin).text == secrets
    again = _v1(load_documents(client.get("/api/v1/cluster/base/controlplane", headers=admin).content))
    assert again["cluster"]["clusterName"] == "lab2"
    assert again["cluster"]["id"] == v1["cluster"]["id"]

    r = client.post("/api/v1/cluster/generate?rotate_secrets=true", headers=admin)
    assert r.status_code == 200 and r.json()["secrets_rotated"] is True
    rotated = client.get("/api/v1/cluster/secrets", headers=admin).text
    assert rotated != secrets
    assert yaml.safe_load(rotated)["cluster"]["id"] != yaml.safe_load(secrets)["cluster"]["id"]
    events = _audit(client, admin, "cluster_generate")
    assert [e["details"]["secrets"] for e in events] == ["rotated", "kept", "created"]
    assert events[0]["details"]["kubernetes_version"] == "1.33.0"
    assert _audit(client, admin, "secrets_export")[0]["actor"] == "root"


def test_golden_generation_through_the_product_equals_talos_own_output(
    client: TestClient, admin: dict[str, str]
) -> None:
    """Talos's encoding-stability fixtures: cluster `base`, https://base:6443, Kubernetes 1.28.0, contract
    v1.13, no install disk, from its public test bundle. Ktizo, driven through its API, writes the same."""
    r = client.put("/api/v1/cluster", json={**GOLDEN, "install_disk": None}, headers=admin)
    assert r.status_code == 200 and r.json()["install_disk"] is None
    assert client.post("/api/v1/cluster/secrets", content=SECRETS_YAML, headers=admin).status_code == 204
    assert client.get("/api/v1/cluster", headers=admin).json()["secrets_present"] is True
    assert client.post("/api/v1/cluster/generate", headers=admin).status_code == 200
    for role in ("controlplane", "worker"):
        stored = load_documents(client.get(f"/api/v1/cluster/base/{role}", headers=admin).content)
        assert stored == load_documents((TALOS_FIXTURES / f"{role}.yaml").read_bytes()), role
    # The bundle comes back as it went in (same values, talosctl's layout).
    exported = yaml.safe_load(client.get("/api/v1/cluster/secrets", headers=admin).text)
    assert exported == yaml.safe_load(SECRETS_YAML)
    assert _audit(client, admin, "cluster_generate")[0]["details"]["secrets"] == "kept"


def test_a_second_bundle_needs_replace(client: TestClient, admin: dict[str, str]) -> None:
    assert client.post("/api/v1/cluster/secrets", content=SECRETS_YAML, headers=admin).status_code == 204
    other = yaml.safe_load(SECRETS_YAML)
    other["cluster"]["id"] = base64.b64encode(b"x" * 32).decode()
    text = yaml.safe_dump(other)
    r = client.post("/api/v1/cluster/secrets", content=text, headers=admin)
    assert r.status_code == 409
    assert "replace=true" in r.json()["detail"]
    assert yaml.safe_load(client.get("/api/v1/cluster/secrets", headers=admin).text) == yaml.safe_load(SECRETS_YAML)

    assert client.post("/api/v1/cluster/secrets?replace=true", content=text, headers=admin).status_code == 204
    assert (
        yaml.safe_load(client.get("/api/v1/cluster/secrets", headers=admin).text)["cluster"]["id"]
        == (other["cluster"]["id"])
    )
    assert [e["details"] for e in _audit(client, admin, "secrets_import")] == [{"replaced": True}, {"replaced": False}]


def _without_os_key() -> str:
    bundle = yaml.safe_load(SECRETS_YAML)
    del bundle["certs"]["os"]["key"]
    return yaml.safe_dump(bundle)


def _swapped_key() -> str:
    bundle = yaml.safe_load(SECRETS_YAML)
    bundle["certs"]["k8s"]["key"] = bundle["certs"]["etcd"]["key"]  # a real key, of another certificate
    return yaml.safe_dump(bundle)


def _bad_token() -> str:
    bundle = yaml.safe_load(SECRETS_YAML)
    bundle["trustdinfo"]["token"] = "not-a-token"
    return yaml.safe_dump(bundle)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (_without_os_key(), "certs.os.key"),
        (_swapped_key(), "certs.k8s"),
        (_bad_token(), "trustdinfo.token"),
        ("cluster: [unclosed", None),
        ("", None),
    ],
)
def test_malformed_bundle_is_422_naming_the_field_and_stores_nothing(
    client: TestClient, admin: dict[str, str], text: str, field: str | None
) -> None:
    r = client.post("/api/v1/cluster/secrets", content=text, headers=admin)
    assert r.status_code == 422, r.text
    error = r.json()["detail"][0]
    if field is not None:
        assert ".".join(map(str, error["loc"][1:])).startswith(field), error
    assert client.get("/api/v1/cluster", headers=admin).json()["secrets_present"] is False
    assert client.get("/api/v1/cluster/secrets", headers=admin).status_code == 409
    assert _audit(client, admin, "secrets_import") == []


# -- talosconfig ----------------------------------------------------------------------------------------


def test_talosconfig_for_admins_with_the_approved_control_planes(
    client: TestClient, admin: dict[str, str], ops: dict[str, str]
) -> None:
    r = client.get("/api/v1/cluster/talosconfig", headers=admin)
    assert r.status_code == 409 and "ktizo cluster generate" in r.json()["detail"]
    _adopt(client, admin, cluster_name="lab")
    _device(client, admin, "52:54:00:00:10:10", ip_address="10.0.0.10/24", role="controlplane")
    _device(client, ops, "52:54:00:00:10:20", ip_address="10.0.0.20/24", role="worker")
    pending = client.post(
        "/api/v1/devices",
        json={"mac_address": "52:54:00:00:10:30", "ip_address": "10.0.0.30/24", "role": "controlplane"},
        headers=admin,
    )
    assert pending.status_code == 201

    assert client.get("/api/v1/cluster/talosconfig", headers=ops).status_code == 403
    r = client.get("/api/v1/cluster/talosconfig", headers=admin)
    assert r.status_code == 200
    assert "attachment" in r.headers["content-disposition"]
    config = yaml.safe_load(r.text)
    assert config["context"] == "lab"
    context = config["contexts"]["lab"]
    assert context["endpoints"] == ["10.0.0.10"]

    os_ca_pem = base64.b64decode(yaml.safe_load(SECRETS_YAML)["certs"]["os"]["crt"])
    assert base64.b64decode(context["ca"]) == os_ca_pem
    ca = x509.load_pem_x509_certificate(os_ca_pem)
    cert = x509.load_pem_x509_certificate(base64.b64decode(context["crt"]))
    cert.verify_directly_issued_by(ca)
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == ["os:admin"]
    assert isinstance(cert.public_key(), ed25519.Ed25519PublicKey)
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 364 <= days <= 366
    assert b"PRIVATE KEY" in base64.b64decode(context["key"])

    # Each call mints a new client certificate.
    second = yaml.safe_load(client.get("/api/v1/cluster/talosconfig", headers=admin).text)
    assert second["contexts"]["lab"]["crt"] != context["crt"]
    events = _audit(client, admin, "talosconfig")
    assert len(events) == 2 and events[0]["details"]["endpoints"] == ["10.0.0.10"]
    assert events[0]["actor"] == "root"


# -- preview --------------------------------------------------------------------------------------------


def test_preview_redacts_keys_and_tokens_and_reveal_is_for_admins(
    client: TestClient, admin: dict[str, str], ops: dict[str, str], viewer_token: str
) -> None:
    _adopt(client, admin)
    device_id = _device(
        client, admin, "52:54:00:00:20:01", hostname="cp-1", ip_address="10.0.0.11/24", role="controlplane"
    )

    r = client.get(f"/api/v1/devices/{device_id}/config", headers=ops)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/yaml"
    docs = load_documents(r.content)
    v1 = _v1(docs)
    for value in (
        v1["machine"]["token"],
        v1["machine"]["ca"]["key"],
        v1["cluster"]["token"],
        v1["cluster"]["secret"],
        v1["cluster"]["secretboxEncryptionSecret"],
        v1["cluster"]["ca"]["key"],
        v1["cluster"]["aggregatorCA"]["key"],
        v1["cluster"]["serviceAccount"]["key"],
        v1["cluster"]["etcd"]["ca"]["key"],
    ):
        assert value == REDACTED
    secrets = yaml.safe_load(SECRETS_YAML)
    assert v1["machine"]["ca"]["crt"] == secrets["certs"]["os"]["crt"]  # certificates are public: they stay
    assert {d.get("kind"): d for d in docs}["HostnameConfig"]["hostname"] == "cp-1"
    assert not any("PRIVATE KEY" in _decoded(s) for s in _strings(docs))
    for token in (secrets["trustdinfo"]["token"], secrets["secrets"]["bootstraptoken"], secrets["cluster"]["secret"]):
        assert token not in r.text

    # Credentials a patch adds are secrets too.
    registry = (
        "machine:\n  registries:\n    config:\n      reg.example:\n        auth:\n          password: hunter2hunter2\n"
    )
    assert client.put(f"/api/v1/devices/{device_id}", json={"patch": registry}, headers=admin).status_code == 200
    r = client.get(f"/api/v1/devices/{device_id}/config", headers=ops)
    assert "hunter2hunter2" not in r.text
    # …and so is the patch itself, below admin.
    shown = client.get(f"/api/v1/devices/{device_id}", headers=ops).json()["patch"]
    assert "hunter2hunter2" not in shown and REDACTED in shown
    assert "hunter2hunter2" in client.get(f"/api/v1/devices/{device_id}", headers=admin).json()["patch"]
    history = client.get(f"/api/v1/audit?device_id={device_id}&action=update", headers=ops).text
    assert "hunter2hunter2" not in history and "sha256" in history
    assert _v1(load_documents(r.content))["machine"]["registries"]["config"]["reg.example"]["auth"] == {
        "password": REDACTED
    }

    assert client.get(f"/api/v1/devices/{device_id}/config", headers=bearer(viewer_token)).status_code == 403
    assert client.get(f"/api/v1/devices/{device_id}/config?reveal=true", headers=ops).status_code == 403
    assert _audit(client, admin, "config_reveal") == []
    revealed = client.get(f"/api/v1/devices/{device_id}/config?reveal=true", headers=admin)
    assert revealed.status_code == 200
    full = _v1(load_documents(revealed.content))
    assert full["machine"]["ca"]["key"] == secrets["certs"]["os"]["key"]
    assert full["machine"]["token"] == secrets["trustdinfo"]["token"]
    assert "hunter2hunter2" in revealed.text
    events = _audit(client, admin, "config_reveal")
    assert len(events) == 1 and events[0]["device_id"] == device_id and events[0]["actor"] == "root"
    assert client.get("/api/v1/devices/999/config", headers=ops).status_code == 404


def test_preview_shows_what_a_pending_device_would_get(
    client: TestClient, admin: dict[str, str], ops: dict[str, str]
) -> None:
    _adopt(client, admin)
    r = client.post(
        "/api/v1/devices",
        json={"mac_address": "52:54:00:00:20:02", "hostname": "w-9", "ip_address": "10.0.0.99/24"},
        headers=ops,
    )
    device_id = r.json()["id"]
    assert r.json()["status"] == "pending"
    docs = load_documents(client.get(f"/api/v1/devices/{device_id}/config", headers=ops).content)
    by_kind = {d.get("kind"): d for d in docs}
    assert by_kind[None]["machine"]["type"] == "worker"
    assert by_kind["HostnameConfig"]["hostname"] == "w-9"
    assert by_kind["LinkConfig"]["addresses"] == [{"address": "10.0.0.99/24"}]
    assert by_kind[None]["machine"]["ca"]["key"] == ""  # a worker's empty key stays visibly empty
    # Previewing is not downloading: the device is still pending and has fetched nothing.
    after = client.get(f"/api/v1/devices/{device_id}", headers=ops).json()
    assert (after["status"], after["last_config_download"]) == ("pending", None)


def test_preview_without_a_base_says_what_to_do(client: TestClient, ops: dict[str, str]) -> None:
    device_id = client.post("/api/v1/devices", json={"mac_address": "52:54:00:00:20:03"}, headers=ops).json()["id"]
    r = client.get(f"/api/v1/devices/{device_id}/config", headers=ops)
    assert r.status_code == 503
    assert "ktizo cluster generate" in r.json()["detail"]
