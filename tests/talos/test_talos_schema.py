"""Validation against Talos's schema (overlaid with deprecated fields) and Talos's cross-document rules."""

from __future__ import annotations

import copy
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from ktizo.domain.errors import ValidationFailed
from ktizo.talos import check_unique, document_key, load_documents, machine_type, validate_documents
from ktizo.talos.schema import known_kinds, overlay_schema

FIXTURES = Path(__file__).parent.parent / "fixtures" / "talos"
SCHEMA_SHA256 = "3729ac38813c92a35d3159444402d9e7955b5b67aa28303969d5e1d1fa9d2d1d"


def _base(name: str = "worker") -> list[dict[str, Any]]:
    return load_documents((FIXTURES / f"{name}.yaml").read_bytes())


def _refusal(docs: list[dict[str, Any]]) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as exc:
        validate_documents(docs)
    return exc.value


def _packaged_schema_bytes() -> bytes:
    return (resources.files("ktizo.talos") / "data" / "config.schema.json").read_bytes()


def test_packaged_schema_is_the_unchanged_talos_file() -> None:
    assert hashlib.sha256(_packaged_schema_bytes()).hexdigest() == SCHEMA_SHA256


def test_overlay_is_a_valid_schema_and_built_once() -> None:
    Draft202012Validator.check_schema(overlay_schema())
    assert overlay_schema() is overlay_schema()


@pytest.mark.parametrize("name", ["controlplane", "worker"])
def test_talos_examples_validate(name: str) -> None:
    docs = _base(name)
    validate_documents(docs)
    assert machine_type(docs) == name


def test_the_raw_schema_alone_would_refuse_the_examples_persist_field() -> None:
    # What the overlay is for: Talos's own generator writes `persist`, its own schema does not allow it.
    raw = json.loads(_packaged_schema_bytes())
    assert not Draft202012Validator(raw).is_valid(_base()[0])
    config_only = {key: raw[key] for key in ("$schema", "$id", "$defs")} | {"$ref": "#/$defs/v1alpha1.Config"}
    messages = [e.message for e in Draft202012Validator(config_only).iter_errors(_base()[0])]
    assert messages == ["Additional properties are not allowed ('persist' was unexpected)"]


def test_typo_names_the_field_and_suggests_the_right_one() -> None:
    docs = _base()
    docs[0]["machine"]["instal"] = {"disk": "/dev/sda"}
    error = _refusal(docs)
    assert error.field == "machine.instal"
    assert error.message == ("document 1 (v1alpha1): machine.instal: unknown field 'instal' (did you mean 'install'?)")


def test_wrong_type_names_the_path() -> None:
    docs = _base()
    docs[0]["machine"]["install"]["disk"] = 5
    error = _refusal(docs)
    assert error.field == "machine.install.disk"
    assert "5 is not of type 'string'" in error.message


def test_errors_in_later_documents_carry_their_number_and_kind() -> None:
    docs = _base()
    docs.append({"apiVersion": "v1alpha1", "kind": "LinkConfig", "name": "net0", "addresses": [{"address": "x"}]})
    error = _refusal(docs)
    assert error.field == "addresses[0].address"
    assert error.message.startswith("document 3 (LinkConfig): addresses[0].address:")


def test_missing_required_field_points_at_it() -> None:
    docs = [*_base(), {"apiVersion": "v1alpha1", "kind": "LinkAliasConfig"}]
    error = _refusal(docs)
    assert error.field == "name"
    assert "required field 'name' is missing" in error.message


def test_unknown_kind_is_named() -> None:
    docs = [*_base(), {"apiVersion": "v1alpha1", "kind": "HostnameConfg", "hostname": "x"}]
    error = _refusal(docs)
    assert error.field == "kind"
    assert "unknown kind 'HostnameConfg'" in error.message
    assert "did you mean 'HostnameConfig'" in error.message


def test_kinds_come_from_the_schema() -> None:
    kinds = known_kinds()
    assert len(kinds) == 43  # 44 oneOf branches, one of which is the kind-less v1alpha1 document
    assert {"HostnameConfig", "LinkConfig", "LinkAliasConfig", "ResolverConfig"} <= kinds


def test_duplicate_documents_are_refused() -> None:
    docs = _base()
    docs.append(copy.deepcopy(docs[1]))
    with pytest.raises(ValidationFailed, match="documents 2 and 3 are both HostnameConfig"):
        check_unique(docs)
    assert "Talos refuses duplicate documents" in _refusal(docs).message


def test_same_kind_with_different_names_is_fine() -> None:
    links = [
        {
            "apiVersion": "v1alpha1",
            "kind": "LinkConfig",
            "name": name,
            "addresses": [{"address": "10.0.0.2/24"}],
        }
        for name in ("net0", "net1")
    ]
    validate_documents([*_base(), *links])
    with pytest.raises(ValidationFailed, match="LinkConfig 'net0'"):
        check_unique([*_base(), links[0], copy.deepcopy(links[0])])


def test_exactly_one_v1alpha1_document() -> None:
    base = _base()
    assert "found 0" in _refusal(base[1:]).message
    assert "v1alpha1 machine config" in _refusal([base[0], copy.deepcopy(base[0]), base[1]]).message


def test_document_key_and_machine_type() -> None:
    base = _base("controlplane")
    assert document_key(base[0]) == ("v1alpha1", "v1alpha1", "")
    assert document_key(base[1]) == ("v1alpha1", "HostnameConfig", "")
    assert document_key({"apiVersion": "v1alpha1", "kind": "LinkConfig", "name": "n"}) == (
        "v1alpha1",
        "LinkConfig",
        "n",
    )
    assert machine_type(base) == "controlplane"
    assert machine_type([{"version": "v1alpha1"}]) is None


def test_legacy_network_section_is_accepted() -> None:
    docs = _base()
    docs[0]["machine"]["network"] = {
        "interfaces": [
            {
                "deviceSelector": {"hardwareAddr": "aa:bb:cc:dd:ee:ff", "physical": True},
                "addresses": ["10.0.5.100/24"],
                "routes": [{"network": "0.0.0.0/0", "gateway": "10.0.5.1", "metric": 1024}],
                "dhcp": False,
                "vip": {"ip": "10.0.5.10"},
            },
            {
                "interface": "eth1",
                "dhcp": True,
                "dhcpOptions": {"routeMetric": 100},
                "vlans": [{"vlanId": 5}],
            },
        ],
        "extraHostEntries": [{"ip": "10.0.5.2", "aliases": ["registry"]}],
        "kubespan": {"enabled": True},
    }
    validate_documents(docs)


def test_legacy_network_is_still_strict_about_typos() -> None:
    docs = _base()
    docs[0]["machine"]["network"] = {"interfaces": [{"deviceSelector": {"hardwareAddr": "x"}, "adresses": []}]}
    error = _refusal(docs)
    assert error.field == "machine.network.interfaces[0].adresses"
    assert "did you mean 'addresses'" in error.message


def test_other_deprecated_fields_are_accepted() -> None:
    config = _base()[0]
    machine = config["machine"]
    machine["env"] = {"https_proxy": "http://proxy:3128"}
    machine["time"] = {"servers": ["pool.ntp.org"]}
    machine["registries"] = {"mirrors": {"docker.io": {"endpoints": ["http://mirror:5000"]}}}
    machine["disks"] = [{"device": "/dev/sdb", "partitions": [{"mountpoint": "/var/mnt/data"}]}]
    machine["systemDiskEncryption"] = {"state": {"provider": "luks2", "keys": [{"nodeID": {}, "slot": 0}]}}
    machine["features"].update({"rbac": True, "stableHostname": True, "apidCheckExtKeyUsage": True})
    machine["install"].update({"extraKernelArgs": ["console=ttyS0"], "extensions": [{"image": "ghcr.io/x:1"}]})
    # stableHostname conflicts with a HostnameConfig document, so this config has none (a 1.11 contract).
    validate_documents([config])


def test_hostname_together_with_auto_stable_is_refused() -> None:
    docs = _base()
    docs[1]["hostname"] = "node-01"
    error = _refusal(docs)
    assert error.field == "auto"
    assert "cannot be set together" in error.message


def test_hostname_document_conflicts_with_legacy_hostname() -> None:
    docs = _base()
    docs[1] = {"apiVersion": "v1alpha1", "kind": "HostnameConfig", "hostname": "a", "auto": "off"}
    validate_documents(docs)
    docs[0]["machine"]["network"] = {"hostname": "b"}
    assert _refusal(docs).field == "machine.network.hostname"


def test_resolver_document_conflicts_with_legacy_nameservers() -> None:
    docs = _base()
    docs.append({"apiVersion": "v1alpha1", "kind": "ResolverConfig", "nameservers": [{"address": "1.1.1.1"}]})
    validate_documents(docs)
    docs[0]["machine"]["network"] = {"nameservers": ["8.8.8.8"]}
    assert _refusal(docs).field == "machine.network.nameservers"


def test_unquoted_off_gets_a_quoting_hint() -> None:
    text = (FIXTURES / "worker.yaml").read_text().replace("auto: stable", "auto: off")
    error = _refusal(load_documents(text))
    assert error.field == "auto"
    assert "quote it" in error.message
