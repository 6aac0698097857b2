"""End to end in proxyDHCP mode: the site's own DHCP server (a second, plain dnsmasq in its own namespace) hands
out addresses and reports leases through ``ktizo pxe dhcp-event``; Ktizo's dnsmasq only adds the boot
information. Real VMs boot through both."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.e2e.conftest import BASE, Ktizo, start_ktizo
from tests.e2e.netlab import (
    OVMF,
    Lab,
    Proc,
    log_lines,
    missing_prerequisites,
    qemu_argv,
    random_mac,
    sh,
    talos_form,
    wait_for,
)
from tests.support import TALOS_HEADERS

pytestmark = [pytest.mark.slow, pytest.mark.sqlite_only]

SITE_DHCP_IP = "10.213.0.2"
SITE_RANGE = ("10.213.0.50", "10.213.0.60")


@dataclass
class ProxyLab:
    ktizo: Ktizo
    site_dhcp: Proc


def _site_dhcp_server(lab: Lab) -> Proc:
    """An ordinary DHCP server that knows nothing about PXE; its lease hook is `ktizo pxe dhcp-event`."""
    ns = lab.namespace("site")
    sh("ip", "link", "add", "vsite", "netns", lab.server.name, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
    sh("ip", "-n", lab.server.name, "link", "set", "vsite", "master", "br0", "up")
    sh("ip", "-n", ns.name, "addr", "add", f"{SITE_DHCP_IP}/24", "dev", "eth0")
    sh("ip", "-n", ns.name, "link", "set", "eth0", "up")
    hook = lab.workdir / "site-dhcp-hook"
    token = lab.data_dir / "pxe" / "dhcp-token"
    hook.write_text(
        "#!/bin/sh\n"
        f"exec {sys.executable} -m ktizo --data-dir {lab.data_dir} pxe dhcp-event "
        f'--server {BASE} --token-file {token} "$@"\n'
    )
    hook.chmod(0o755)
    conf = lab.workdir / "site-dhcp.conf"
    conf.write_text(
        "port=0\ninterface=eth0\nbind-interfaces\nlog-facility=-\nlog-dhcp\npid-file=\nno-ping\n"
        f"dhcp-leasefile={lab.workdir / 'site.leases'}\n"
        f"dhcp-script={hook}\n"
        f"dhcp-range={SITE_RANGE[0]},{SITE_RANGE[1]},1h\n"
    )
    proc = lab.start("site-dhcp", ns.argv("dnsmasq", "--keep-in-foreground", f"--conf-file={conf}"))
    wait_for(lambda: "DHCP, IP range" in proc.output(), 10, "the site's DHCP server to start")
    return proc


@pytest.fixture(scope="module")
def proxy_dhcp() -> Iterator[ProxyLab]:
    reason = missing_prerequisites()
    if reason:
        pytest.skip(reason)
    lab = Lab.create()
    try:
        # No --subnet: Ktizo reads br0's address (10.213.0.1/24) and proxies for that subnet.
        # OAuth on: this lab's Ktizo boots Talos with the device flow (console codes).
        ktizo = start_ktizo(lab, ["--mode", "proxy", "--ipv6-ra", "--verbose"], KTIZO_OAUTH_ENABLED="true")
        yield ProxyLab(ktizo, _site_dhcp_server(lab))
    finally:
        lab.close()


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_a_vm_netboots_with_proxy_dhcp_next_to_the_sites_dhcp_server(proxy_dhcp: ProxyLab, firmware: str) -> None:
    if firmware == "uefi" and OVMF is None:
        pytest.skip("OVMF is not installed")
    ktizo = proxy_dhcp.ktizo
    lab = ktizo.lab
    assert "dhcp-range=10.213.0.0,proxy" in (lab.data_dir / "pxe" / "dnsmasq.conf").read_text()
    client = lab.client()
    tap = client.vm_port()
    mac = random_mac()
    serial_log = lab.workdir / f"vm-proxy-{firmware}-serial.log"
    started = time.monotonic()
    vm = lab.start(f"vm-proxy-{firmware}", client.ns.argv(*qemu_argv(firmware, tap, mac, serial_log)))
    encoded = quote(mac, safe="")
    try:

        def asked_for_script() -> bool:
            if vm.popen.poll() is not None:
                raise AssertionError(f"the VM stopped early:\n{Path(serial_log).read_text(errors='replace')}")
            return bool(log_lines(ktizo.serve, rf'"GET /api/v1/boot/ipxe\?mac={re.escape(encoded)}&'))

        wait_for(asked_for_script, 60, f"the {firmware} VM to ask Ktizo for its iPXE script (proxy mode)")
        took = time.monotonic() - started
    finally:
        lab.stop(vm)
    sys.stderr.write(f"\nproxy {firmware}: QEMU start -> iPXE script request {took:.1f} s\n")

    # The address came from the site's server, the boot information from Ktizo's proxy.
    wait_for(lambda: ktizo.device(mac)["lease_ip"], 15, "the site DHCP server's hook to report the lease")
    device = ktizo.device(mac)
    lease_ip = device["lease_ip"]
    last = int(lease_ip.rsplit(".", 1)[1])
    assert SITE_RANGE[0].endswith(".50") and 50 <= last <= 60, lease_ip
    assert device["facts"]["manufacturer"] == "QEMU"
    assert device["facts"]["platform"] == ("pcbios" if firmware == "bios" else "efi")
    proxy_log = ktizo.pxe.output()
    assert re.search(rf"PXE\(br0\) {re.escape(mac)} proxy", proxy_log)
    # The hook logs its outcome after the server answered, so the line may trail the device by a moment.
    wait_for(
        lambda: any(mac in line and "reported add" in line for line in log_lines(proxy_dhcp.site_dhcp, "dhcp-event")),
        10,
        "the dhcp-script's log line",
    )
    if firmware == "uefi":
        assert re.search(rf"sent \S+/tftp/snponly\.efi to {re.escape(lease_ip)}", proxy_log)


def test_talos_oauth_device_flow_gets_the_config_once_the_console_code_is_approved(proxy_dhcp: ProxyLab) -> None:
    """What Talos does when iPXE boots it with talos.config.oauth.*: device code, token polls, then the GET with
    the bearer token (shared/research/talos.md §1.8). The lease comes from the site's DHCP server."""
    ktizo = proxy_dhcp.ktizo
    client = ktizo.lab.client()
    lease = client.dhcp()  # Talos's own DHCP: no PXE options, so only the site's server answers
    assert int(lease["ip"].rsplit(".", 1)[1]) in range(50, 61)
    mac, uuid, serial = client.mac, "8f1e2d3c-4b5a-4697-8877-665544332211", "OAUTH-1"

    script = client.ns.http("GET", f"{BASE}/api/v1/boot/ipxe?mac={quote(mac, safe='')}&arch=x86_64&platform=efi")
    assert "talos.config.oauth.client_id=ktizo" in script.text, script.text
    config = re.search(r"talos\.config=(\S+)", script.text)
    assert config
    config_url = config.group(1).replace("${uuid}", uuid).replace("${serial:uristring}", serial)
    origin = config_url.split("/api/", 1)[0]  # Talos puts /device/code and /token on the config URL's host

    extra = {"mac": mac, "uuid": uuid, "serial": serial}
    started = client.ns.http("POST", f"{origin}/device/code", form={"client_id": "ktizo", **extra})
    assert started.status == 200, started.text
    grant = started.json()
    assert grant["interval"] >= 1 and re.fullmatch(r"[A-Z]{4}-[A-Z]{4}", grant["user_code"])
    poll = {"grant_type": "urn:ietf:params:oauth:grant-type:device_code", "device_code": grant["device_code"],
            "client_id": "ktizo", **extra}  # fmt: skip
    pending = client.ns.http("POST", f"{origin}/token", form=poll)
    assert pending.status == 400 and pending.json()["error"] == "authorization_pending"
    refused = client.ns.http("GET", talos_form(config_url), headers=TALOS_HEADERS)
    assert refused.status in (401, 403), refused.text

    approved = ktizo.api("POST", f"/api/v1/device-codes/{grant['user_code']}/approve", {"role": "worker"})
    assert approved.status == 200 and approved.json()["mac_address"] == mac, approved.text
    time.sleep(grant["interval"])  # a poll sooner than the interval is answered slow_down, as Talos knows
    token = client.ns.http("POST", f"{origin}/token", form=poll)
    assert token.status == 200, token.text
    bearer = token.json()
    assert bearer["token_type"] == "Bearer"
    got = client.ns.http(
        "GET",
        talos_form(config_url),
        headers={**TALOS_HEADERS, "Authorization": f"{bearer['token_type']} {bearer['access_token']}"},
    )
    assert got.status == 200 and "machine:" in got.text
    assert client.ns.http("POST", f"{origin}/token", form=poll).json()["error"] == "invalid_grant"  # used once
