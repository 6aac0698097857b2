"""Config patches: telling strategic from JSON6902 patches, Talos's merge rules, deletions, and what is refused."""

from __future__ import annotations

import copy
import datetime
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktizo.domain.errors import ValidationFailed
from ktizo.talos import patch as patch_module
from ktizo.talos.patch import (
    DEFAULT_MAX_PATCH_BYTES,
    JSON6902_MULTI_DOC,
    Patch,
    apply_patches,
    check_patch_result,
    load_patch,
)
from ktizo.talos.yamlio import load_documents

FIXTURES = Path(__file__).parent.parent / "fixtures" / "talos"

BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
"""


def _base(name: str = "worker") -> list[dict[str, Any]]:
    return load_documents((FIXTURES / f"{name}.yaml").read_bytes())


def _config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(doc for doc in docs if "kind" not in doc)


def _kinds(docs: list[dict[str, Any]]) -> list[str | None]:
    return [doc.get("kind") for doc in docs]


def _apply(docs: list[dict[str, Any]], *patches: str) -> list[dict[str, Any]]:
    return apply_patches(docs, [load_patch(text) for text in patches])


def _refusal(docs: list[dict[str, Any]], *patches: str) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as exc:
        _apply(docs, *patches)
    return exc.value


def _load_refusal(text: str | bytes, **kwargs: Any) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as exc:
        load_patch(text, **kwargs)
    assert exc.value.field == "patch"
    return exc.value


# --- telling the kinds apart ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "documents"),
    [
        ("machine:\n  install:\n    disk: /dev/sdb\n", 1),
        ('{"machine": {"install": {"disk": "/dev/sdb"}}}', 1),
        ("machine: {}\n---\napiVersion: v1alpha1\nkind: HostnameConfig\nhostname: a\n", 2),
        ("apiVersion: v1alpha1\nkind: HostnameConfig\n$patch: delete\n", 1),
        ("machine:\n  nodeLabels:\n    a:\n      $patch: delete\n", 1),
        ("{}", 1),
    ],
)
def test_mappings_make_a_strategic_patch(text: str, documents: int) -> None:
    patch = load_patch(text)
    assert patch.kind == "strategic"
    assert len(patch.documents) == documents
    assert patch.operations == ()
    assert patch.source == text


@pytest.mark.parametrize(
    "text",
    [
        "- op: add\n  path: /machine/install/disk\n  value: /dev/sdb\n",
        '[{"op": "add", "path": "/machine/install/disk", "value": "/dev/sdb"}]',
        '[{"op": "remove", "path": "/machine/certSANs"}, {"op": "test", "path": "/debug", "value": false}]',
        '[{"op": "move", "from": "/a", "path": "/b"}, {"op": "copy", "from": "/a", "path": "/c"}]',
        '[{"op": "replace", "path": "", "value": {}}]',
    ],
)
def test_a_list_of_operations_makes_a_json6902_patch(text: str) -> None:
    patch = load_patch(text.encode())
    assert patch.kind == "json6902"
    assert patch.documents == ()
    assert all("op" in operation for operation in patch.operations)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("- op: add\n  path: /a\n", "'value' is missing"),
        ("- op: replace\n  path: /a\n", "'value' is missing"),
        ("- op: test\n  path: /a\n", "'value' is missing"),
        ("- op: move\n  path: /a\n", "'from' must be a JSON pointer"),
        ("- op: copy\n  path: /a\n  from: a\n", "'from' must be a JSON pointer"),
        ("- op: add\n  path: a/b\n  value: 1\n", "'path' must be a JSON pointer"),
        ("- op: add\n  path: /a~2b\n  value: 1\n", "'path' must be a JSON pointer"),
        ("- op: add\n  value: 1\n", "'path' must be a JSON pointer"),
        ("- op: merge\n  path: /a\n", "op 'merge' is not one of"),
        ("- op: add\n  path: /a\n  value: 1\n- path: /b\n", "item 1 is not a JSON6902 operation"),
        ("- 1\n- 2\n", "item 0 is not a JSON6902 operation"),
        ("[]", "empty list"),
        ("machine: {}\n---\n- op: remove\n  path: /a\n", "a JSON6902 patch is a single list"),
    ],
)
def test_malformed_operations_are_refused(text: str, fragment: str) -> None:
    assert fragment in _load_refusal(text).message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("machine: [\n", "invalid YAML"),
        ("machine:\n\tinstall: {}\n", "invalid YAML"),
        ("a: 1\na: 2\n", "duplicate key"),
        (BILLION_LAUGHS, "anchor"),
        ("a: *b\n", "alias"),
        ("- &x {op: remove, path: /a}\n- *x\n", "anchor"),
        ("", "empty"),
        ("# nothing but a comment\n---\n", "empty"),
        ("just a string", "is a scalar"),
        ("42", "is a scalar"),
        ("machine: {}\n---\nhello\n", "document 2 is a scalar"),
        ("[" * 200 + "]" * 200, "nested"),
    ],
)
def test_bad_patch_text_is_refused(text: str, fragment: str) -> None:
    assert fragment in _load_refusal(text).message


def test_an_oversize_patch_is_refused_before_parsing() -> None:
    assert "larger than 10 bytes" in _load_refusal("machine: {type: worker}", max_bytes=10).message
    big = "machine:\n  certSANs:\n" + "    - host.example.com\n" * (DEFAULT_MAX_PATCH_BYTES // 20)
    assert "larger than" in _load_refusal(big).message
    assert "larger than" in _load_refusal(big.encode()).message


def test_a_patch_that_is_not_utf8_is_refused() -> None:
    assert "not UTF-8" in _load_refusal(b"machine: {type: \xff}").message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("$patch: delete\n", "v1alpha1 document cannot be deleted"),
        ("version: v1alpha1\n$patch: delete\n", "v1alpha1 document cannot be deleted"),
        ("kind: HostnameConfig\nauto: stable\n", "'apiVersion' is missing"),
        ("apiVersion: v1alpha1\nhostname: a\n", "'kind' is missing"),
        ("apiVersion: v1alpha1\nkind: HostnameConfig\nhostname: a\n$patch: delete\n", "'hostname' would be ignored"),
        ("machine:\n  network:\n    $patch: replace\n", "only directive is '$patch: delete'"),
        ("machine:\n  network:\n    $patch: delete\n    hostname: a\n", "'hostname' would be ignored"),
        ("machine:\n  network:\n    interfaces:\n      - $patch: delete\n", "needs a key that selects"),
        (
            "machine:\n  network:\n    interfaces:\n      - interface: eth0\n        vip:\n          $patch: delete\n",
            "cannot delete a key inside a list item",
        ),
        (
            "machine:\n  network:\n    interfaces:\n      - interface: eth0\n        vlans:\n"
            "          - vlanId: 5\n            $patch: delete\n",
            "nested in another list",
        ),
    ],
)
def test_misused_delete_directives_are_refused(text: str, fragment: str) -> None:
    assert fragment in _load_refusal(text).message


# --- merge rules ---------------------------------------------------------------------------------------

BASE_CONFIG: dict[str, Any] = {
    "version": "v1alpha1",
    "machine": {
        "type": "worker",
        "certSANs": ["a.example.com"],
        "install": {"disk": "/dev/sda", "wipe": True},
        "features": {"kubePrism": {"enabled": True, "port": 7445}},
        "nodeLabels": {"zone": "a", "rack": "1"},
        "kubelet": {"extraArgs": {"max-pods": "110", "v": "2", "feature-gates": ["A=true"]}},
        "network": {
            "interfaces": [
                {"interface": "eth0", "addresses": ["10.0.0.2/24"], "vlans": [{"vlanId": 5, "mtu": 1500}]},
                {"deviceSelector": {"hardwareAddr": "aa:bb:*"}, "dhcp": False},
            ]
        },
    },
    "cluster": {
        "network": {"podSubnets": ["10.244.0.0/16"], "serviceSubnets": ["10.96.0.0/12"]},
        "apiServer": {
            "admissionControl": [
                {"name": "PodSecurity", "configuration": {"defaults": {"enforce": "baseline"}, "exemptions": ["a"]}}
            ],
            "auditPolicy": {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "rules": [{"level": "Metadata"}]},
        },
    },
}

IFACE0 = {"interface": "eth0", "addresses": ["10.0.0.2/24"], "vlans": [{"vlanId": 5, "mtu": 1500}]}
IFACE1 = {"deviceSelector": {"hardwareAddr": "aa:bb:*"}, "dhcp": False}
POD_SECURITY = BASE_CONFIG["cluster"]["apiServer"]["admissionControl"][0]
INTERFACES = "machine.network.interfaces"
ADMISSION = "cluster.apiServer.admissionControl"

MERGE_CASES = [
    # (patch, dotted path, the value expected there)
    pytest.param("machine: {install: {disk: /dev/nvme0n1}}", "machine.install.disk", "/dev/nvme0n1", id="scalar"),
    pytest.param('machine: {install: {disk: ""}}', "machine.install.disk", "/dev/sda", id="empty-string-ignored"),
    pytest.param(
        "machine: {features: {kubePrism: {port: 0}}}", "machine.features.kubePrism.port", 7445, id="0-ignored"
    ),
    pytest.param("machine: {install: {disk: null}}", "machine.install.disk", "/dev/sda", id="null-ignored"),
    pytest.param("machine: {install: {wipe: false}}", "machine.install.wipe", False, id="false-applied"),
    pytest.param(
        "machine: {network: {interfaces: [{deviceSelector: {hardwareAddr: 'aa:bb:*'}, dhcp: true}]}}",
        f"{INTERFACES}.1.dhcp",
        True,
        id="true-applied",
    ),
    pytest.param("machine: {install: {image: 'ghcr.io/x:1'}}", "machine.install.image", "ghcr.io/x:1", id="new-key"),
    pytest.param(
        'machine: {nodeLabels: {edge: ""}}',
        "machine.nodeLabels",
        {"zone": "a", "rack": "1", "edge": ""},
        id="new-empty-label-set",
    ),
    pytest.param(
        "machine: {install: {image: null}}",
        "machine.install",
        {"disk": "/dev/sda", "wipe": True},
        id="null-key-not-created",
    ),
    pytest.param(
        "machine: {time: {disabled: true, servers: null}}",
        "machine.time",
        {"disabled": True},
        id="null-inside-new-section-dropped",
    ),
    pytest.param(
        "machine: {certSANs: [b.example.com]}",
        "machine.certSANs",
        ["a.example.com", "b.example.com"],
        id="list-appended",
    ),
    pytest.param("machine: {certSANs: []}", "machine.certSANs", ["a.example.com"], id="empty-list-keeps"),
    pytest.param(
        "cluster: {network: {podSubnets: [10.100.0.0/16]}}",
        "cluster.network.podSubnets",
        ["10.100.0.0/16"],
        id="podSubnets-replaced",
    ),
    pytest.param(
        "cluster: {network: {serviceSubnets: [10.200.0.0/16]}}",
        "cluster.network.serviceSubnets",
        ["10.200.0.0/16"],
        id="serviceSubnets-replaced",
    ),
    pytest.param(
        "cluster: {apiServer: {auditPolicy: {rules: [{level: None}]}}}",
        "cluster.apiServer.auditPolicy",
        {"rules": [{"level": "None"}]},
        id="auditPolicy-replaced-whole",
    ),
    pytest.param(
        'machine: {kubelet: {extraArgs: {max-pods: "250", v: "", feature-gates: ["B=true"]}}}',
        "machine.kubelet.extraArgs",
        {"max-pods": "250", "v": "", "feature-gates": ["B=true"]},
        id="extraArgs-copied-over-even-empty",
    ),
    pytest.param(
        "machine: {network: {interfaces: [{interface: eth0, mtu: 9000, addresses: [10.0.0.3/24]}]}}",
        f"{INTERFACES}.0",
        {**IFACE0, "addresses": ["10.0.0.2/24", "10.0.0.3/24"], "mtu": 9000},
        id="interface-by-name-merged",
    ),
    pytest.param(
        "machine: {network: {interfaces: [{deviceSelector: {hardwareAddr: 'aa:bb:*'}, mtu: 9000}]}}",
        f"{INTERFACES}.1",
        {**IFACE1, "mtu": 9000},
        id="interface-by-selector-merged",
    ),
    pytest.param(
        "machine: {network: {interfaces: [{interface: eth1, dhcp: true}]}}",
        INTERFACES,
        [IFACE0, IFACE1, {"interface": "eth1", "dhcp": True}],
        id="unmatched-interface-appended",
    ),
    pytest.param(
        "machine: {network: {interfaces: [{interface: eth1, deviceSelector: {hardwareAddr: 'aa:bb:*'}}]}}",
        f"{INTERFACES}.2",
        {"interface": "eth1", "deviceSelector": {"hardwareAddr": "aa:bb:*"}},
        id="interface-name-decides-over-selector",
    ),
    pytest.param(
        "machine: {network: {interfaces: [{interface: eth0, vlans: [{vlanId: 5, mtu: 1400}]}]}}",
        f"{INTERFACES}.0.vlans",
        [{"vlanId": 5, "mtu": 1400}],
        id="vlan-by-vlanId-merged",
    ),
    pytest.param(
        "machine: {network: {interfaces: [{interface: eth0, vlans: [{vlanId: 6, dhcp: true}]}]}}",
        f"{INTERFACES}.0.vlans",
        [{"vlanId": 5, "mtu": 1500}, {"vlanId": 6, "dhcp": True}],
        id="new-vlan-appended",
    ),
    pytest.param(
        "cluster: {apiServer: {admissionControl: [{name: PodSecurity, configuration: "
        "{defaults: {enforce: restricted}, exemptions: [b]}}]}}",
        ADMISSION,
        [{"name": "PodSecurity", "configuration": {"defaults": {"enforce": "restricted"}, "exemptions": ["a", "b"]}}],
        id="admission-plugin-by-name-merged",
    ),
    pytest.param(
        "cluster: {apiServer: {admissionControl: [{name: EventRateLimit}]}}",
        ADMISSION,
        [POD_SECURITY, {"name": "EventRateLimit"}],
        id="new-admission-plugin-appended",
    ),
    pytest.param(
        "machine: {nodeLabels: {zone: {$patch: delete}}}", "machine.nodeLabels", {"rack": "1"}, id="key-deleted"
    ),
    pytest.param(
        "machine: {nodeLabels: {other: {$patch: delete}}}",
        "machine.nodeLabels",
        {"zone": "a", "rack": "1"},
        id="absent-key-delete-is-a-no-op",
    ),
    pytest.param(
        "cluster: {apiServer: {auditPolicy: {$patch: delete}}}",
        "cluster.apiServer",
        {"admissionControl": [POD_SECURITY]},
        id="section-deleted",
    ),
    pytest.param(
        "machine: {network: {interfaces: [{interface: eth0, $patch: delete}]}}",
        INTERFACES,
        [IFACE1],
        id="interface-deleted-by-name",
    ),
    pytest.param(
        "cluster: {apiServer: {admissionControl: [{name: PodSecurity, $patch: delete}]}}",
        ADMISSION,
        [],
        id="admission-plugin-deleted-by-name",
    ),
    pytest.param(
        "machine: {network: {interfaces: [{interface: eth0, $patch: delete}, {interface: eth0, dummy: true}]}}",
        INTERFACES,
        [IFACE1, {"interface": "eth0", "dummy": True}],
        id="deleted-then-added-in-one-patch",
    ),
]


def _at(document: Any, dotted: str) -> Any:
    node = document
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


@pytest.mark.parametrize(("patch", "path", "expected"), MERGE_CASES)
def test_merge_rules(patch: str, path: str, expected: Any) -> None:
    result = _apply([copy.deepcopy(BASE_CONFIG)], patch)
    assert _at(result[0], path) == expected
    assert type(_at(result[0], path)) is type(expected)


def test_merge_keeps_everything_the_patch_does_not_mention() -> None:
    result = _apply([copy.deepcopy(BASE_CONFIG)], "machine: {install: {disk: /dev/sdb}}")[0]
    expected = copy.deepcopy(BASE_CONFIG)
    expected["machine"]["install"]["disk"] = "/dev/sdb"
    assert result == expected


def test_network_rule_fields_are_replaced_and_others_appended() -> None:
    rule = {
        "apiVersion": "v1alpha1",
        "kind": "NetworkRuleConfig",
        "name": "kubelet",
        "portSelector": {"ports": [10250], "protocol": "tcp"},
        "ingress": [{"subnet": "10.0.0.0/8"}],
    }
    patch = (
        "apiVersion: v1alpha1\nkind: NetworkRuleConfig\nname: kubelet\n"
        "portSelector: {ports: [10251, 10252]}\ningress: [{subnet: 192.168.0.0/16}]\n"
    )
    result = _apply([copy.deepcopy(BASE_CONFIG), rule], patch)[1]
    assert result["portSelector"] == {"ports": [10251, 10252], "protocol": "tcp"}
    assert result["ingress"] == [{"subnet": "192.168.0.0/16"}]


def test_replace_rules_belong_to_their_document_kind() -> None:
    # `ingress` is replaced in NetworkRuleConfig only; elsewhere a list at that path is appended.
    other = {"apiVersion": "v1alpha1", "kind": "Other", "ingress": ["a"]}
    patch = "apiVersion: v1alpha1\nkind: Other\ningress: [b]\n"
    assert _apply([copy.deepcopy(BASE_CONFIG), other], patch)[1]["ingress"] == ["a", "b"]


def test_extension_config_files_are_matched_by_mount_path() -> None:
    service = {
        "apiVersion": "v1alpha1",
        "kind": "ExtensionServiceConfig",
        "name": "foo",
        "configFiles": [{"content": "one", "mountPath": "/etc/a"}, {"content": "two", "mountPath": "/etc/b"}],
        "environment": ["A=1"],
    }
    patch = """\
apiVersion: v1alpha1
kind: ExtensionServiceConfig
name: foo
configFiles:
  - content: new
    mountPath: /etc/b
  - content: three
    mountPath: /etc/c
  - content: one
    $patch: delete
environment: [B=2]
"""
    result = _apply([copy.deepcopy(BASE_CONFIG), service], patch)[1]
    assert result["configFiles"] == [
        {"content": "new", "mountPath": "/etc/b"},
        {"content": "three", "mountPath": "/etc/c"},
    ]
    assert result["environment"] == ["A=1", "B=2"]


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ("machine: {certSANs: x.example.com}", "machine.certSANs: the patch has a scalar where the config has a list"),
        ("machine: {install: [a]}", "machine.install: the patch has a list where the config has a mapping"),
        ("machine: {type: {a: b}}", "machine.type: the patch has a mapping where the config has a scalar"),
        ("machine: {logging: {destinations: {$patch: delete}}}", "machine.logging is not in the config"),
        (
            "machine: {network: {interfaces: [{interface: eth9, $patch: delete}]}}",
            "no item of machine.network.interfaces",
        ),
        ("machine: {certSANs: {$patch: delete}, nodeLabels: [{zone: a, $patch: delete}]}", "is not a list"),
    ],
)
def test_patches_that_cannot_apply_are_refused(patch: str, fragment: str) -> None:
    refusal = _refusal([copy.deepcopy(BASE_CONFIG)], patch)
    assert refusal.field == "patch"
    assert fragment in refusal.message
    assert refusal.message.startswith("patch 1, document 1 (v1alpha1): ")


def test_patches_apply_in_order() -> None:
    result = _apply(
        [copy.deepcopy(BASE_CONFIG)],
        "machine: {install: {disk: /dev/sdb}}",
        "machine: {install: {disk: /dev/sdc}}",
        '[{"op": "test", "path": "/machine/install/disk", "value": "/dev/sdc"}]',
    )
    assert result[0]["machine"]["install"]["disk"] == "/dev/sdc"


# --- multi-document configs ---------------------------------------------------------------------------


def test_a_new_document_is_appended() -> None:
    patch = "apiVersion: v1alpha1\nkind: LinkConfig\nname: eth0\nup: true\naddresses: [{address: 10.0.0.5/24}]\n"
    result = _apply(_base(), patch)
    assert _kinds(result) == [None, "HostnameConfig", "LinkConfig"]
    assert result[2] == {
        "apiVersion": "v1alpha1",
        "kind": "LinkConfig",
        "name": "eth0",
        "up": True,
        "addresses": [{"address": "10.0.0.5/24"}],
    }
    check_patch_result(result)


def test_a_matching_document_is_merged() -> None:
    result = _apply(_base(), 'apiVersion: v1alpha1\nkind: HostnameConfig\nhostname: node-01\nauto: "off"\n')
    assert _kinds(result) == [None, "HostnameConfig"]
    assert result[1] == {"apiVersion": "v1alpha1", "kind": "HostnameConfig", "auto": "off", "hostname": "node-01"}
    check_patch_result(result)


def test_documents_are_matched_by_name_too() -> None:
    links = "apiVersion: v1alpha1\nkind: LinkConfig\nname: {}\nmtu: {}\n"
    result = _apply(_base(), links.format("eth0", 1500) + "---\n" + links.format("eth1", 9000))
    result = _apply(result, links.format("eth1", 1400))
    assert [(doc.get("name"), doc.get("mtu")) for doc in result[2:]] == [("eth0", 1500), ("eth1", 1400)]


def test_a_document_appended_by_a_patch_takes_later_documents_of_the_same_patch() -> None:
    link = "apiVersion: v1alpha1\nkind: LinkConfig\nname: eth0\n"
    result = _apply(_base(), link + "mtu: 1500\n---\n" + link + "up: true\n")
    assert _kinds(result) == [None, "HostnameConfig", "LinkConfig"]
    assert result[2]["mtu"] == 1500
    assert result[2]["up"] is True


def test_a_whole_document_is_deleted() -> None:
    result = _apply(_base(), "apiVersion: v1alpha1\nkind: HostnameConfig\n$patch: delete\n")
    assert _kinds(result) == [None]
    check_patch_result(result)


def test_deleting_an_absent_document_is_skipped() -> None:
    base = _base()
    assert _apply(base, "apiVersion: v1alpha1\nkind: LinkConfig\nname: eth0\n$patch: delete\n") == base
    assert _apply(base, "apiVersion: v1alpha1\nkind: LinkConfig\nname: eth0\nmtu: {$patch: delete}\n") == base


def test_deleting_the_v1alpha1_document_is_refused_even_when_built_directly() -> None:
    patch = Patch(kind="strategic", documents=({"$patch": "delete"},))
    with pytest.raises(ValidationFailed) as exc:
        apply_patches(_base(), [patch])
    assert exc.value.field == "patch"
    assert "v1alpha1 document cannot be deleted" in exc.value.message


def test_a_field_of_another_document_is_deleted() -> None:
    result = _apply(_base(), "apiVersion: v1alpha1\nkind: HostnameConfig\nauto: {$patch: delete}\nhostname: a\n")
    assert result[1] == {"apiVersion": "v1alpha1", "kind": "HostnameConfig", "hostname": "a"}


# --- JSON6902 ------------------------------------------------------------------------------------------


def test_json6902_is_refused_on_a_multi_document_config() -> None:
    refusal = _refusal(_base(), '[{"op": "add", "path": "/machine/install/disk", "value": "/dev/sdb"}]')
    assert refusal.field == "patch"
    assert refusal.message == JSON6902_MULTI_DOC
    assert refusal.message == (
        "JSON6902 patches are not supported for multi-document machine configuration: Talos refuses them too; "
        "write a strategic merge patch (a partial config) instead"
    )


def test_json6902_applies_to_a_single_document_config() -> None:
    base = _base()[:1]
    patch = """\
- op: add
  path: /machine/install/disk
  value: /dev/nvme0n1
- op: replace
  path: /cluster/network/podSubnets/0
  value: 10.100.0.0/16
- op: remove
  path: /machine/features/hostDNS
- op: add
  path: /machine/certSANs/-
  value: a.example.com
- op: add
  path: /machine/certSANs/0
  value: b.example.com
- op: add
  path: /machine/nodeLabels
  value: {}
- op: add
  path: /machine/nodeLabels/example.com~1role
  value: edge
- op: copy
  from: /cluster/clusterName
  path: /machine/nodeLabels/cluster
- op: move
  from: /machine/nodeLabels/cluster
  path: /machine/nodeLabels/name
- op: test
  path: /machine/type
  value: worker
- op: replace
  path: /machine/install/wipe
  value: true
"""
    result = _apply(base, patch)
    machine = result[0]["machine"]
    assert machine["install"] == {"wipe": True, "grubUseUKICmdline": True, "disk": "/dev/nvme0n1"}
    assert list(machine["install"]) == ["wipe", "grubUseUKICmdline", "disk"]
    assert result[0]["cluster"]["network"]["podSubnets"] == ["10.100.0.0/16"]
    assert "hostDNS" not in machine["features"]
    assert machine["certSANs"] == ["b.example.com", "a.example.com"]
    assert machine["nodeLabels"] == {"example.com/role": "edge", "name": "base"}
    check_patch_result(result)


@pytest.mark.parametrize(
    ("operation", "fragment"),
    [
        ('{"op": "test", "path": "/machine/type", "value": "controlplane"}', "operation 1 (test /machine/type): test"),
        ('{"op": "test", "path": "/debug", "value": 0}', "operation 1 (test /debug): test failed"),
        ('{"op": "remove", "path": "/machine/nope"}', "operation 1 (remove /machine/nope): it does not exist"),
        ('{"op": "replace", "path": "/machine/nope", "value": 1}', "operation 1 (replace /machine/nope)"),
        ('{"op": "add", "path": "/machine/nope/disk", "value": 1}', "/machine/nope does not exist"),
        ('{"op": "add", "path": "/cluster/network/podSubnets/5", "value": "x"}', "out of range"),
        ('{"op": "add", "path": "/cluster/network/podSubnets/01", "value": "x"}', "is not a list index"),
        ('{"op": "add", "path": "/machine/type/x", "value": 1}', "the parent is a scalar"),
        ('{"op": "move", "from": "/machine", "path": "/machine/install/m"}', "cannot be moved into itself"),
        ('{"op": "copy", "from": "/nope", "path": "/x"}', "/nope does not exist"),
        ('{"op": "remove", "path": ""}', "whole document cannot be removed"),
        ('{"op": "replace", "path": "", "value": [1]}', "must be a mapping"),
    ],
)
def test_json6902_failures_name_the_operation_and_path(operation: str, fragment: str) -> None:
    refusal = _refusal(_base()[:1], f'[{{"op": "test", "path": "/version", "value": "v1alpha1"}}, {operation}]')
    assert refusal.field == "patch"
    assert fragment in refusal.message


def test_json6902_test_failure_does_not_echo_values() -> None:
    base = _base("controlplane")[:1]
    key = base[0]["machine"]["ca"]["key"]
    refusal = _refusal(base, '[{"op": "test", "path": "/machine/ca/key", "value": "guess"}]')
    assert key not in refusal.message
    assert "guess" not in refusal.message


# --- the result must still be a working config ---------------------------------------------------------


@pytest.mark.parametrize("name", ["worker", "controlplane"])
@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ("machine: {type: {$patch: delete}}", "machine.type"),
        ("cluster: {controlPlane: {$patch: delete}}", "cluster.controlPlane.endpoint"),
        ("cluster: {controlPlane: {endpoint: {$patch: delete}}}", "cluster.controlPlane.endpoint"),
        ("machine: {ca: {crt: {$patch: delete}}}", "machine.ca.crt"),
        ("machine: {ca: {$patch: delete}}", "machine.ca.crt"),
        ("machine: {$patch: delete}", "machine.type"),
    ],
)
def test_patches_that_delete_required_fields_are_refused(name: str, patch: str, field: str) -> None:
    result = _apply(_base(name), patch)
    with pytest.raises(ValidationFailed) as exc:
        check_patch_result(result)
    assert exc.value.field == field
    assert field in exc.value.message


def test_check_patch_result_also_validates_against_the_schema() -> None:
    result = _apply(_base(), "machine: {instal: {disk: /dev/sdb}}")
    with pytest.raises(ValidationFailed) as exc:
        check_patch_result(result)
    assert exc.value.field == "machine.instal"


@pytest.mark.parametrize("name", ["worker", "controlplane"])
def test_a_realistic_patch_gives_the_expected_config(name: str) -> None:
    base = _base(name)
    patch = """\
machine:
  install:
    disk: /dev/nvme0n1
  kubelet:
    extraArgs:
      max-pods: "250"
---
cluster:
  network:
    podSubnets:
      - 10.100.0.0/16
"""
    result = _apply(base, patch)
    check_patch_result(result)
    expected = copy.deepcopy(base)
    config = _config(expected)
    config["machine"]["install"]["disk"] = "/dev/nvme0n1"
    config["machine"]["kubelet"]["extraArgs"] = {"max-pods": "250"}
    config["cluster"]["network"]["podSubnets"] = ["10.100.0.0/16"]
    assert result == expected


# --- inputs stay untouched -----------------------------------------------------------------------------


def test_inputs_are_never_mutated() -> None:
    base = _base("controlplane")
    patches = [
        load_patch(
            "machine:\n  certSANs: [a.example.com]\n  network:\n    interfaces:\n      - interface: eth0\n"
            "        addresses: [10.0.0.2/24]\n        vlans: [{vlanId: 5}]\n"
            "cluster:\n  apiServer:\n    admissionControl:\n      - name: PodSecurity\n        $patch: delete\n"
            "---\napiVersion: v1alpha1\nkind: HostnameConfig\nhostname: n1\nauto: 'off'\n"
            "---\napiVersion: v1alpha1\nkind: LinkConfig\nname: eth0\nup: true\n"
        ),
        load_patch("machine: {network: {interfaces: [{interface: eth0, addresses: [10.0.0.3/24]}]}}"),
    ]
    base_before, patches_before = copy.deepcopy(base), copy.deepcopy(patches)
    result = apply_patches(base, patches)
    assert base == base_before
    assert patches == patches_before
    # The result shares nothing with the patches: changing it leaves them as they were.
    _config(result)["machine"]["network"]["interfaces"][0]["addresses"].append("x")
    result[-1]["mtu"] = 1
    assert patches == patches_before
    single = base[:1]
    json_patch = load_patch('[{"op": "add", "path": "/machine/nodeLabels/a", "value": {"b": [1]}}]')
    json_before = copy.deepcopy(json_patch)
    patched = apply_patches(single, [json_patch])
    patched[0]["machine"]["nodeLabels"]["a"]["b"].append(2)
    assert json_patch == json_before
    assert single == base_before[:1]


# --- properties ----------------------------------------------------------------------------------------

SCALARS = st.none() | st.booleans() | st.integers(-3, 3) | st.text(alphabet="ab0 ", max_size=3)
KEYS = st.text(alphabet="abcde", min_size=1, max_size=2)
TREES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=3),
    max_leaves=15,
)
CONFIGS = st.dictionaries(KEYS, TREES, max_size=5)
SCALAR_TREES = st.recursive(SCALARS, lambda children: st.dictionaries(KEYS, children, max_size=3), max_leaves=6)


def _scalar_patch(data: st.DataObject, base: dict[str, Any]) -> dict[str, Any]:
    """A patch that only sets scalars, following ``base``'s mappings so that it overlaps with it."""
    patch: dict[str, Any] = {}
    for key in data.draw(st.lists(st.sampled_from(sorted(base)), unique=True)) if base else []:
        value = base[key]
        if isinstance(value, dict):
            patch[key] = _scalar_patch(data, value)
        elif not isinstance(value, list):
            patch[key] = data.draw(SCALARS)
    for key in data.draw(st.lists(KEYS, max_size=2)):
        if key not in base:
            patch[key] = data.draw(SCALAR_TREES)
    return patch


@settings(deadline=None)
@given(config=CONFIGS, others=st.lists(st.dictionaries(KEYS, TREES, max_size=3), max_size=2))
def test_an_empty_patch_is_identity(config: dict[str, Any], others: list[dict[str, Any]]) -> None:
    docs = [config] + [
        {"apiVersion": "v1alpha1", "kind": "Test", "name": f"n{index}", **other} for index, other in enumerate(others)
    ]
    assert apply_patches(docs, [load_patch("{}")]) == docs
    assert apply_patches(docs, [Patch(kind="strategic", documents=({},))]) == docs


@pytest.mark.parametrize("name", ["worker", "controlplane"])
def test_an_empty_patch_is_identity_on_the_examples(name: str) -> None:
    base = _base(name)
    assert _apply(base, "{}") == base


@settings(deadline=None)
@given(config=CONFIGS, data=st.data())
def test_a_scalar_patch_is_idempotent(config: dict[str, Any], data: st.DataObject) -> None:
    patch = Patch(kind="strategic", documents=(_scalar_patch(data, config),))
    once = apply_patches([config], [patch])
    assert apply_patches(once, [patch]) == once


# --- large patches -------------------------------------------------------------------------------------
#
# Keyed merges, `$patch: delete` selectors and document matching take the *first* match. They find it through
# indexes rather than by rescanning, so that a 256 KiB patch stays fast; these tests pin that the answers are
# the ones a scan gives, on large inputs, and that the work grows linearly (counted, never timed).


def _interfaces(docs: list[dict[str, Any]]) -> list[Any]:
    interfaces: list[Any] = _config(docs)["machine"]["network"]["interfaces"]
    return interfaces


def _config_with(interfaces: list[Any]) -> dict[str, Any]:
    config = copy.deepcopy(BASE_CONFIG)
    config["machine"]["network"]["interfaces"] = interfaces
    return config


def _strategic(*documents: dict[str, Any]) -> Patch:
    return Patch(kind="strategic", documents=documents)


def _interfaces_patch(items: list[dict[str, Any]]) -> Patch:
    return _strategic({"machine": {"network": {"interfaces": items}}})


def test_thousands_of_interfaces_merge_as_one_at_a_time() -> None:
    new = [{"interface": f"eth{i}", "mtu": 1000 + i} for i in range(1, 3001)]
    # A name already in the patch merges into the item that patch appended, and brings a selector...
    named = [
        {"interface": f"eth{i}", "deviceSelector": {"hardwareAddr": f"sel{i}"}, "addresses": ["x"]}
        for i in range(1, 1001)
    ]
    # ...which the next items then find the item by: the index follows what each merge changed.
    by_selector = [{"deviceSelector": {"hardwareAddr": f"sel{i}"}, "mtu": 9000} for i in range(1, 1001)]
    base_selector = [{"deviceSelector": {"hardwareAddr": "aa:bb:*"}, "dhcp": True}]
    # The same new name over and over: the first appends, the rest merge into it, the last mtu wins.
    repeated = [{"interface": f"new{i % 50}", "mtu": i + 1} for i in range(500)]
    vlans = [{"interface": "eth0", "vlans": [{"vlanId": v % 700, "mtu": v + 1}]} for v in range(1000)]
    # A selector nothing has yet: looking for it goes through the whole list, before the names bring selectors.
    absent = [{"deviceSelector": {"hardwareAddr": "none"}, "mtu": 1}]
    interleaved = [item for pair in zip(named, by_selector, strict=True) for item in pair]
    patch = _interfaces_patch(new + absent + interleaved + base_selector + repeated + vlans)

    result = _interfaces(apply_patches([copy.deepcopy(BASE_CONFIG)], [patch]))

    expected_eth0 = copy.deepcopy(IFACE0)
    # vlanId 5 was there already; ids below 300 come twice, and the second mtu wins.
    expected_eth0["vlans"] = [{"vlanId": 5, "mtu": 706}] + [
        {"vlanId": v, "mtu": v + 701 if v < 300 else v + 1} for v in range(700) if v != 5
    ]
    expected = [expected_eth0, {**IFACE1, "dhcp": True}]
    for i in range(1, 3001):
        item: dict[str, Any] = {"interface": f"eth{i}", "mtu": 1000 + i}
        if i <= 1000:
            item.update(mtu=9000, deviceSelector={"hardwareAddr": f"sel{i}"}, addresses=["x"])
        expected.append(item)
    expected += absent
    expected += [{"interface": f"new{k}", "mtu": 451 + k} for k in range(50)]
    assert len(result) == len(expected)
    assert result == expected


def test_many_deletions_delete_the_first_match_each() -> None:
    base = [{"interface": f"eth{i}", "mtu": i % 7 + 1} for i in range(4000)]
    base.insert(10, {"interface": "eth20", "mtu": 99})  # a duplicate name: a deletion takes the first only
    deletions: list[dict[str, Any]] = [{"interface": f"eth{i}", "$patch": "delete"} for i in range(3998, -1, -2)]
    deletions += [{"mtu": 2, "$patch": "delete"}, {"mtu": 2, "$patch": "delete"}]  # by another key: eth1, eth15
    deletions += [{"interface": "eth20", "$patch": "delete"}]  # the second eth20, the first one is gone
    patch = _interfaces_patch([*deletions, {"interface": "eth0", "mtu": 1}, {"interface": "eth3", "mtu": 5}])

    result = _interfaces(apply_patches([_config_with(base)], [patch]))

    odd = [{"interface": f"eth{i}", "mtu": i % 7 + 1} for i in range(1, 4000, 2) if i not in (1, 15)]
    odd[odd.index({"interface": "eth3", "mtu": 4})]["mtu"] = 5
    assert result == [*odd, {"interface": "eth0", "mtu": 1}]

    # Deletions find items by what earlier documents of the patch merged into them.
    later = _strategic(
        {
            "machine": {
                "network": {
                    "interfaces": [{"interface": "eth3999", "$patch": "delete"}, {"interface": "eth7", "mtu": 77}]
                }
            }
        },
        {"machine": {"network": {"interfaces": [{"mtu": 77, "$patch": "delete"}, {"interface": "eth9", "x": 1}]}}},
        {"machine": {"network": {"interfaces": [{"x": 1, "$patch": "delete"}]}}},
    )
    result = _interfaces(apply_patches([_config_with(base)], [patch, later]))
    gone = ("eth3999", "eth7", "eth9")
    assert result == [item for item in [*odd, {"interface": "eth0", "mtu": 1}] if item["interface"] not in gone]


def test_errors_name_the_position_after_deletions() -> None:
    base = [{"interface": f"eth{i}", "mtu": 1500} for i in range(3000)]
    deletions = [{"interface": f"eth{i}", "$patch": "delete"} for i in range(1000)]
    bad = _interfaces_patch([*deletions, {"interface": "eth2500", "mtu": {"a": 1}}])
    with pytest.raises(ValidationFailed) as exc:
        apply_patches([_config_with(base)], [bad])
    assert exc.value.message == (
        "patch 1, document 1 (v1alpha1): machine.network.interfaces[1500].mtu: "
        "the patch has a mapping where the config has a scalar"
    )
    missing = _interfaces_patch([*deletions, {"interface": "eth5", "$patch": "delete"}])
    with pytest.raises(ValidationFailed) as exc:
        apply_patches([_config_with(base)], [missing])
    assert exc.value.message == (
        "patch 1, document 1 (v1alpha1): no item of machine.network.interfaces has interface = 'eth5', "
        "so none can be deleted"
    )


def test_a_document_is_found_by_the_identity_a_patch_left_it() -> None:
    # Deleting `name` changes which document a later patch document selects (absurd, but Talos-compatible).
    odd = {"apiVersion": "v1alpha1", "kind": "Test", "name": "{'$patch': 'delete'}", "a": 1}
    patch = _strategic(
        {"apiVersion": "v1alpha1", "kind": "Test", "name": {"$patch": "delete"}},
        {"apiVersion": "v1alpha1", "kind": "Test", "b": 2},
    )
    result = apply_patches([copy.deepcopy(BASE_CONFIG), odd], [patch])
    assert result[1:] == [{"apiVersion": "v1alpha1", "kind": "Test", "a": 1, "b": 2}]


def test_thousands_of_documents_are_matched_by_identity() -> None:
    def link(name: str, **fields: Any) -> dict[str, Any]:
        return {"apiVersion": "v1alpha1", "kind": "LinkConfig", "name": name, **fields}

    first = _strategic(*[link(f"l{i}", mtu=1000 + i) for i in range(3000)])
    second = _strategic(
        *[link(f"l{i}", up=True) for i in range(0, 3000, 3)],
        *[{**link(f"l{i}"), "$patch": "delete"} for i in range(1, 3000, 3)],
        link("l1", mtu=1),  # deleted just before: appended anew, at the end
        {**link("absent"), "$patch": "delete"},
    )
    result = apply_patches(_base(), [first, second])
    expected = [link(f"l{i}", mtu=1000 + i, **({"up": True} if i % 3 == 0 else {})) for i in range(3000) if i % 3 != 1]
    assert result[2:] == [*expected, link("l1", mtu=1)]


class _Counter:
    """Wraps functions and counts their calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, function: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return function(*args, **kwargs)

        return counted


def _counting_rule(rule: Any, counter: _Counter) -> Any:
    fields = tuple(
        patch_module._Field(field.source, counter(field.value), counter(field.equal), counter(field.key))
        for field in rule.fields
    )
    return patch_module._KeyedList(fields, counter(rule.probe))


def _keyed_merge_calls(monkeypatch: pytest.MonkeyPatch, n: int) -> int:
    counter = _Counter()
    rules = dict(patch_module._KEYED[None])
    path = ("machine", "network", "interfaces")
    rules[path] = _counting_rule(rules[path], counter)
    monkeypatch.setitem(patch_module._KEYED, None, rules)
    items: list[dict[str, Any]] = [{"interface": f"eth{i}"} for i in range(1, n + 1)]
    items += [{"deviceSelector": {"hardwareAddr": f"s{i}"}} for i in range(n)]
    items += [{"interface": f"eth{i}", "mtu": 9000} for i in range(1, n + 1, 4)]  # merge into appended items
    items += [{"deviceSelector": {"hardwareAddr": f"s{i}"}, "dhcp": True} for i in range(0, n, 4)]
    result = apply_patches([copy.deepcopy(BASE_CONFIG)], [_interfaces_patch(items)])
    assert len(_interfaces(result)) == 2 + 2 * n
    monkeypatch.undo()
    return counter.calls


def test_keyed_merges_do_linear_work(monkeypatch: pytest.MonkeyPatch) -> None:
    # Scanning for the first match would compare each patch item with every item before it: 16x the work for
    # 4x the items. The index reads and keys each item a bounded number of times.
    small, large = _keyed_merge_calls(monkeypatch, 500), _keyed_merge_calls(monkeypatch, 2000)
    assert large <= 5 * small


def _deletion_calls(monkeypatch: pytest.MonkeyPatch, n: int) -> int:
    counter = _Counter()
    monkeypatch.setattr(patch_module, "_json_equal", counter(patch_module._json_equal))
    monkeypatch.setattr(patch_module, "_json_key", counter(patch_module._json_key))
    base = [{"interface": f"eth{i}", "mtu": 1500} for i in range(2 * n)]
    deletions = [{"interface": f"eth{i}", "$patch": "delete"} for i in range(2 * n - 1, 0, -2)]
    result = apply_patches([_config_with(base)], [_interfaces_patch(deletions)])
    assert len(_interfaces(result)) == n
    monkeypatch.undo()
    return counter.calls


def test_deletions_do_linear_work(monkeypatch: pytest.MonkeyPatch) -> None:
    small, large = _deletion_calls(monkeypatch, 500), _deletion_calls(monkeypatch, 2000)
    assert large <= 5 * small


def _document_calls(monkeypatch: pytest.MonkeyPatch, n: int) -> int:
    counter = _Counter()
    monkeypatch.setattr(patch_module, "document_key", counter(patch_module.document_key))
    documents = [
        {"apiVersion": "v1alpha1", "kind": "LinkConfig", "name": f"l{i % n}", "mtu": i + 1} for i in range(2 * n)
    ]
    assert len(apply_patches(_base(), [_strategic(*documents)])) == 2 + n
    monkeypatch.undo()
    return counter.calls


def test_document_matching_does_linear_work(monkeypatch: pytest.MonkeyPatch) -> None:
    small, large = _document_calls(monkeypatch, 500), _document_calls(monkeypatch, 2000)
    assert large <= 5 * small


def test_shared_structures_are_merged_as_before() -> None:
    # Loaded YAML never shares a mapping between two places, but documents built in code may; the indexes
    # then stand aside and the lists are scanned, so a merge into one place shows in the other, as it did.
    shared = {"interface": "eth0", "mtu": 1500}
    result = apply_patches(
        [_config_with([shared, shared])],
        [_interfaces_patch([{"interface": "eth0", "mtu": 9000, "dummy": True}, {"interface": "eth0", "mtu": 1400}])],
    )
    interfaces = _interfaces(result)
    assert interfaces == [{"interface": "eth0", "mtu": 1400, "dummy": True}] * 2
    assert interfaces[0] is interfaces[1]


# Values of every type YAML gives, with the pairs that compare differently in JSON and Python: 1, 1.0 and True,
# NaN (equal to nothing, but a container holding the same NaN object equals itself under ==), sets and tuples.
NAN = float("nan")
KEY_ATOMS = st.sampled_from(
    [
        None,
        "",
        "a",
        "1",
        0,
        1,
        1.0,
        -0.0,
        2.5,
        True,
        False,
        b"a",
        NAN,
        datetime.date(2020, 1, 1),
        datetime.datetime(2020, 1, 1),
    ]
)
KEY_VALUES = st.recursive(
    KEY_ATOMS,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from("ab"), children, max_size=2)
        | st.tuples(children, children)
        | st.frozensets(st.sampled_from([1, 1.0, True, "a", NAN]), max_size=2).map(set)
    ),
    max_leaves=6,
)


def test_index_keys_of_scalars_are_equal_exactly_when_the_scalars_compare_equal() -> None:
    atoms = [None, "", "a", "1", 0, 1, 1.0, -0.0, 0.0, 2.5, True, False, b"a", NAN, float("nan")]
    atoms += [datetime.date(2020, 1, 1), datetime.datetime(2020, 1, 1), (1,), (1.0,), (True,), {1}, frozenset({1})]
    for left in atoms:
        for right in atoms:
            json_same = patch_module._json_key(left) == patch_module._json_key(right)
            assert json_same == patch_module._json_equal(left, right), (left, right)
            python_same = patch_module._python_key(left) == patch_module._python_key(right)
            assert python_same == bool(left == right), (left, right)


@given(left=KEY_VALUES, data=st.data())
def test_index_keys_are_equal_exactly_when_the_values_compare_equal(left: Any, data: st.DataObject) -> None:
    right = data.draw(st.sampled_from([left, copy.deepcopy(left)]) | KEY_VALUES)
    assert (patch_module._json_key(left) == patch_module._json_key(right)) == patch_module._json_equal(left, right)
    assert (patch_module._python_key(left) == patch_module._python_key(right)) == bool(left == right)


# Small pools, so that items often match, and merges often change what later items are matched on.
NAMES = st.sampled_from(["eth0", "eth1", "", 0, 1, 1.0, True, NAN]) | st.sampled_from(["eth0", "eth1"]) | KEY_VALUES
SELECTORS = st.sampled_from(
    [None, {"driver": "a"}, {"driver": "b"}, {"driver": 1}, {"driver": 1.0}, {"driver": True}]
) | st.dictionaries(st.sampled_from(["hardwareAddr", "driver"]), KEY_VALUES, max_size=2)
VLANS = st.lists(
    st.fixed_dictionaries({}, optional={"vlanId": st.sampled_from([None, 0, 1, 1.0, True, NAN]), "mtu": KEY_ATOMS}),
    max_size=3,
)
INTERFACE_ITEMS = st.fixed_dictionaries(
    {},
    optional={
        "interface": NAMES,
        "deviceSelector": SELECTORS,
        "mtu": st.sampled_from([0, 1500, None, "x", [1], {"a": 1}]),
        "vlans": VLANS | KEY_VALUES,
    },
)
LIST_ITEMS = INTERFACE_ITEMS | INTERFACE_ITEMS | KEY_VALUES
DELETE_ITEMS = st.builds(
    lambda key, value: {key: value, "$patch": "delete"}, st.sampled_from(["interface", "mtu", "name"]), NAMES
)
ADMISSION_ITEMS = st.fixed_dictionaries({}, optional={"name": NAMES, "configuration": KEY_VALUES}) | KEY_VALUES


@st.composite
def _patch_documents(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.integers(0, 3)) == 0:
        document: dict[str, Any] = {"apiVersion": "v1alpha1", "kind": "Test", "name": draw(st.sampled_from("ab"))}
        if draw(st.booleans()):
            document["$patch"] = "delete"
        else:
            document["value"] = draw(KEY_VALUES)
        return document
    document = {}
    if draw(st.booleans()):
        document["machine"] = {"network": {"interfaces": draw(st.lists(LIST_ITEMS | DELETE_ITEMS, max_size=6))}}
    if draw(st.booleans()):
        items = draw(st.lists(ADMISSION_ITEMS | DELETE_ITEMS, max_size=4))
        document["cluster"] = {"apiServer": {"admissionControl": items}}
    return document


def _outcome(docs: list[dict[str, Any]], patches: list[Patch]) -> Any:
    try:
        return apply_patches(docs, patches)
    except ValidationFailed as exc:
        return exc.message, exc.field


@settings(deadline=None, max_examples=300)
@given(
    interfaces=st.lists(LIST_ITEMS, max_size=6),
    admission=st.lists(ADMISSION_ITEMS, max_size=4),
    tests=st.lists(st.fixed_dictionaries({"name": st.sampled_from("ab"), "value": KEY_VALUES}), max_size=3),
    patches=st.lists(st.lists(_patch_documents(), min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_the_indexes_find_what_a_scan_finds(
    interfaces: list[Any], admission: list[Any], tests: list[dict[str, Any]], patches: list[list[dict[str, Any]]]
) -> None:
    # A scan of each list, in order, for the first match is how Talos merges; documents that share a mapping
    # (see test_shared_structures_are_merged_as_before) are still patched that way, which is the reference here.
    config = {
        "machine": {"type": "worker", "network": {"interfaces": interfaces}},
        "cluster": {"apiServer": {"admissionControl": admission}},
    }
    docs = [config, *({"apiVersion": "v1alpha1", "kind": "Test", **test} for test in tests)]
    strategic = [_strategic(*documents) for documents in patches]
    indexed = _outcome(docs, strategic)
    with mock.patch.object(patch_module, "_REKEY_BUDGET", 1):  # values a merge changed are compared, not keyed
        compared = _outcome(docs, strategic)
    with mock.patch.object(patch_module, "_is_tree", return_value=False):
        scanned = _outcome(docs, strategic)
    assert indexed == scanned
    assert compared == scanned
