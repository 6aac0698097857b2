"""End to end on real components, dnsmasq in full-DHCP mode: a real DHCP client sending PXE and iPXE options,
DHCP discovery, the iPXE scripts, a client doing what Talos does, and real VMs (SeaBIOS + iPXE ROM, and OVMF
UEFI with its own PXE and TFTP) booting through dnsmasq -> iPXE -> Ktizo."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml

from tests.e2e.conftest import BASE, RANGE, SERVER_IP, Ktizo
from tests.e2e.netlab import OVMF, Client, log_lines, qemu_argv, random_mac, sh, talos_form, wait_for
from tests.support import TALOS_HEADERS

pytestmark = [pytest.mark.slow, pytest.mark.sqlite_only]

BIOS = "PXEClient:Arch:00000:UNDI:002001"
UEFI = "PXEClient:Arch:00007:UNDI:003016"
IPXE_USER_CLASS = "0x4d:" + b"iPXE".hex()
IPXE_DIR = Path("/usr/lib/ipxe")


@pytest.mark.parametrize(
    ("vendor", "options", "expected"),
    [
        pytest.param(BIOS, ["0x5d:0000"], "undionly.kpxe", id="bios"),
        pytest.param(UEFI, ["0x5d:0007"], "snponly.efi", id="uefi-x64"),
        pytest.param(UEFI, ["0x5d:0009"], "snponly.efi", id="uefi-x64-rfc"),
        pytest.param(BIOS, ["0x5d:0000", IPXE_USER_CLASS], f"{BASE}/boot.ipxe", id="ipxe"),
        pytest.param(None, [], None, id="not-pxe"),
    ],
)
def test_the_offer_points_at_the_right_boot_file(
    full_dhcp: Ktizo, vendor: str | None, options: list[str], expected: str | None
) -> None:
    client = full_dhcp.lab.client()
    lease = client.dhcp(vendor=vendor, options=options)
    assert lease["siaddr"] == SERVER_IP and lease["serverid"] == SERVER_IP
    assert lease["ip"].startswith("10.213.0.")
    # dnsmasq puts the name in option 67 when asked for it, else in the BOOTP file field.
    assert (lease.get("bootfile") or lease.get("boot_file") or None) == expected


def test_tftp_serves_the_ipxe_build_from_debians_package(full_dhcp: Ktizo) -> None:
    client = full_dhcp.lab.client()
    lease = client.dhcp(vendor=BIOS, options=["0x5d:0000"])
    target = full_dhcp.lab.workdir / "fetched.kpxe"
    client.ns.run("busybox", "tftp", "-g", "-r", lease["bootfile"], "-l", str(target), SERVER_IP)
    assert target.read_bytes() == (IPXE_DIR / "undionly.kpxe").read_bytes()


def test_dhcp_discovery_registers_the_mac_as_pending_with_its_lease_ip(full_dhcp: Ktizo) -> None:
    client = full_dhcp.lab.client()
    lease = client.dhcp(vendor=UEFI, options=["0x5d:0007", "hostname:disc-1"])
    device = wait_for(lambda: full_dhcp.device(client.mac), 20, "the dhcp-script to report the lease")
    assert device["status"] == "pending" and device["source"] == "dhcp"
    assert device["lease_ip"] == lease["ip"] and device["facts"]["lease_ip"] == lease["ip"]
    # The hook logs its outcome after the server answered, so the line may trail the device by a moment.
    wait_for(
        lambda: any(client.mac in line and "reported add" in line for line in log_lines(full_dhcp.pxe, "dhcp-event")),
        10,
        "the dhcp-script's log line",
    )


def test_ipxe_scripts_then_talos_is_refused_until_approved(full_dhcp: Ktizo) -> None:
    client = full_dhcp.lab.client()
    lease = client.dhcp(vendor=BIOS, options=["0x5d:0000", IPXE_USER_CLASS])
    mac = client.mac

    entry = client.ns.http("GET", f"{BASE}/boot.ipxe")
    assert entry.status == 200 and entry.text.startswith("#!ipxe\n")
    assert "/api/v1/boot/ipxe?mac=${net0/mac}" in entry.text

    # What iPXE sends once it has expanded the chain line (it percent-encodes ':' and spaces).
    uuid = "4c4c4544-0042-3510-8051-b4c04f4e3132"
    facts = {"mac": mac, "uuid": uuid, "serial": "E2E 1", "manufacturer": "Lab Vendor", "product": "Rack Box",
             "arch": "x86_64", "platform": "efi", "ip": lease["ip"]}  # fmt: skip
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in facts.items())
    script = client.ns.http("GET", f"{BASE}/api/v1/boot/ipxe?{query}")
    assert script.status == 200 and script.text.startswith("#!ipxe\n"), script.text
    kernel = re.search(r"^kernel (\S+/assets/talos/(v[\d.]+)/amd64/vmlinuz) (.*)$", script.text, re.M)
    assert kernel, script.text
    kernel_url, version, args = kernel.groups()
    assert kernel_url.startswith(BASE)
    for required in ("talos.platform=metal", "slab_nomerge", "pti=on"):
        assert required in args.split()
    assert re.search(r"^initrd \S+/initramfs\.xz", script.text, re.M)
    config = re.search(r"talos\.config=(\S+)", args)
    assert config and quote(mac, safe="") in config.group(1)

    # No assets on this machine: iPXE's kernel fetch gets a 404 that says what to do.
    missing = client.ns.http("GET", kernel_url)
    assert missing.status == 404 and f"ktizo assets fetch --talos-version {version}" in missing.text

    # iPXE expands ${uuid} and ${serial:uristring} before the kernel sees them; then Talos GETs the URL.
    url = config.group(1).replace("${uuid}", uuid).replace("${serial:uristring}", quote("E2E 1", safe=""))
    refused = client.ns.http("GET", talos_form(url), headers=TALOS_HEADERS)
    assert refused.status == 403 and "Device not approved. Current status: pending" in refused.text

    device = full_dhcp.device(mac)
    assert device is not None and device["uuid"] == uuid
    assert device["facts"]["manufacturer"] == "Lab Vendor" and device["facts"]["platform"] == "efi"
    approved = full_dhcp.api("POST", f"/api/v1/devices/{device['id']}/approve", {"role": "worker", "hostname": "e2e-1"})
    assert approved.status == 200, approved.text

    got = client.ns.http("GET", talos_form(url), headers=TALOS_HEADERS)
    assert got.status == 200 and got.headers["content-type"].startswith("application/yaml")
    documents = [d for d in yaml.safe_load_all(got.text) if d]
    assert documents[0]["machine"]["type"] == "worker"
    assert "e2e-1" in got.text


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_a_vm_netboots_through_dnsmasq_ipxe_and_ktizo(full_dhcp: Ktizo, firmware: str) -> None:
    if firmware == "uefi" and OVMF is None:
        pytest.skip("OVMF is not installed")
    lab = full_dhcp.lab
    client: Client = lab.client()
    tap = client.vm_port()
    mac = random_mac()
    serial_log = lab.workdir / f"vm-{firmware}-serial.log"
    started = time.monotonic()
    vm = lab.start(f"vm-{firmware}", client.ns.argv(*qemu_argv(firmware, tap, mac, serial_log)))
    encoded = quote(mac, safe="")
    try:

        def asked_for_script() -> str | None:
            if vm.popen.poll() is not None:
                raise AssertionError(f"the VM stopped early:\n{vm.output()}\n{serial_log.read_text(errors='replace')}")
            lines = log_lines(full_dhcp.serve, rf'"GET /api/v1/boot/ipxe\?mac={re.escape(encoded)}&')
            return lines[0] if lines else None

        line = wait_for(asked_for_script, 60, f"the {firmware} VM to ask Ktizo for its iPXE script")
        to_script = time.monotonic() - started
        vm_ip = re.search(r"(\d+\.\d+\.\d+\.\d+):\d+ - ", line)
        assert vm_ip, line
        kernel = rf'{re.escape(vm_ip.group(1))}:\d+ - "GET /assets/talos/v[\d.]+/amd64/vmlinuz HTTP/1.1" 404'
        wait_for(lambda: log_lines(full_dhcp.serve, kernel), 20, "iPXE to try the Talos kernel")
        to_kernel = time.monotonic() - started
    finally:
        lab.stop(vm)
    sys.stderr.write(
        f"\n{firmware}: QEMU start -> iPXE script request {to_script:.1f} s, -> kernel {to_kernel:.1f} s\n"
    )

    def reported() -> dict[str, Any] | None:
        device = full_dhcp.device(mac)
        return device if device and device["facts"].get("lease_ip") else None

    # dnsmasq runs its lease hook in the background; on a busy machine it may land after iPXE's requests.
    device = wait_for(reported, 15, "the lease hook to report the VM")
    assert device["status"] == "pending"
    assert device["source"] in ("dhcp", "ipxe")
    facts = device["facts"]
    assert facts["manufacturer"] == "QEMU" and facts["lease_ip"] == vm_ip.group(1)
    assert (facts["platform"], facts["arch"]) == (("pcbios", "i386") if firmware == "bios" else ("efi", "x86_64"))
    assert log_lines(full_dhcp.serve, "asked for a missing asset: Talos v")
    dnsmasq = full_dhcp.pxe.output()
    if firmware == "uefi":
        # The firmware's own PXE: DHCP as an x86-64 UEFI client, then TFTP of the iPXE build.
        assert re.search(rf"sent \S+/tftp/snponly\.efi to {re.escape(vm_ip.group(1))}", dnsmasq)
    # What iPXE was offered (log-dhcp): the HTTP URL, in option 67 or the BOOTP file field.
    assert re.search(rf"bootfile[- ]name:?\s+{re.escape(BASE)}/boot\.ipxe", dnsmasq)


def test_dnsmasq_that_dies_is_restarted_and_serves_again(full_dhcp: Ktizo) -> None:
    pid_file = full_dhcp.lab.data_dir / "pxe" / "dnsmasq.pid"
    wait_for(lambda: log_lines(full_dhcp.pxe, r"dnsmasq is running \(pid"), 10, "dnsmasq to be up")
    pid = int(pid_file.read_text())
    starts = len(log_lines(full_dhcp.pxe, r"started dnsmasq \(pid"))
    os.kill(pid, signal.SIGKILL)  # the dnsmasq this lab's `ktizo pxe run` started
    wait_for(lambda: log_lines(full_dhcp.pxe, "dnsmasq exited after .* killed by signal 9.*restarting in"), 10,
             "the supervisor to notice")  # fmt: skip
    wait_for(lambda: len(log_lines(full_dhcp.pxe, r"started dnsmasq \(pid")) > starts, 10, "dnsmasq to be restarted")
    wait_for(lambda: int(pid_file.read_text() or 0) not in (0, pid), 10, "the new dnsmasq's pid file")
    lease = full_dhcp.lab.client().dhcp(vendor=BIOS, options=["0x5d:0000"])
    assert lease["bootfile"] == "undionly.kpxe"


def test_a_second_pxe_run_or_a_taken_dhcp_port_is_refused_with_a_clear_message(full_dhcp: Ktizo) -> None:
    lab = full_dhcp.lab
    pxe_run = [sys.executable, "-m", "ktizo", "pxe", "run", "-i", "br0", "--mode", "full", "--range", RANGE]
    same = subprocess.run(lab.server.argv(*pxe_run), env=lab.env(), capture_output=True, text=True, timeout=60)
    assert same.returncode == 1 and "another `ktizo pxe run` (pid" in same.stderr, same.stderr

    # A host where another DHCP server (here: a socket on port 67 without SO_REUSEADDR, as ISC dhcpd holds it)
    # already runs: dnsmasq cannot bind, and the operator is told why instead of seeing a restart loop.
    host = lab.namespace("busy")
    sh("ip", "-n", host.name, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", host.name, "addr", "add", f"{SERVER_IP}/24", "dev", "br0")
    sh("ip", "-n", host.name, "link", "set", "br0", "up")
    holder = lab.start("port67", host.argv(sys.executable, "-c", HOLD_PORT_67))
    wait_for(lambda: "bound" in holder.output(), 10, "the other DHCP server to bind port 67")
    other = lab.workdir / "other"
    other.mkdir(mode=0o755)
    env = lab.env(KTIZO_DATA_DIR=str(other))
    subprocess.run([sys.executable, "-m", "ktizo", "db", "upgrade"], env=env, check=True, capture_output=True)
    clash = subprocess.run(host.argv(*pxe_run), env=env, capture_output=True, text=True, timeout=60)
    assert clash.returncode == 1
    assert "dnsmasq did not start: port 67 (DHCP) is in use: another DHCP server" in clash.stderr, clash.stderr


HOLD_PORT_67 = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 67))
print("bound", flush=True)
time.sleep(120)
"""
