"""Redaction: private keys and secrets disappear, certificates and harmless identifiers stay."""

from __future__ import annotations

import base64
import binascii
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ktizo.talos.redact import REDACTED, SECRET_DOCUMENT_FIELDS, SECRET_FIELDS, redact
from ktizo.talos.yamlio import load_documents

FIXTURES = Path(__file__).parent.parent / "fixtures" / "talos"

PEM_KEY = "-----BEGIN EC PRIVATE KEY-----\nbm90IGEgcmVhbCBrZXksIGp1c3QgdGVzdCBieXRlcw==\n-----END EC PRIVATE KEY-----\n"


def _base(name: str) -> list[dict[str, Any]]:
    return load_documents((FIXTURES / f"{name}.yaml").read_bytes())


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for child in value.values():
            yield from _strings(child)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def _decoded(text: str) -> str:
    try:
        return base64.b64decode(text, validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return ""


def _at(document: dict[str, Any], dotted: str) -> Any:
    node: Any = document
    for part in dotted.split("."):
        node = node[part]
    return node


def test_secret_fields_cover_what_talos_generates() -> None:
    for path in (
        "machine.ca.key",
        "machine.token",
        "machine.acceptedCAs[].key",
        "cluster.ca.key",
        "cluster.aggregatorCA.key",
        "cluster.serviceAccount.key",
        "cluster.etcd.ca.key",
        "cluster.token",
        "cluster.secret",
        "cluster.secretboxEncryptionSecret",
        "cluster.aescbcEncryptionSecret",
    ):
        assert path in SECRET_FIELDS
    assert "cluster.id" not in SECRET_FIELDS
    assert not any(path.endswith(".crt") for path in SECRET_FIELDS)


def test_every_private_key_of_the_controlplane_example_is_removed() -> None:
    base = _base("controlplane")
    assert any("PRIVATE KEY" in _decoded(text) for text in _strings(base))
    result = redact(base)
    for text in _strings(result):
        assert "PRIVATE KEY" not in text
        assert "PRIVATE KEY" not in _decoded(text)
    config = result[0]
    for path in (
        "machine.ca.key",
        "machine.token",
        "cluster.ca.key",
        "cluster.aggregatorCA.key",
        "cluster.serviceAccount.key",
        "cluster.etcd.ca.key",
        "cluster.token",
        "cluster.secret",
        "cluster.secretboxEncryptionSecret",
    ):
        assert _at(config, path) == REDACTED, path


def test_certificates_and_harmless_fields_stay() -> None:
    base = _base("controlplane")
    result = redact(base)
    for path in ("machine.ca.crt", "cluster.ca.crt", "cluster.aggregatorCA.crt", "cluster.etcd.ca.crt"):
        assert _at(result[0], path) == _at(base[0], path)
        assert "CERTIFICATE" in _decoded(_at(result[0], path))
    assert result[0]["cluster"]["id"] == base[0]["cluster"]["id"]
    assert result[0]["cluster"]["controlPlane"] == base[0]["cluster"]["controlPlane"]
    assert result[0]["cluster"]["apiServer"] == base[0]["cluster"]["apiServer"]
    assert result[1] == base[1]


def test_the_worker_example_keeps_its_empty_keys_empty() -> None:
    result = redact(_base("worker"))
    assert result[0]["machine"]["ca"]["key"] == ""
    assert result[0]["cluster"]["ca"]["key"] == ""
    assert result[0]["machine"]["token"] == REDACTED
    assert result[0]["cluster"]["token"] == REDACTED
    assert result[0]["cluster"]["secret"] == REDACTED


def test_the_input_is_not_changed() -> None:
    base = _base("controlplane")
    before = copy.deepcopy(base)
    result = redact(base)
    assert base == before
    result[0]["machine"]["ca"]["crt"] = "changed"
    assert base == before


def test_lists_and_wildcards_in_paths_are_followed() -> None:
    config: dict[str, Any] = {
        "machine": {
            "acceptedCAs": [{"crt": "cert", "key": "secret-1"}, {"crt": "cert2"}],
            "network": {
                "interfaces": [
                    {"interface": "wg0", "wireguard": {"privateKey": "wg-secret", "peers": []}},
                    {"interface": "eth0", "vip": {"ip": "10.0.0.9", "hcloud": {"apiToken": "hc-secret"}}},
                ]
            },
            "registries": {
                "config": {
                    "ghcr.io": {"auth": {"username": "me", "password": "pw", "identityToken": ""}},
                    "docker.io": {"tls": {"clientIdentity": {"crt": "cert", "key": "tls-secret"}}},
                }
            },
            "systemDiskEncryption": {"state": {"provider": "luks2", "keys": [{"static": {"passphrase": "pp"}}]}},
        }
    }
    result = redact([config])[0]["machine"]
    assert result["acceptedCAs"] == [{"crt": "cert", "key": REDACTED}, {"crt": "cert2"}]
    assert result["network"]["interfaces"][0]["wireguard"] == {"privateKey": REDACTED, "peers": []}
    assert result["network"]["interfaces"][1]["vip"] == {"ip": "10.0.0.9", "hcloud": {"apiToken": REDACTED}}
    assert result["registries"]["config"]["ghcr.io"]["auth"] == {
        "username": "me",
        "password": REDACTED,
        "identityToken": "",
    }
    assert result["registries"]["config"]["docker.io"]["tls"]["clientIdentity"] == {"crt": "cert", "key": REDACTED}
    assert result["systemDiskEncryption"]["state"]["keys"] == [{"static": {"passphrase": REDACTED}}]


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (
            {
                "apiVersion": "v1alpha1",
                "kind": "RegistryAuthConfig",
                "name": "ghcr.io",
                "username": "u",
                "password": "p",
            },
            {"username": "u", "password": REDACTED},
        ),
        (
            {
                "apiVersion": "v1alpha1",
                "kind": "WireguardConfig",
                "name": "wg0",
                "privateKey": "k",
                "peers": [{"publicKey": "pub", "presharedKey": "psk"}],
            },
            {"privateKey": REDACTED, "peers": [{"publicKey": "pub", "presharedKey": REDACTED}]},
        ),
        (
            {
                "apiVersion": "v1alpha1",
                "kind": "SideroLinkConfig",
                "apiUrl": "https://siderolink.example/join?jointoken=s3cret&grpc_tunnel=true",
                "uniqueToken": "t",
            },
            {
                "apiUrl": f"https://siderolink.example/join?jointoken={REDACTED}&grpc_tunnel=true",
                "uniqueToken": REDACTED,
            },
        ),
        (
            {
                "apiVersion": "v1alpha1",
                "kind": "UserVolumeConfig",
                "name": "data",
                "encryption": {"provider": "luks2", "keys": [{"slot": 0, "static": {"passphrase": "pp"}}]},
            },
            {"encryption": {"provider": "luks2", "keys": [{"slot": 0, "static": {"passphrase": REDACTED}}]}},
        ),
        (
            {"apiVersion": "v1alpha1", "kind": "HostnameConfig", "hostname": "key", "auto": "off"},
            {"hostname": "key", "auto": "off"},
        ),
    ],
)
def test_secrets_of_other_documents_are_redacted(document: dict[str, Any], expected: dict[str, Any]) -> None:
    result = redact([{"machine": {"type": "worker"}}, document])[1]
    for key, value in expected.items():
        assert result[key] == value
    assert set(SECRET_DOCUMENT_FIELDS) >= {"RegistryAuthConfig", "WireguardConfig", "SideroLinkConfig"}


@pytest.mark.parametrize(
    "value",
    [
        PEM_KEY,
        base64.b64encode(PEM_KEY.encode()).decode(),
        base64.urlsafe_b64encode(PEM_KEY.encode()).decode().rstrip("="),
        "prefix text\n" + PEM_KEY.replace("EC ", "ENCRYPTED "),
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
    ],
)
def test_private_keys_anywhere_are_redacted(value: str) -> None:
    config = {
        "machine": {
            "type": "worker",
            "files": [{"path": "/var/etc/key.pem", "content": value, "op": "create"}],
            "env": {"KEY": value},
        },
        "cluster": {"inlineManifests": [{"name": "secret", "contents": value}]},
    }
    service = {
        "apiVersion": "v1alpha1",
        "kind": "ExtensionServiceConfig",
        "name": "x",
        "configFiles": [{"content": value}],
    }
    result = redact([config, service])
    assert result[0]["machine"]["files"][0] == {"path": "/var/etc/key.pem", "content": REDACTED, "op": "create"}
    assert result[0]["machine"]["env"] == {"KEY": REDACTED}
    assert result[0]["cluster"]["inlineManifests"][0]["contents"] == REDACTED
    assert result[1]["configFiles"] == [{"content": REDACTED}]


@pytest.mark.parametrize(
    "value",
    [
        "",
        "plain text mentioning a PRIVATE KEY without the PEM dashes",
        base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").decode(),
        base64.b64encode(bytes(range(256))).decode(),
        "not/base64/at/all!" * 10,
    ],
)
def test_other_strings_are_kept(value: str) -> None:
    config = {"machine": {"type": "worker", "env": {"X": value}}}
    assert redact([config]) == [config]
