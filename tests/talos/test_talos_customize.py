"""Per-device customization: for every example base, supported Talos version and kind of customization, the
result validates and says what the device was given, in the place that Talos version reads it."""

from __future__ import annotations

import copy
import functools
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from ktizo.domain.errors import ValidationFailed
from ktizo.talos import (
    SUPPORTED_TALOS_VERSIONS,
    Customization,
    Nic,
    TalosVersion,
    customize,
    load_documents,
    render,
    validate_documents,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "talos"
V1_11, V1_12, V1_13 = SUPPORTED_TALOS_VERSIONS
MULTIDOC_NETWORK_KINDS = {"HostnameConfig", "LinkConfig", "LinkAliasConfig", "ResolverConfig"}

NIC_A = Nic(mac="aa:bb:cc:dd:ee:01", addresses=("10.0.5.100/24",))
NIC_A_GW = Nic(mac="aa:bb:cc:dd:ee:01", addresses=("10.0.5.100/24",), gateway="10.0.5.1")
NIC_B_V6 = Nic(mac="aa:bb:cc:dd:ee:02", addresses=("fd00:5::64/64", "10.0.6.7/24"), gateway="fd00:5::1")

CUSTOMIZATIONS = {
    "nothing": Customization(),
    "hostname": Customization(hostname="node-01"),
    "nic": Customization(nics=(NIC_A,)),
    "nic+gateway": Customization(nics=(NIC_A_GW,)),
    "nameservers": Customization(nameservers=("10.0.0.53", "2606:4700:4700::1111")),
    "hostname+nic+gateway": Customization(hostname="node-01.lab.example", nics=(NIC_A_GW,)),
    "two-nics": Customization(hostname="node-02", nics=(NIC_A_GW, NIC_B_V6)),
    "everything": Customization(
        hostname="node-03", nics=(NIC_A_GW, NIC_B_V6), nameservers=("10.0.0.53",), install_disk="/dev/nvme0n1"
    ),
}


@functools.cache
def _base_text(name: str) -> str:
    return (FIXTURES / f"{name}.yaml").read_text()


def _base(name: str) -> list[dict[str, Any]]:
    return load_documents(_base_text(name))


def _config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [config] = [doc for doc in docs if "kind" not in doc]
    return config


def _of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc.get("kind") == kind]


def _named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [doc] = [doc for doc in _of_kind(docs, kind) if doc.get("name") == name]
    return doc


def _network(docs: list[dict[str, Any]]) -> dict[str, Any]:
    network: dict[str, Any] = _config(docs)["machine"].get("network", {})
    return network


def _check_hostname(out: list[dict[str, Any]], text: str, c: Customization, version: TalosVersion) -> None:
    hostnames = _of_kind(out, "HostnameConfig")
    if c.hostname:
        assert text.count(c.hostname) == 1
        if version.multidoc_network:
            assert hostnames == [
                {"apiVersion": "v1alpha1", "kind": "HostnameConfig", "auto": "off", "hostname": c.hostname}
            ]
            assert "hostname" not in _network(out)
        else:
            assert _network(out)["hostname"] == c.hostname
    elif version.multidoc_network:
        assert hostnames == [{"apiVersion": "v1alpha1", "kind": "HostnameConfig", "auto": "stable"}]
    else:
        # The base's HostnameConfig {auto: stable} said the same thing the 1.11 way.
        assert _config(out)["machine"]["features"]["stableHostname"] is True


def _check_nics(out: list[dict[str, Any]], c: Customization, version: TalosVersion) -> None:
    if version.multidoc_network:
        assert len(_of_kind(out, "LinkConfig")) == len(_of_kind(out, "LinkAliasConfig")) == len(c.nics)
        for index, nic in enumerate(c.nics):
            alias = _named(out, "LinkAliasConfig", f"ktizo{index}")
            assert alias["selector"] == {"match": f'mac(link.permanent_addr) == "{nic.mac}"'}
            link = _named(out, "LinkConfig", f"ktizo{index}")
            assert link["addresses"] == [{"address": address} for address in nic.addresses]
            assert link.get("routes") == ([{"gateway": nic.gateway}] if nic.gateway else None)
        return
    interfaces = _network(out).get("interfaces", [])
    assert len(interfaces) == len(c.nics)
    for nic, entry in zip(c.nics, interfaces, strict=True):
        assert entry["deviceSelector"] == {"hardwareAddr": nic.mac}
        assert entry["addresses"] == list(nic.addresses)
        assert entry["dhcp"] is False
        if nic.gateway:
            default = "::/0" if ipaddress.ip_address(nic.gateway).version == 6 else "0.0.0.0/0"
            assert entry["routes"] == [{"network": default, "gateway": nic.gateway}]
        else:
            assert "routes" not in entry


def _check_nameservers(out: list[dict[str, Any]], c: Customization, version: TalosVersion) -> None:
    resolvers = _of_kind(out, "ResolverConfig")
    if not c.nameservers:
        assert resolvers == []
        assert "nameservers" not in _network(out)
    elif version.multidoc_network:
        assert [r["nameservers"] for r in resolvers] == [[{"address": a} for a in c.nameservers]]
    else:
        assert _network(out)["nameservers"] == list(c.nameservers)


@pytest.mark.parametrize("base_name", ["controlplane", "worker"])
@pytest.mark.parametrize("version", SUPPORTED_TALOS_VERSIONS, ids=str)
@pytest.mark.parametrize("c", CUSTOMIZATIONS.values(), ids=CUSTOMIZATIONS.keys())
def test_customized_config_validates_and_says_what_the_device_gets(
    base_name: str, version: TalosVersion, c: Customization
) -> None:
    base = _base(base_name)
    out = customize(base, c, version)
    validate_documents(out)

    body = render(base, c, version)
    text = body.decode()
    assert load_documents(body) == out  # what the machine downloads is what was checked
    validate_documents(load_documents(body))

    _check_hostname(out, text, c, version)
    _check_nics(out, c, version)
    _check_nameservers(out, c, version)
    install = _config(out)["machine"]["install"]
    assert install.get("disk") == c.install_disk
    if not version.multidoc_network:
        assert not {doc.get("kind") for doc in out} & MULTIDOC_NETWORK_KINDS
    # Everything else of the base is untouched: cluster identity and role stay as they were.
    assert _config(out)["cluster"] == _config(base)["cluster"]
    assert _config(out)["machine"]["type"] == base_name
    assert _config(out)["machine"]["token"] == _config(base)["machine"]["token"]


@pytest.mark.parametrize("version", SUPPORTED_TALOS_VERSIONS, ids=str)
@pytest.mark.parametrize("base_name", ["controlplane", "worker"])
def test_base_is_not_mutated(base_name: str, version: TalosVersion) -> None:
    base = _base(base_name)
    before = copy.deepcopy(base)
    out = customize(base, CUSTOMIZATIONS["everything"], version)
    assert base == before
    # Nothing is shared either: changing the result later cannot reach the cached base.
    out[-1]["mutated"] = True
    _config(out)["cluster"]["network"]["podSubnets"].append("10.99.0.0/16")
    assert base == before


@pytest.mark.parametrize("version", [V1_12, V1_13], ids=str)
def test_existing_hostname_document_is_reused_not_duplicated(version: TalosVersion) -> None:
    base = _base("worker")
    assert len(_of_kind(base, "HostnameConfig")) == 1
    out = customize(base, Customization(hostname="node-09"), version)
    assert len(out) == len(base) == 2
    assert out[1] == {
        "apiVersion": "v1alpha1",
        "kind": "HostnameConfig",
        "auto": "off",
        "hostname": "node-09",
    }


@pytest.mark.parametrize("version", [V1_12, V1_13], ids=str)
def test_hostname_document_is_added_when_the_base_has_none(version: TalosVersion) -> None:
    base = _base("worker")[:1]
    out = customize(base, Customization(hostname="node-09"), version)
    validate_documents(out)
    assert _of_kind(out, "HostnameConfig") == [
        {"apiVersion": "v1alpha1", "kind": "HostnameConfig", "hostname": "node-09", "auto": "off"}
    ]


def test_generated_documents_replace_same_named_ones_from_the_base() -> None:
    base = _base("worker")
    base += [
        {
            "apiVersion": "v1alpha1",
            "kind": "LinkAliasConfig",
            "name": "ktizo0",
            "selector": {"match": "true"},
        },
        {"apiVersion": "v1alpha1", "kind": "LinkConfig", "name": "ktizo0", "mtu": 9000},
        {"apiVersion": "v1alpha1", "kind": "ResolverConfig", "searchDomains": {"domains": ["lab.example"]}},
    ]
    c = Customization(nics=(NIC_A_GW,), nameservers=("10.0.0.53",))
    out = customize(base, c, V1_13)
    validate_documents(out)
    assert [doc.get("kind") for doc in out] == [
        None,
        "HostnameConfig",
        "LinkAliasConfig",
        "LinkConfig",
        "ResolverConfig",
    ]
    assert _named(out, "LinkConfig", "ktizo0") == {
        "apiVersion": "v1alpha1",
        "kind": "LinkConfig",
        "name": "ktizo0",
        "addresses": [{"address": "10.0.5.100/24"}],
        "routes": [{"gateway": "10.0.5.1"}],
    }
    # The resolver document is merged: the base's search domains stay, the device's servers are set.
    assert out[4]["searchDomains"] == {"domains": ["lab.example"]}
    assert out[4]["nameservers"] == [{"address": "10.0.0.53"}]


def test_auto_off_reaches_talos_as_the_string_off() -> None:
    text = render(_base("worker"), Customization(hostname="node-01"), V1_13).decode()
    assert "auto: 'off'" in text or 'auto: "off"' in text
    docs = list(yaml.safe_load_all(text))
    assert docs[1]["auto"] == "off"
    assert isinstance(docs[1]["auto"], str)


@pytest.mark.parametrize("version", SUPPORTED_TALOS_VERSIONS, ids=str)
def test_worker_output_carries_no_ca_private_key(version: TalosVersion) -> None:
    out = customize(_base("worker"), CUSTOMIZATIONS["everything"], version)
    config = _config(out)
    assert config["machine"]["ca"]["key"] == ""
    assert config["cluster"]["ca"]["key"] == ""
    text = render(_base("worker"), CUSTOMIZATIONS["everything"], version).decode()
    assert "PRIVATE KEY" not in text
    assert "LS0tLS1CRUdJTiBFRDI1NTE5IFBSSVZBVEUgS0VZ" not in text  # base64 of "-----BEGIN ED25519 PRIVATE KEY"
    assert "aggregatorCA" not in text
    assert "serviceAccount" not in text


def test_controlplane_keys_are_passed_through_unchanged() -> None:
    base = _base("controlplane")
    out = customize(base, CUSTOMIZATIONS["everything"], V1_13)
    assert _config(out)["machine"]["ca"] == _config(base)["machine"]["ca"]


def test_customization_input_is_normalized() -> None:
    c = Customization(
        hostname="Node-01.Lab.Example.",
        nics=(Nic(mac="AA-BB-CC-DD-EE-01", addresses=(" 10.0.5.100/24 ",), gateway="10.0.5.1"),),
        nameservers=("FD00::53",),
    )
    out = customize(_base("worker"), c, V1_13)
    validate_documents(out)
    assert out[1]["hostname"] == "node-01.lab.example"
    assert _named(out, "LinkAliasConfig", "ktizo0")["selector"]["match"] == (
        'mac(link.permanent_addr) == "aa:bb:cc:dd:ee:01"'
    )
    assert _named(out, "LinkConfig", "ktizo0")["addresses"] == [{"address": "10.0.5.100/24"}]
    assert _of_kind(out, "ResolverConfig")[0]["nameservers"] == [{"address": "fd00::53"}]


def test_nic_without_addresses_or_gateway_adds_nothing() -> None:
    c = Customization(nics=(Nic(mac="aa:bb:cc:dd:ee:09"),))
    assert customize(_base("worker"), c, V1_13) == _base("worker")


@pytest.mark.parametrize(
    ("c", "field"),
    [
        (Customization(hostname="-bad-"), "hostname"),
        (Customization(nics=(Nic(mac="not-a-mac", addresses=("10.0.0.2/24",)),)), "nics[0].mac"),
        (
            Customization(nics=(Nic(mac="aa:bb:cc:dd:ee:01", addresses=("10.0.0.2",)),)),
            "nics[0].addresses[0]",
        ),
        (
            Customization(nics=(NIC_A, Nic(mac="aa:bb:cc:dd:ee:02", addresses=("10.0.0.300/24",)))),
            "nics[1].addresses[0]",
        ),
        (Customization(nics=(Nic(mac="aa:bb:cc:dd:ee:01", gateway="gw"),)), "nics[0].gateway"),
        (Customization(nics=(NIC_A, NIC_A_GW)), "nics[1].mac"),
        (Customization(nameservers=("dns.example",)), "nameservers[0]"),
        (Customization(install_disk="sda"), "install_disk"),
        (Customization(install_disk="/dev/sda; rm -rf /"), "install_disk"),
    ],
)
def test_malformed_customization_is_refused(c: Customization, field: str) -> None:
    with pytest.raises(ValidationFailed) as exc:
        customize(_base("worker"), c, V1_13)
    assert exc.value.field == field


def test_unsupported_version_is_refused() -> None:
    with pytest.raises(ValidationFailed) as exc:
        customize(_base("worker"), Customization(hostname="a"), TalosVersion(1, 14))
    assert exc.value.field == "talos_version"


def test_install_disk_wins_over_a_disk_selector() -> None:
    base = _base("worker")
    _config(base)["machine"]["install"]["diskSelector"] = {"size": ">= 100GB"}
    out = customize(base, Customization(install_disk="/dev/sdb"), V1_13)
    validate_documents(out)
    assert _config(out)["machine"]["install"] == {
        "wipe": False,
        "grubUseUKICmdline": True,
        "disk": "/dev/sdb",
    }


def test_legacy_interface_for_the_same_mac_is_replaced() -> None:
    base = _base("worker")[:1]
    _config(base)["machine"]["network"] = {
        "interfaces": [
            {"deviceSelector": {"hardwareAddr": "AA:BB:CC:DD:EE:01"}, "dhcp": True},
            {"interface": "eth1", "dhcp": True},
        ]
    }
    out = customize(base, Customization(nics=(NIC_A_GW,)), V1_11)
    validate_documents(out)
    assert _network(out)["interfaces"] == [
        {
            "deviceSelector": {"hardwareAddr": "aa:bb:cc:dd:ee:01"},
            "addresses": ["10.0.5.100/24"],
            "routes": [{"network": "0.0.0.0/0", "gateway": "10.0.5.1"}],
            "dhcp": False,
        },
        {"interface": "eth1", "dhcp": True},
    ]


@pytest.mark.parametrize("version", [V1_12, V1_13], ids=str)
def test_legacy_base_moves_to_documents_on_newer_talos(version: TalosVersion) -> None:
    # A base written for Talos 1.11: hostname, DNS and the NIC in machine.network, stableHostname on.
    base = _base("worker")[:1]
    machine = _config(base)["machine"]
    machine["features"]["stableHostname"] = True
    machine["network"] = {
        "hostname": "from-base",
        "nameservers": ["8.8.8.8"],
        "searchDomains": ["lab.example"],
        "interfaces": [{"deviceSelector": {"hardwareAddr": "aa:bb:cc:dd:ee:01"}, "dhcp": True}],
    }
    out = customize(base, CUSTOMIZATIONS["everything"], version)
    validate_documents(out)
    assert "network" not in _config(out)["machine"]
    assert "stableHostname" not in _config(out)["machine"]["features"]
    assert _of_kind(out, "HostnameConfig")[0]["hostname"] == "node-03"
    [resolver] = _of_kind(out, "ResolverConfig")
    assert resolver["nameservers"] == [{"address": "10.0.0.53"}]
    assert resolver["searchDomains"] == {"domains": ["lab.example"]}


def test_newer_base_keeps_its_meaning_on_talos_1_11() -> None:
    base = _base("worker")
    base[1] = {"apiVersion": "v1alpha1", "kind": "HostnameConfig", "hostname": "base-name", "auto": "off"}
    base.append(
        {
            "apiVersion": "v1alpha1",
            "kind": "ResolverConfig",
            "nameservers": [{"address": "10.0.0.53"}],
            "searchDomains": {"domains": ["lab.example"], "disableDefault": True},
        }
    )
    out = customize(base, Customization(), V1_11)
    validate_documents(out)
    assert len(out) == 1
    assert _network(out) == {
        "hostname": "base-name",
        "nameservers": ["10.0.0.53"],
        "searchDomains": ["lab.example"],
        "disableSearchDomain": True,
    }


def test_base_needs_one_v1alpha1_document() -> None:
    with pytest.raises(ValidationFailed, match="exactly one v1alpha1 document"):
        customize(_base("worker")[1:], Customization(hostname="a"), V1_13)
