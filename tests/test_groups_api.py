"""Config templates per device group, device patches and per-device network, as a machine receives them
through the real Talos download; refused patches; exact render-cache invalidation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ktizo.services.registry import Services
from ktizo.talos import load_documents, validate_documents
from tests.support import TALOS_FIXTURES, TALOS_HEADERS, talos_url

MACS = [f"52:54:00:00:30:{n:02x}" for n in range(1, 8)]
NVME_PATCH = """\
machine:
  install:
    disk: /dev/nvme0n1
  kubelet:
    extraArgs:
      max-pods: "250"
"""


def _download(client: TestClient, mac: str) -> list[dict[str, Any]]:
    r = client.get(talos_url(mac=mac), headers=TALOS_HEADERS)
    assert r.status_code == 200, r.text
    docs = load_documents(r.content)
    validate_documents(docs)
    return docs


def _v1(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if "kind" not in d)


def _kinds(docs: list[dict[str, Any]]) -> dict[tuple[str | None, str | None], dict[str, Any]]:
    return {(d.get("kind"), d.get("name")): d for d in docs}


def _approved(client: TestClient, ops: dict[str, str], mac: str, **fields: Any) -> int:
    """A pre-registered device with ``fields`` (labels, patch, role, ip…), then approved."""
    r = client.post("/api/v1/devices", json={"mac_address": mac, **fields}, headers=ops)
    assert r.status_code == 201, r.text
    device_id: int = r.json()["id"]
    assert client.post(f"/api/v1/devices/{device_id}/approve", headers=ops).status_code == 200
    return device_id


def _group(client: TestClient, admin: dict[str, str], **body: Any) -> dict[str, Any]:
    r = client.post("/api/v1/groups", json=body, headers=admin)
    assert r.status_code == 201, r.text
    group: dict[str, Any] = r.json()
    return group


# -- groups and patches ---------------------------------------------------------------------------------


def test_a_group_patch_reaches_its_labelled_devices_only(
    client: TestClient, admin: dict[str, str], ops: dict[str, str], bases: Path
) -> None:
    group = _group(client, admin, name="Rack-A", selector={"rack": "a"}, patch=NVME_PATCH, description="rack a")
    assert (group["name"], group["priority"], group["selector"], group["patch"]) == (
        "rack-a",
        100,
        {"rack": "a"},
        NVME_PATCH,
    )
    _approved(client, ops, MACS[0], labels={"rack": "a", "zone": "1"})
    _approved(client, ops, MACS[1], labels={"rack": "b"})
    _approved(client, ops, MACS[2])

    inside = _v1(_download(client, MACS[0]))
    assert inside["machine"]["install"]["disk"] == "/dev/nvme0n1"
    assert inside["machine"]["kubelet"]["extraArgs"] == {"max-pods": "250"}
    # The rest of the base is untouched by the patch.
    base = _v1(load_documents((TALOS_FIXTURES / "worker.yaml").read_bytes()))
    assert inside["machine"]["kubelet"]["image"] == base["machine"]["kubelet"]["image"]
    assert inside["cluster"] == base["cluster"]
    for mac in MACS[1:3]:
        outside = _v1(_download(client, mac))
        assert "disk" not in outside["machine"]["install"]
        assert "extraArgs" not in outside["machine"]["kubelet"]

    assert client.get("/api/v1/groups/rack-a", headers=ops).json()["id"] == group["id"]
    assert client.get(f"/api/v1/groups/{group['id']}", headers=ops).json()["name"] == "rack-a"
    assert client.get("/api/v1/groups/nope", headers=ops).status_code == 404
    assert client.post("/api/v1/groups", json={"name": "other"}, headers=ops).status_code == 403
    assert client.post("/api/v1/groups", json={"name": "rack-a"}, headers=admin).status_code == 409
    events = client.get("/api/v1/audit?action=group_create", headers=ops).json()["items"]
    assert events[0]["details"]["group"] == "rack-a"


def test_higher_priority_wins_and_explicit_members_count(
    client: TestClient, admin: dict[str, str], ops: dict[str, str], bases: Path
) -> None:
    _group(
        client,
        admin,
        name="late",
        priority=50,
        selector={"pool": "gpu"},
        patch="machine:\n  install:\n    disk: /dev/sdb\n",
    )
    _group(
        client,
        admin,
        name="early",
        priority=10,
        selector={"pool": "gpu"},
        patch="machine:\n  install:\n    disk: /dev/sdc\n",
    )
    listed = client.get("/api/v1/groups", headers=ops).json()
    assert [g["name"] for g in listed] == ["early", "late"]  # the order patches apply: the last one wins
    gpu = _approved(client, ops, MACS[0], labels={"pool": "gpu"})
    assert _v1(_download(client, MACS[0]))["machine"]["install"]["disk"] == "/dev/sdb"

    client.put("/api/v1/groups/early", json={"priority": 90}, headers=admin)
    assert _v1(_download(client, MACS[0]))["machine"]["install"]["disk"] == "/dev/sdc"

    # Explicit membership: a device without the label, added by id.
    pinned = _group(client, admin, name="pinned", priority=0, patch="machine:\n  install:\n    disk: /dev/vda\n")
    loner = _approved(client, ops, MACS[1])
    assert "disk" not in _v1(_download(client, MACS[1]))["machine"]["install"]
    r = client.post(f"/api/v1/groups/{pinned['id']}/members", json={"add": [loner]}, headers=ops)
    assert r.status_code == 200 and r.json()["members"] == [loner]
    assert _v1(_download(client, MACS[1]))["machine"]["install"]["disk"] == "/dev/vda"
    # A lower-priority explicit group still loses to the label groups.
    client.post("/api/v1/groups/pinned/members", json={"add": [gpu]}, headers=ops)
    assert _v1(_download(client, MACS[0]))["machine"]["install"]["disk"] == "/dev/sdc"

    r = client.post("/api/v1/groups/pinned/members", json={"remove": [loner]}, headers=ops)
    assert r.json()["members"] == [gpu]
    assert "disk" not in _v1(_download(client, MACS[1]))["machine"]["install"]
    r = client.post("/api/v1/groups/pinned/members", json={"add": [9999]}, headers=ops)
    assert r.status_code == 404 and "9999" in r.json()["detail"]
    events = client.get("/api/v1/audit?action=group_members", headers=ops).json()["items"]
    assert events[0]["details"] == {"group": "pinned", "added": [], "removed": [loner]}

    assert client.delete("/api/v1/groups/early", headers=admin).status_code == 204
    assert _v1(_download(client, MACS[0]))["machine"]["install"]["disk"] == "/dev/sdb"


def test_render_order_base_groups_device_patch_then_device_fields(
    client: TestClient, admin: dict[str, str], ops: dict[str, str], bases: Path
) -> None:
    _group(
        client,
        admin,
        name="fleet",
        selector={"fleet": "x"},
        patch="machine:\n  install:\n    disk: /dev/sdb\n  kubelet:\n    extraArgs:\n      max-pods: '110'\n",
    )
    device_id = _approved(client, ops, MACS[0], labels={"fleet": "x"}, hostname="node-7", ip_address="10.0.5.7/24")
    own = """\
machine:
  kubelet:
    extraArgs:
      max-pods: '300'
---
apiVersion: v1alpha1
kind: HostnameConfig
auto: "off"
hostname: from-a-patch
---
apiVersion: v1alpha1
kind: LinkConfig
name: ktizo0
addresses:
  - address: 192.168.99.9/24
"""
    r = client.put(f"/api/v1/devices/{device_id}", json={"patch": own}, headers=ops)
    assert r.status_code == 200, r.text
    assert r.json()["patch"] == own
    docs = _download(client, MACS[0])
    v1 = _v1(docs)
    assert v1["machine"]["kubelet"]["extraArgs"] == {"max-pods": "300"}  # device patch over the group's
    assert v1["machine"]["install"]["disk"] == "/dev/sdb"  # the group's, which the device patch left alone
    kinds = _kinds(docs)
    assert kinds[("HostnameConfig", None)]["hostname"] == "node-7"  # the device's own field wins
    assert kinds[("LinkConfig", "ktizo0")]["addresses"] == [{"address": "10.0.5.7/24"}]

    r = client.put(f"/api/v1/devices/{device_id}", json={"install_disk": "/dev/nvme1n1"}, headers=ops)
    assert r.status_code == 200 and r.json()["install_disk"] == "/dev/nvme1n1"
    assert _v1(_download(client, MACS[0]))["machine"]["install"]["disk"] == "/dev/nvme1n1"
    client.put(f"/api/v1/devices/{device_id}", json={"install_disk": None, "patch": None}, headers=ops)
    v1 = _v1(_download(client, MACS[0]))
    assert v1["machine"]["install"]["disk"] == "/dev/sdb"
    assert v1["machine"]["kubelet"]["extraArgs"] == {"max-pods": "110"}


def test_a_patch_cannot_change_a_devices_role(
    client: TestClient, admin: dict[str, str], ops: dict[str, str], bases: Path
) -> None:
    """The role is the device's own field: a patch setting machine.type is refused when saved."""
    r = client.post(
        "/api/v1/groups",
        json={"name": "flip", "selector": {"x": "y"}, "patch": "machine:\n  type: worker\n"},
        headers=admin,
    )
    assert r.status_code == 422
    error = r.json()["detail"][0]
    assert error["loc"] == ["body", "patch", "machine", "type"]
    assert "role" in error["msg"]
    device_id = _approved(client, admin, MACS[0], role="controlplane")  # a control plane is an admin's to edit
    r = client.put(f"/api/v1/devices/{device_id}", json={"patch": "machine:\n  type: worker\n"}, headers=admin)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][1] == "patch"
    assert _v1(_download(client, MACS[0]))["machine"]["type"] == "controlplane"


@pytest.mark.parametrize(
    ("patch", "loc", "words"),
    [
        ("- op: add\n  path: /machine/install/disk\n  value: /dev/sdz\n", ["patch"], "multi-document"),
        (
            "cluster:\n  controlPlane:\n    $patch: delete\n",
            ["patch", "cluster", "controlPlane", "endpoint"],
            "missing",
        ),
        ("machine:\n  ca:\n    $patch: delete\n", ["patch", "machine", "ca", "crt"], "missing"),
        ("machine:\n  install: [\n", ["patch"], "invalid YAML"),
        ("a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n", ["patch"], "anchor"),
        ("machine:\n  kubelet:\n    bogus: 1\n", ["patch", "machine", "kubelet", "bogus"], "unknown field"),
        ("just a string\n", ["patch"], ""),
    ],
)
def test_bad_patches_are_refused_when_saved(
    client: TestClient,
    admin: dict[str, str],
    ops: dict[str, str],
    bases: Path,
    patch: str,
    loc: list[str],
    words: str,
) -> None:
    r = client.post("/api/v1/groups", json={"name": "bad", "selector": {"a": "b"}, "patch": patch}, headers=admin)
    assert r.status_code == 422, r.text
    error = r.json()["detail"][0]
    assert error["loc"][1 : 1 + len(loc)] == loc, error
    assert words in error["msg"]
    assert client.get("/api/v1/groups", headers=admin).json() == []

    # The same patch is refused on an existing group and on a device, and nothing changes.
    good = _group(client, admin, name="good", selector={"a": "b"}, patch=NVME_PATCH)
    r = client.put("/api/v1/groups/good", json={"patch": patch, "priority": 5}, headers=admin)
    assert r.status_code == 422
    after = client.get("/api/v1/groups/good", headers=admin).json()
    assert (after["patch"], after["priority"], after["revision"]) == (NVME_PATCH, 100, good["revision"])
    device_id = _approved(client, ops, MACS[0], labels={"a": "b"})
    r = client.put(f"/api/v1/devices/{device_id}", json={"patch": patch, "hostname": "changed"}, headers=ops)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"][1] == "patch"
    device = client.get(f"/api/v1/devices/{device_id}", headers=ops).json()
    assert (device["patch"], device["hostname"]) == (None, None)
    assert _v1(_download(client, MACS[0]))["machine"]["install"]["disk"] == "/dev/nvme0n1"


def test_a_refused_json6902_patch_names_the_field_once(client: TestClient, admin: dict[str, str], bases: Path) -> None:
    r = client.post(
        "/api/v1/groups", json={"name": "j", "patch": "- op: remove\n  path: /machine/install\n"}, headers=admin
    )
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "patch"]


def test_a_patch_within_the_documented_size_can_be_saved(
    client: TestClient, admin: dict[str, str], bases: Path
) -> None:
    manifest = "# " + "x" * 100_000
    patch = f"cluster:\n  inlineManifests:\n    - name: big\n      contents: '{manifest}'\n"
    assert len(patch) < 256 * 1024
    r = client.post("/api/v1/groups", json={"name": "big", "selector": {"a": "b"}, "patch": patch}, headers=admin)
    assert r.status_code == 201, r.text[:200]


def test_group_and_device_inputs_are_checked(
    client: TestClient, admin: dict[str, str], ops: dict[str, str], bases: Path
) -> None:
    for body, field in (
        ({"name": "Bad Name!"}, "name"),
        ({"name": "123"}, "name"),
        ({"name": "g", "selector": {"rack": "a b"}}, "selector"),
        ({"name": "g", "gateway": "10.0.0.256"}, "gateway"),
        ({"name": "g", "nameservers": ["one.one"]}, "nameservers"),
        ({"name": "g", "priority": 10001}, "priority"),
        ({"name": "g", "members": [1]}, "members"),
    ):
        r = client.post("/api/v1/groups", json=body, headers=admin)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["detail"][0]["loc"][1] == field, r.json()
    assert client.get("/api/v1/groups", headers=admin).json() == []

    device_id = _approved(client, ops, MACS[0])
    device_bodies: tuple[tuple[dict[str, Any], str], ...] = (
        ({"labels": {"rack": "a b"}}, "labels"),
        ({"install_disk": "sda"}, "install_disk"),
        ({"install_disk": "/dev/../etc/passwd"}, "install_disk"),
        ({"extra_nics": [{"mac": MACS[0], "addresses": ["10.1.0.2/24"]}]}, "extra_nics"),
        ({"extra_nics": [{"mac": "zz", "addresses": []}]}, "extra_nics"),
        ({"extra_nics": [{"mac": MACS[1], "addresses": ["10.1.0.2"]}]}, "extra_nics"),
    )
    for device_body, field in device_bodies:
        r = client.put(f"/api/v1/devices/{device_id}", json=device_body, headers=ops)
        assert r.status_code == 422, (device_body, r.text)
        assert r.json()["detail"][0]["loc"][1] == field, r.json()
    device = client.get(f"/api/v1/devices/{device_id}", headers=ops).json()
    assert (device["labels"], device["install_disk"], device["extra_nics"]) == ({}, None, [])


# -- network --------------------------------------------------------------------------------------------


def test_gateway_nameservers_and_extra_nics(
    client: TestClient, admin: dict[str, str], ops: dict[str, str], bases: Path
) -> None:
    r = client.put(
        "/api/v1/cluster", json={"gateway": "10.0.6.1", "nameservers": ["1.1.1.1", "9.9.9.9"]}, headers=admin
    )
    assert r.status_code == 200, r.text
    _group(client, admin, name="rack-5", selector={"rack": "5"}, gateway="10.0.5.1")
    _approved(client, ops, MACS[0], labels={"rack": "5"}, ip_address="10.0.5.100/24", hostname="r5")
    _approved(client, ops, MACS[1], ip_address="10.0.6.100/24")
    _approved(client, ops, MACS[2], ip_address="10.0.7.100/24")  # the cluster gateway is not in its subnet
    _approved(client, ops, MACS[3])  # DHCP: nothing static, no resolver config

    in_group = _kinds(_download(client, MACS[0]))
    alias = in_group[("LinkAliasConfig", "ktizo0")]
    assert MACS[0] in alias["selector"]["match"]
    assert in_group[("LinkConfig", "ktizo0")]["routes"] == [{"gateway": "10.0.5.1"}]
    assert in_group[("LinkConfig", "ktizo0")]["addresses"] == [{"address": "10.0.5.100/24"}]
    assert in_group[("ResolverConfig", None)]["nameservers"] == [{"address": "1.1.1.1"}, {"address": "9.9.9.9"}]

    cluster_gw = _kinds(_download(client, MACS[1]))
    assert cluster_gw[("LinkConfig", "ktizo0")]["routes"] == [{"gateway": "10.0.6.1"}]
    assert cluster_gw[("ResolverConfig", None)]["nameservers"] == [{"address": "1.1.1.1"}, {"address": "9.9.9.9"}]

    off_subnet = _kinds(_download(client, MACS[2]))
    assert "routes" not in off_subnet[("LinkConfig", "ktizo0")]

    dhcp = _kinds(_download(client, MACS[3]))
    assert not any(kind in ("LinkConfig", "ResolverConfig", "LinkAliasConfig") for kind, _ in dhcp)

    # A group's nameservers replace the cluster's for its members.
    client.put("/api/v1/groups/rack-5", json={"nameservers": ["10.0.5.53"]}, headers=admin)
    assert _kinds(_download(client, MACS[0]))[("ResolverConfig", None)]["nameservers"] == [{"address": "10.0.5.53"}]

    # Extra NICs: each selected by its own MAC, with its own addresses (and gateway when given).
    device_id = client.get("/api/v1/devices?q=" + MACS[1], headers=ops).json()[0]["id"]
    nics = [
        {"mac": "52-54-00-AA-00-01", "addresses": ["192.168.10.5/24"]},
        {"mac": "52:54:00:aa:00:02", "addresses": ["192.168.20.5/24", "fd00::5/64"], "gateway": "192.168.20.1"},
    ]
    r = client.put(f"/api/v1/devices/{device_id}", json={"extra_nics": nics}, headers=ops)
    assert r.status_code == 200, r.text
    assert [n["mac"] for n in r.json()["extra_nics"]] == ["52:54:00:aa:00:01", "52:54:00:aa:00:02"]
    docs = _kinds(_download(client, MACS[1]))
    assert MACS[1] in docs[("LinkAliasConfig", "ktizo0")]["selector"]["match"]
    assert "52:54:00:aa:00:01" in docs[("LinkAliasConfig", "ktizo1")]["selector"]["match"]
    assert "52:54:00:aa:00:02" in docs[("LinkAliasConfig", "ktizo2")]["selector"]["match"]
    assert docs[("LinkConfig", "ktizo1")]["addresses"] == [{"address": "192.168.10.5/24"}]
    assert "routes" not in docs[("LinkConfig", "ktizo1")]
    assert docs[("LinkConfig", "ktizo2")]["addresses"] == [{"address": "192.168.20.5/24"}, {"address": "fd00::5/64"}]
    assert docs[("LinkConfig", "ktizo2")]["routes"] == [{"gateway": "192.168.20.1"}]
    assert docs[("LinkConfig", "ktizo0")]["routes"] == [{"gateway": "10.0.6.1"}]


def test_network_defaults_on_talos_v1_11_use_the_legacy_section(
    client: TestClient, admin: dict[str, str], ops: dict[str, str], bases: Path
) -> None:
    client.put(
        "/api/v1/cluster",
        json={"talos_version": "v1.11", "gateway": "10.0.6.1", "nameservers": ["1.1.1.1"]},
        headers=admin,
    )
    _approved(client, ops, MACS[0], ip_address="10.0.6.100/24", hostname="old")
    docs = _download(client, MACS[0])
    assert {d.get("kind") for d in docs} & {"LinkConfig", "ResolverConfig", "HostnameConfig"} == set()
    network = _v1(docs)["machine"]["network"]
    assert network["hostname"] == "old"
    assert network["interfaces"] == [
        {
            "deviceSelector": {"hardwareAddr": MACS[0]},
            "addresses": ["10.0.6.100/24"],
            "routes": [{"network": "0.0.0.0/0", "gateway": "10.0.6.1"}],
            "dhcp": False,
        }
    ]
    assert network["nameservers"] == ["1.1.1.1"]


# -- cache ----------------------------------------------------------------------------------------------


def test_changes_invalidate_exactly_the_affected_renders(
    client: TestClient, admin: dict[str, str], ops: dict[str, str], bases: Path, services: Services
) -> None:
    cache = services.renderer.cache
    _group(client, admin, name="a", selector={"g": "a"}, patch=NVME_PATCH)
    a1 = _approved(client, ops, MACS[0], labels={"g": "a"})
    _approved(client, admin, MACS[1], labels={"g": "a"}, role="controlplane")
    outsider = _approved(client, ops, MACS[2])
    macs = MACS[:3]

    rounds = iter(range(1, 100))

    def serve_all() -> tuple[int, int]:
        # Each round from an address of its own: a repeated request would be answered from memory
        # (test_remembered_answers.py), and this is about what gets rendered.
        before = (cache.misses, cache.hits)
        round_client = TestClient(client.app, client=(f"10.0.9.{next(rounds)}", 40000))
        for mac in macs:
            _download(round_client, mac)
        return cache.misses - before[0], cache.hits - before[1]

    assert serve_all() == (3, 0)
    assert serve_all() == (0, 3)

    client.put("/api/v1/groups/a", json={"patch": "machine:\n  install:\n    disk: /dev/sdq\n"}, headers=admin)
    assert serve_all() == (2, 1)
    assert _v1(_download(client, MACS[0]))["machine"]["install"]["disk"] == "/dev/sdq"
    assert serve_all() == (0, 3)

    client.put(f"/api/v1/devices/{outsider}", json={"hostname": "lonely"}, headers=ops)
    assert serve_all() == (1, 2)
    client.put(f"/api/v1/devices/{a1}", json={"labels": {"g": "b"}}, headers=ops)
    assert serve_all() == (1, 2)

    client.put("/api/v1/cluster", json={"gateway": "10.0.0.1"}, headers=admin)
    assert serve_all() == (3, 0)

    worker = (TALOS_FIXTURES / "worker.yaml").read_text() + "# uploaded\n"
    r = client.put("/api/v1/cluster/base/worker", content=worker, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json()["source"] == "uploaded"
    assert serve_all() == (2, 1)  # the two workers; the control plane is a hit

    _group(client, admin, name="empty", selector={"nobody": "here"})
    assert serve_all() == (0, 3)  # a group no device belongs to changes no render

    client.post("/api/v1/groups/a/members", json={"add": [outsider]}, headers=ops)
    assert serve_all() == (1, 2)  # only the new member
    assert _v1(_download(client, MACS[2]))["machine"]["install"]["disk"] == "/dev/sdq"
    client.delete("/api/v1/groups/a", headers=admin)
    assert serve_all() == (2, 1)  # its explicit member and the labelled control plane; a1 left it earlier
    assert "disk" not in _v1(_download(client, MACS[2]))["machine"]["install"]
