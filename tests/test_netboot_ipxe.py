"""iPXE scripts as a PXE-booting machine sees them: the static entry script, then the per-machine decision
(boot Talos, leave the network boot when rejected, boot the disk when installed), with every value that could
reach a script line validated."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from ktizo.cli import app as cli_app
from ktizo.domain.errors import ValidationFailed
from ktizo.services.context import Actor
from ktizo.services.devices import DeviceChanges
from ktizo.services.ipxe import BootFacts
from ktizo.services.registry import Services
from ktizo.settings import Settings
from tests.support import TALOS_HEADERS, talos_url

MAC = "52:54:00:12:34:56"
MAC_Q = quote(MAC, safe="")  # 52%3A54%3A00%3A12%3A34%3A56
UUID = "4c4c4544-0042-3510-8051-b4c04f4e3132"
BASE = "http://testserver"
IPXE_QUERY = {
    "mac": MAC,
    "uuid": UUID,
    "serial": "SN-1",
    "manufacturer": "Dell Inc.",
    "product": "PowerEdge R650",
    "arch": "x86_64",
    "platform": "efi",
    "ip": "10.0.0.50",
}
KERNEL_ARGS = "talos.platform=metal console=tty0 console=ttyS0 init_on_alloc=1 slab_nomerge pti=on printk.devkmsg=on"
OAUTH_ARGS = (
    " talos.config.oauth.client_id=ktizo talos.config.oauth.extra_variable=mac"
    " talos.config.oauth.extra_variable=uuid talos.config.oauth.extra_variable=serial"
)

# Every line a per-machine script may consist of. A value a machine sent can only ever appear inside the
# kernel/initrd URLs, and there only in its validated form.
_ECHO = r"echo [A-Za-z0-9 .,;:()`'?-]+"
_URL = r"https?://[A-Za-z0-9.:\[\]-]+(?:/[A-Za-z0-9._/-]*)?"
SCRIPT_LINE = re.compile(
    "|".join(
        [
            r"#!ipxe",
            r"# [A-Za-z0-9 ,.:;'-]+",
            _ECHO,
            r"sleep \d+",
            r"exit [01]",
            r"reboot",
            r":failed",
            r"boot \|\| goto failed",
            rf"initrd {_URL}/initramfs\.xz \|\| goto failed",
            rf"kernel {_URL}/vmlinuz {re.escape(KERNEL_ARGS)} initrd=initramfs\.xz "
            rf"talos\.config={_URL}/api/v1/config/download\?mac=(?:[0-9a-f]{{2}}%3A){{5}}[0-9a-f]{{2}}"
            rf"&uuid=\$\{{uuid\}}&serial=\$\{{serial:uristring\}}(?:{re.escape(OAUTH_ARGS)})? \|\| goto failed",
        ]
    )
)


def assert_script_shape(script: str) -> list[str]:
    lines = script.splitlines()
    assert lines[0] == "#!ipxe", script
    assert script.endswith("\n")
    for line in lines:
        assert SCRIPT_LINE.fullmatch(line), f"unexpected script line {line!r} in:\n{script}"
    return lines


def expected_boot_script(version: str, arch: str, status: str, *, base: str = BASE, oauth: bool = False) -> str:
    assets = f"{base}/assets/talos/{version}/{arch}"
    config = f"{base}/api/v1/config/download?mac={MAC_Q}&uuid=${{uuid}}&serial=${{serial:uristring}}"
    return (
        "#!ipxe\n"
        f"echo Ktizo: booting Talos {version} ({arch}); this machine is {status}.\n"
        f"kernel {assets}/vmlinuz {KERNEL_ARGS} initrd=initramfs.xz talos.config={config}"
        f"{OAUTH_ARGS if oauth else ''} || goto failed\n"
        f"initrd {assets}/initramfs.xz || goto failed\n"
        "boot || goto failed\n"
        ":failed\n"
        "echo Ktizo: could not load Talos; is `ktizo assets fetch` done? Retrying in 30 seconds.\n"
        "sleep 30\n"
        "reboot\n"
    )


def kernel_line(script: str) -> str:
    lines = [line for line in script.splitlines() if line.startswith("kernel ")]
    assert len(lines) == 1, script
    return lines[0]


def ipxe(client: TestClient, **values: str) -> str:
    r = client.get("/api/v1/boot/ipxe", params=values)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    text: str = r.text
    return text


def devices(client: TestClient, ops: dict[str, str]) -> list[dict[str, object]]:
    r = client.get("/api/v1/devices", headers=ops)
    assert r.status_code == 200
    out: list[dict[str, object]] = r.json()
    return out


def the_device(client: TestClient, ops: dict[str, str]) -> dict[str, object]:
    found = devices(client, ops)
    assert len(found) == 1, found
    return found[0]


# -- the entry script ---------------------------------------------------------------------------------


def test_entry_script_chains_to_the_machine_script_with_what_ipxe_knows(client: TestClient) -> None:
    r = client.get("/boot.ipxe")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    lines = r.text.splitlines()
    assert lines[0] == "#!ipxe"
    chain = [line for line in lines if line.startswith("chain ")]
    assert chain == [
        "chain --autofree http://testserver/api/v1/boot/ipxe?mac=${net0/mac}&uuid=${uuid}"
        "&serial=${serial:uristring}&manufacturer=${manufacturer:uristring}&product=${product:uristring}"
        "&arch=${buildarch}&platform=${platform}&ip=${net0/ip} || goto failed"
    ]
    # If Ktizo cannot be reached the machine moves on to its next boot device instead of hanging.
    assert lines[-2:] == ["sleep 10", "exit 1"]
    assert ":failed" in lines


def test_entry_script_uses_public_url_when_set(make_client: Callable[..., tuple[TestClient, Services]]) -> None:
    client, _ = make_client(public_url="http://10.0.0.1:8000/")
    text = client.get("/boot.ipxe").text
    assert "chain --autofree http://10.0.0.1:8000/api/v1/boot/ipxe?mac=${net0/mac}&" in text
    assert "testserver" not in text


def test_entry_script_follows_the_url_the_request_came_in_on(client: TestClient) -> None:
    text = client.get("/boot.ipxe", headers={"Host": "ktizo.lab:8080"}).text
    assert "chain --autofree http://ktizo.lab:8080/api/v1/boot/ipxe?" in text


def test_hostile_base_urls_never_become_script_lines(
    client: TestClient, services: Services, make_client: Callable[..., tuple[TestClient, Services]]
) -> None:
    r = client.get("/boot.ipxe", headers={"Host": "evil${x}<script>"})
    assert "${x}" not in r.text and "<script>" not in r.text
    for base in ("http://evil/\nchain http://evil/x", "http://h/${net0/mac}", "http://h/<script>", "http://h/ x"):
        with pytest.raises(ValidationFailed):
            services.ipxe.entry_script(base)
        with pytest.raises(ValidationFailed):
            services.ipxe.machine_script(BootFacts(mac=MAC), base, None)
    hostile, _ = make_client(public_url="http://10.0.0.1:8000/\nchain http://evil/x")
    for path in ("/boot.ipxe", f"/api/v1/boot/ipxe?mac={MAC}"):
        r = hostile.get(path)
        assert r.status_code == 422
        assert "#!ipxe" not in r.text and "chain http://evil" not in r.text
        assert "public_url" in r.text


# -- the per-machine script: unknown, pending, approved -------------------------------------------------


def test_unknown_machine_is_registered_pending_with_its_facts_and_boots_talos(
    client: TestClient, ops: dict[str, str], settings: Settings
) -> None:
    script = ipxe(client, **IPXE_QUERY)
    assert script == expected_boot_script("v1.13.0", "amd64", "pending")
    assert_script_shape(script)
    kernel = kernel_line(script)
    for arg in ("talos.platform=metal", "slab_nomerge", "pti=on", "initrd=initramfs.xz", "console=ttyS0"):
        assert f" {arg} " in f"{kernel} "
    # The MAC iPXE booted from is written out; uuid and serial are left for iPXE to expand.
    assert (
        f"talos.config={BASE}/api/v1/config/download?mac=52%3A54%3A00%3A12%3A34%3A56"
        "&uuid=${uuid}&serial=${serial:uristring}" in kernel
    )

    dev = the_device(client, ops)
    assert (dev["mac_address"], dev["status"], dev["source"], dev["uuid"], dev["serial"]) == (
        MAC,
        "pending",
        "ipxe",
        UUID,
        "SN-1",
    )
    assert dev["facts"] == {
        "manufacturer": "Dell Inc.",
        "product": "PowerEdge R650",
        "arch": "x86_64",
        "platform": "efi",
        "ipxe_ip": "10.0.0.50",
    }
    assert dev["last_ip"] == "10.0.0.9"
    audit = client.get(f"/api/v1/audit?device_id={dev['id']}&action=register", headers=ops).json()
    assert audit["total"] == 1
    assert (audit["items"][0]["actor_type"], audit["items"][0]["details"]) == (
        "device",
        {"source": "ipxe", "kind": "talos"},
    )

    # A second boot of the same machine reuses the record and refreshes its facts.
    script = ipxe(client, **{**IPXE_QUERY, "product": "PowerEdge R660"})
    assert script == expected_boot_script("v1.13.0", "amd64", "pending")
    again = the_device(client, ops)
    assert again["id"] == dev["id"]
    facts = again["facts"]
    assert isinstance(facts, dict) and facts["product"] == "PowerEdge R660"
    assert client.get(f"/api/v1/audit?device_id={dev['id']}&action=register", headers=ops).json()["total"] == 1


@pytest.mark.parametrize(
    ("buildarch", "arch"), [("x86_64", "amd64"), ("i386", "amd64"), ("arm64", "arm64"), ("${buildarch}", "amd64")]
)
def test_kernel_and_initrd_match_the_machine_architecture(
    client: TestClient, settings: Settings, buildarch: str, arch: str
) -> None:
    for version in ("v1.13.2", "v1.13.10", "v1.13.9", "v1.12.99", "v1.14.0", "latest"):
        (settings.assets_dir / "talos" / version / arch).mkdir(parents=True)
    script = ipxe(client, mac=MAC, arch=buildarch)
    # The newest imported v1.13 patch release, compared as numbers (v1.13.10 is newer than v1.13.9).
    assert script == expected_boot_script("v1.13.10", arch, "pending")
    assert f"kernel {BASE}/assets/talos/v1.13.10/{arch}/vmlinuz " in script
    assert f"initrd {BASE}/assets/talos/v1.13.10/{arch}/initramfs.xz || goto failed" in script


@pytest.mark.parametrize("buildarch", ["arm32", "riscv64"])
def test_unknown_architecture_gets_a_script_that_explains_and_exits(client: TestClient, buildarch: str) -> None:
    script = ipxe(client, mac=MAC, arch=buildarch)
    lines = assert_script_shape(script)
    assert "kernel" not in script and "initrd" not in script
    assert any("architecture" in line and "amd64 and arm64" in line for line in lines if line.startswith("echo"))
    assert lines[-1] == "exit 1"


@pytest.mark.parametrize("buildarch", ["loong64", "riscv32"])
def test_other_ipxe_architectures_are_refused_not_booted_as_amd64(client: TestClient, buildarch: str) -> None:
    script = ipxe(client, mac=MAC, arch=buildarch)
    assert "kernel" not in script
    assert "architecture" in script


def test_public_url_is_used_in_the_machine_script(make_client: Callable[..., tuple[TestClient, Services]]) -> None:
    client, _ = make_client(public_url="http://10.0.0.1:8000")
    script = ipxe(client, mac=MAC)
    assert script == expected_boot_script("v1.13.0", "amd64", "pending", base="http://10.0.0.1:8000")
    assert "testserver" not in script


def test_oauth_adds_the_device_flow_kernel_arguments(
    make_client: Callable[..., tuple[TestClient, Services]],
) -> None:
    client, _ = make_client(oauth_enabled=True)
    script = ipxe(client, mac=MAC)
    assert script == expected_boot_script("v1.13.0", "amd64", "pending", oauth=True)
    kernel = kernel_line(script)
    assert " talos.config.oauth.client_id=ktizo " in kernel
    assert [a for a in kernel.split() if a.startswith("talos.config.oauth.extra_variable=")] == [
        "talos.config.oauth.extra_variable=mac",
        "talos.config.oauth.extra_variable=uuid",
        "talos.config.oauth.extra_variable=serial",
    ]
    client2, _ = make_client(oauth_enabled=True, oauth_client_id="site-a")
    assert " talos.config.oauth.client_id=site-a " in kernel_line(ipxe(client2, mac=MAC))


def test_oauth_arguments_are_absent_without_the_setting(client: TestClient) -> None:
    assert "oauth" not in ipxe(client, mac=MAC)


# -- rejected and installed machines leave the network boot ------------------------------------------------


def test_rejected_machine_gets_a_message_and_exits_without_a_kernel(client: TestClient, ops: dict[str, str]) -> None:
    ipxe(client, mac=MAC)
    dev = the_device(client, ops)
    assert client.post(f"/api/v1/devices/{dev['id']}/reject", headers=ops).status_code == 200
    script = ipxe(client, mac=MAC, arch="x86_64")
    lines = assert_script_shape(script)
    assert "kernel" not in script and "initrd" not in script and "chain" not in script
    assert any("rejected" in line for line in lines if line.startswith("echo"))
    assert lines[-1] == "exit 1"  # the firmware tries its next boot device: no netboot loop


def test_approved_machine_boots_talos_until_its_config_is_delivered_then_its_disk(
    client: TestClient, ops: dict[str, str], bases: Path
) -> None:
    ipxe(client, mac=MAC)
    dev = the_device(client, ops)
    client.post(f"/api/v1/devices/{dev['id']}/approve", json={"hostname": "node-01"}, headers=ops)
    assert ipxe(client, mac=MAC) == expected_boot_script("v1.13.0", "amd64", "approved")

    r = client.get(talos_url(mac=MAC), headers=TALOS_HEADERS)
    assert r.status_code == 200 and "node-01" in r.text
    script = ipxe(client, mac=MAC)
    lines = assert_script_shape(script)
    assert "kernel" not in script
    assert any("installed" in line and "disk" in line for line in lines if line.startswith("echo"))
    assert lines[-1] == "exit 0"
    assert the_device(client, ops)["installed_at"] is not None


def test_operator_marks_installed_and_reinstall(client: TestClient, ops: dict[str, str]) -> None:
    ipxe(client, mac=MAC)
    dev = the_device(client, ops)
    r = client.post(f"/api/v1/devices/{dev['id']}/installed", json={"installed": True}, headers=ops)
    assert r.status_code == 200 and r.json()["installed_at"] is not None
    script = ipxe(client, mac=MAC)
    assert "kernel" not in script and script.splitlines()[-1] == "exit 0"

    r = client.post(f"/api/v1/devices/{dev['id']}/installed", json={"installed": False}, headers=ops)
    assert r.status_code == 200 and r.json()["installed_at"] is None
    assert ipxe(client, mac=MAC) == expected_boot_script("v1.13.0", "amd64", "pending")

    actions = [e["action"] for e in client.get(f"/api/v1/audit?device_id={dev['id']}", headers=ops).json()["items"]]
    assert actions[:2] == ["reinstall", "installed"]


def test_cli_marks_installed_and_reinstall(client: TestClient, settings: Settings) -> None:
    ipxe(client, mac=MAC)
    env = {"KTIZO_DATA_DIR": str(settings.data_dir), "KTIZO_DATABASE_URL": settings.effective_database_url}
    runner = CliRunner()
    result = runner.invoke(cli_app, ["devices", "installed", "52-54-00-12-34-56"], env=env)
    assert result.exit_code == 0, result.output
    assert "boots from its disk" in result.output
    assert ipxe(client, mac=MAC).splitlines()[-1] == "exit 0"
    result = runner.invoke(cli_app, ["devices", "installed", MAC, "--reinstall"], env=env)
    assert result.exit_code == 0, result.output
    assert "netboots again" in result.output
    assert ipxe(client, mac=MAC) == expected_boot_script("v1.13.0", "amd64", "pending")


def test_installed_flag_needs_an_operator(client: TestClient, viewer_token: str) -> None:
    ipxe(client, mac=MAC)
    assert client.post("/api/v1/devices/1/installed", json={"installed": True}).status_code == 401
    r = client.post(
        "/api/v1/devices/1/installed", json={"installed": True}, headers={"Authorization": f"Bearer {viewer_token}"}
    )
    assert r.status_code == 403
    assert "kernel" in ipxe(client, mac=MAC)


# -- hostile and odd values ---------------------------------------------------------------------------------

HOSTILE = [
    "x\nchain http://evil/x.ipxe",
    "x\r\nkernel http://evil/vmlinuz",
    "${net0/mac}",
    "${root-password}",
    "<script>alert(1)</script>",
    "a || shell",
    "x" * 300,
]


@pytest.mark.parametrize("name", ["manufacturer", "product", "serial", "platform", "arch", "ip", "uuid"])
def test_hostile_facts_never_reach_a_script_line(client: TestClient, ops: dict[str, str], name: str) -> None:
    for i, value in enumerate(HOSTILE):
        mac = f"52:54:00:00:00:{i:02x}"
        script = ipxe(client, **{"mac": mac, name: value})
        assert_script_shape(script)
        for part in ("evil", "shell", "<script>", "root-password", "${net0/mac}", "xxxxxxxxxx"):
            assert part not in script, (value, script)
        known = {d["mac_address"]: d for d in devices(client, ops)}
        if name == "uuid" and "kernel" not in script:
            # A UUID that is not one: the machine is told why and sent on, nothing is recorded.
            assert "uuid" in script and mac not in known
            continue
        # The machine still boots: the bad fact is dropped.
        assert script == expected_boot_script("v1.13.0", "amd64", "pending").replace(MAC_Q, quote(mac, safe=""))
        dev = known[mac]
        facts = dev["facts"]
        assert isinstance(facts, dict)
        stored = dev[name] if name in ("serial", "uuid") else facts.get("ipxe_ip" if name == "ip" else name)
        # Dropped, or (as data only) stored verbatim; never half-cleaned into something else.
        assert stored is None or stored == value, (value, stored)


def test_hostile_or_missing_mac_gets_a_script_that_exits(client: TestClient, ops: dict[str, str]) -> None:
    for mac in [
        "52:54:00:12:34:56\nchain http://evil/x",
        "52:54:00:12:34:56\r\n#!ipxe",
        "${net0/mac}",
        "chain http://evil",
        "",
        "<script>",
        "01:00:5e:00:00:01",  # multicast: no NIC has it
    ]:
        script = ipxe(client, mac=mac, manufacturer="Dell Inc.")
        lines = assert_script_shape(script)
        assert "evil" not in script and "<script>" not in script and "kernel" not in script
        assert lines[-1] == "exit 1"
        assert any("mac" in line.lower() for line in lines if line.startswith("echo"))
    assert devices(client, ops) == []


def test_no_query_at_all_gets_a_script_that_exits(client: TestClient) -> None:
    r = client.get("/api/v1/boot/ipxe")
    assert r.status_code == 200
    assert_script_shape(r.text)
    assert r.text.splitlines()[-1] == "exit 1"


def test_odd_mac_and_uuid_spellings_are_normalised(client: TestClient, ops: dict[str, str]) -> None:
    spellings = [
        "52:54:00:12:34:56",
        "52:54:00:12:34:56\n",  # a trailing newline is whitespace, not a second line
        "52-54-00-12-34-56",
        "52:54:00:12:34:56".upper(),
        "525400123456",
        "5254.0012.3456",
        "52%3A54%3A00%3A12%3A34%3A56",  # iPXE or a proxy percent-encoding the colons once more
    ]
    uuids = [UUID, UUID.upper(), UUID.replace("-", ""), "{" + UUID.upper() + "}"]
    for i, mac in enumerate(spellings):
        script = ipxe(client, mac=mac, uuid=uuids[i % len(uuids)])
        assert script == expected_boot_script("v1.13.0", "amd64", "pending"), mac
        dev = the_device(client, ops)  # always the one machine
        assert (dev["mac_address"], dev["uuid"]) == (MAC, UUID)


def test_percent_encoded_colons_in_the_raw_query_are_understood(client: TestClient, ops: dict[str, str]) -> None:
    r = client.get(f"/api/v1/boot/ipxe?mac=52%3a54%3a00%3a12%3a34%3a56&uuid={UUID.upper()}&arch=x86_64")
    assert r.text == expected_boot_script("v1.13.0", "amd64", "pending")
    dev = the_device(client, ops)
    assert (dev["mac_address"], dev["uuid"]) == (MAC, UUID)
    # ... and the same machine later asking with plain colons is the same device.
    ipxe(client, mac=MAC)
    assert len(devices(client, ops)) == 1


def test_real_firmware_strings_are_kept_as_facts(client: TestClient, ops: dict[str, str]) -> None:
    # What QEMU/OVMF and common servers report through ${manufacturer} and ${product}.
    ipxe(client, mac=MAC, manufacturer="QEMU", product="Standard PC (Q35 + ICH9, 2009)", serial="To Be Filled")
    facts = the_device(client, ops)["facts"]
    assert isinstance(facts, dict)
    assert (facts["manufacturer"], facts["product"]) == ("QEMU", "Standard PC (Q35 + ICH9, 2009)")


def test_lenovo_product_names_are_kept_as_facts(client: TestClient, ops: dict[str, str]) -> None:
    script = ipxe(client, mac=MAC, manufacturer="Lenovo", product="ThinkSystem SR650 -[7X06CTO1WW]-")
    assert script == expected_boot_script("v1.13.0", "amd64", "pending")  # never scripted either way
    facts = the_device(client, ops)["facts"]
    assert isinstance(facts, dict)
    assert facts.get("product") == "ThinkSystem SR650 -[7X06CTO1WW]-"


def test_placeholders_ipxe_could_not_expand_are_not_facts(client: TestClient, ops: dict[str, str]) -> None:
    script = ipxe(
        client,
        mac=MAC,
        uuid="${uuid}",
        serial="${serial:uristring}",
        manufacturer="${manufacturer:uristring}",
        product="",
        arch="${buildarch}",
        platform="${platform}",
        ip="${net0/ip}",
    )
    assert script == expected_boot_script("v1.13.0", "amd64", "pending")
    dev = the_device(client, ops)
    assert (dev["uuid"], dev["serial"], dev["facts"]) == (None, None, {})


def test_a_machine_booting_again_with_nothing_new_is_answered_from_one_read(
    make_client: Callable[..., tuple[TestClient, Services]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A boot storm's machines retry their iPXE script: a knock that changes nothing (same facts, same address,
    seen within KTIZO_LAST_SEEN_INTERVAL) writes nothing, yet its script always follows the machine's state."""
    client, services = make_client(last_seen_interval=3600)
    assert ipxe(client, **IPXE_QUERY) == expected_boot_script("v1.13.0", "amd64", "pending")  # registered
    writes: list[str] = []
    arrive = services.first_contact.arrive

    def counted(s: Any, knock: Any, **kw: Any) -> Any:
        writes.append(knock.mac)
        return arrive(s, knock, **kw)

    monkeypatch.setattr(services.first_contact, "arrive", counted)
    before = services.devices.resolve(MAC)
    pending = expected_boot_script("v1.13.0", "amd64", "pending")
    assert ipxe(client, **IPXE_QUERY) == pending
    assert writes == [] and services.devices.resolve(MAC).last_seen == before.last_seen

    newer = {**IPXE_QUERY, "product": "PowerEdge R660"}  # a fact that changed: first contact records it
    assert ipxe(client, **newer) == pending
    assert writes == [MAC] and services.devices.resolve(MAC).facts["product"] == "PowerEdge R660"
    assert ipxe(client, **newer) == pending and writes == [MAC]

    services.devices.approve(Actor.system(), before.id, DeviceChanges(hostname="node-07"))
    approved = expected_boot_script("v1.13.0", "amd64", "approved")
    assert ipxe(client, **newer) == approved and writes == [MAC]
    # An approved machine's facts are nobody's to change by naming its MAC: nothing to write, so nothing written.
    assert ipxe(client, **IPXE_QUERY) == approved and writes == [MAC]
    assert services.devices.resolve(MAC).facts["product"] == "PowerEdge R660"

    # A UUID that is not the bound one goes through first contact, which records the mismatch.
    ipxe(client, **{**newer, "uuid": "4c4c4544-0042-3510-8051-b4c04f4e3199"})
    assert writes == [MAC, MAC] and services.devices.resolve(MAC).uuid == UUID

    services.devices.reject(Actor.system(), before.id)
    assert "rejected by an operator" in ipxe(client, **newer)
    assert writes == [MAC, MAC]
