"""The dnsmasq configuration: full and proxy mode, boot file per client architecture, iPXE to HTTP, validation.

Each rendered config is also checked by the real dnsmasq (``--test``) when it is installed."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest

from ktizo.domain.errors import ValidationFailed
from ktizo.pxe.dnsmasq import (
    CLIENT_ARCH,
    BootFiles,
    DhcpMode,
    DhcpRange,
    DnsmasqConfig,
    Firmware,
    boot_file_for,
    render,
)

URL = "http://10.0.0.1:8000/boot.ipxe"


def _config(mode: DhcpMode = DhcpMode.FULL, **over: object) -> DnsmasqConfig:
    values: dict[str, object] = {
        "interfaces": ("pxe0",),
        "mode": mode,
        "tftp_root": Path("/var/lib/ktizo/pxe/tftp"),
        "boot_url": URL,
        "lease_file": Path("/var/lib/ktizo/pxe/dnsmasq.leases"),
        "ranges": (DhcpRange.parse("10.0.0.100,10.0.0.200,1h"),) if mode is DhcpMode.FULL else (),
        "proxy_subnets": (ipaddress.IPv4Network("10.0.0.0/24"),) if mode is DhcpMode.PROXY else (),
        "dhcp_script": Path("/var/lib/ktizo/pxe/dhcp-event"),
        "pid_file": Path("/var/lib/ktizo/pxe/dnsmasq.pid"),
    }
    values.update(over)
    return DnsmasqConfig(**values)  # type: ignore[arg-type]


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def _dnsmasq_accepts(text: str, tmp_path: Path) -> None:
    binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    if not Path(binary).exists():
        pytest.skip("dnsmasq is not installed")
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text(text)
    result = subprocess.run([binary, "--test", f"--conf-file={conf}"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "syntax check OK" in result.stderr, result.stderr


def test_full_mode(tmp_path: Path) -> None:
    text = render(_config(router_advertisements=True, log_dhcp=True))
    lines = _lines(text)
    for expected in (
        "port=0",  # no DNS server
        "interface=pxe0",
        "bind-interfaces",
        "log-facility=-",
        "no-ping",
        "dhcp-range=10.0.0.100,10.0.0.200,1h",
        "enable-tftp",
        "tftp-root=/var/lib/ktizo/pxe/tftp",
        "dhcp-leasefile=/var/lib/ktizo/pxe/dnsmasq.leases",
        "dhcp-script=/var/lib/ktizo/pxe/dhcp-event",
        "pid-file=/var/lib/ktizo/pxe/dnsmasq.pid",
        "log-dhcp",
        "enable-ra",
        "dhcp-range=::,constructor:pxe0,ra-only",
        "ra-param=pxe0,0,0",
        "dhcp-userclass=set:ipxe,iPXE",
        "dhcp-match=set:ipxe,175",
        "dhcp-option-force=tag:ipxe,encap:175,176,1b",
        f"dhcp-boot=tag:ipxe,{URL}",
        "dhcp-boot=tag:!ipxe,tag:bios,undionly.kpxe",
        "dhcp-boot=tag:!ipxe,tag:efi64,snponly.efi",
    ):
        assert expected in lines, expected
    assert not any(line.startswith("pxe-service") for line in lines)
    assert "# Not served (no iPXE build in the TFTP root): arm64" in text
    _dnsmasq_accepts(text, tmp_path)


def test_proxy_mode(tmp_path: Path) -> None:
    text = render(_config(DhcpMode.PROXY, boot_files=BootFiles(efi_arm64="ipxe-arm64.efi")))
    lines = _lines(text)
    assert "dhcp-range=10.0.0.0,proxy" in lines
    assert not any(line.startswith(("no-ping", "dhcp-option-force")) for line in lines)
    assert 'pxe-service=tag:!ipxe,x86PC,"Ktizo: iPXE",undionly.kpxe' in lines
    assert 'pxe-service=tag:!ipxe,BC_EFI,"Ktizo: iPXE",snponly.efi' in lines
    assert 'pxe-service=tag:!ipxe,x86-64_EFI,"Ktizo: iPXE",snponly.efi' in lines
    assert 'pxe-service=tag:!ipxe,ARM64_EFI,"Ktizo: iPXE",ipxe-arm64.efi' in lines
    # iPXE in a NIC ROM asking the proxy: its menu entry is the HTTP URL, so it never loads iPXE again.
    for csa in ("x86PC", "BC_EFI", "x86-64_EFI", "ARM64_EFI"):
        assert f'pxe-service=tag:ipxe,{csa},"Ktizo",{URL}' in lines
    assert "dhcp-boot=tag:!ipxe,tag:arm64,ipxe-arm64.efi" in lines
    assert f"dhcp-boot=tag:ipxe,{URL}" in lines
    assert "Not served" not in text
    _dnsmasq_accepts(text, tmp_path)


def test_every_boot_rule_excludes_ipxe_so_it_never_chainloads_itself() -> None:
    for mode in DhcpMode:
        for line in _lines(render(_config(mode))):
            if line.startswith(("dhcp-boot=", "pxe-service=")) and URL not in line:
                assert "tag:!ipxe" in line, line


@pytest.mark.parametrize(
    ("arch", "firmware", "expected"),
    [
        (0, Firmware.BIOS, "undionly.kpxe"),
        (7, Firmware.EFI_X64, "snponly.efi"),
        (9, Firmware.EFI_X64, "snponly.efi"),
        (11, Firmware.EFI_ARM64, None),
        (6, None, None),  # IA32 UEFI: Talos has no build, so nothing is offered
    ],
)
def test_option_93_picks_the_boot_file(arch: int, firmware: Firmware | None, expected: str | None) -> None:
    assert CLIENT_ARCH.get(arch) is firmware
    files = BootFiles()
    assert boot_file_for(files, arch, ipxe=False, boot_url=URL) == expected
    assert boot_file_for(files, arch, ipxe=True, boot_url=URL) == URL
    assert boot_file_for(BootFiles(efi_x64="ipxe.efi"), 7, ipxe=False, boot_url=URL) == "ipxe.efi"
    text = render(_config())
    if firmware is not None:
        assert f"dhcp-match=set:{firmware.value},option:client-arch,{arch}" in text


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"interfaces": ()}, "interface"),
        ({"interfaces": ("eth0\ndhcp-script=/tmp/x",)}, "interface"),
        ({"interfaces": ("a" * 16,)}, "interface"),
        ({"boot_url": "http://10.0.0.1/boot.ipxe,evil"}, "boot_url"),
        ({"boot_url": "http://10.0.0.1/boot.ipxe\nenable-tftp"}, "boot_url"),
        ({"boot_url": "tftp://10.0.0.1/x"}, "boot_url"),
        ({"boot_url": "http://10.0.0.1/" + "a" * 120}, "boot_url"),
        ({"tftp_root": Path("relative/tftp")}, "path"),
        ({"lease_file": Path("/tmp/x\nport=53")}, "path"),
        ({"boot_files": BootFiles(bios="../../etc/shadow")}, "boot_files"),
        ({"user": "root\nuser=x"}, "user"),
        ({"ranges": ()}, "range"),
    ],
)
def test_values_that_would_change_the_config_are_refused(override: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        render(_config(**override))
    assert caught.value.field == field


def test_proxy_mode_needs_a_subnet() -> None:
    with pytest.raises(ValidationFailed, match="--subnet"):
        render(_config(DhcpMode.PROXY, proxy_subnets=()))


@pytest.mark.parametrize("text", ["10.0.0.1", "10.0.0.9,10.0.0.1", "a,b", "10.0.0.1,10.0.0.2,12x", "1,2,3,4"])
def test_bad_ranges(text: str) -> None:
    with pytest.raises(ValidationFailed):
        DhcpRange.parse(text)


def test_range_default_lease() -> None:
    assert DhcpRange.parse(" 10.0.0.1 , 10.0.0.2 ").render() == "10.0.0.1,10.0.0.2,12h"
    assert DhcpRange.parse("10.0.0.1,10.0.0.2,infinite").lease == "infinite"
