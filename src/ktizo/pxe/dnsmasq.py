"""The dnsmasq configuration Ktizo runs: DHCP (full, or proxyDHCP beside an existing server) and TFTP for iPXE.

Pure: a typed ``DnsmasqConfig`` in, the text of a dnsmasq config file out. Every value that reaches the file is
validated first, because a comma or a newline in the wrong place would be a different dnsmasq option.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ktizo.domain.errors import ValidationFailed


class DhcpMode(enum.StrEnum):
    PROXY = "proxy"  # another server hands out addresses; dnsmasq only adds the boot information
    FULL = "full"  # dnsmasq hands out addresses from a range too


class Firmware(enum.StrEnum):
    BIOS = "bios"
    EFI_X64 = "efi64"
    EFI_ARM64 = "arm64"


# DHCP option 93 (client system architecture, RFC 4578 and the IANA registry) -> the firmware it names.
# 7 is "EFI BC", which every x86-64 UEFI firmware in the field sends; 9 is what the RFC calls x86-64.
CLIENT_ARCH: dict[int, Firmware] = {
    0: Firmware.BIOS,
    7: Firmware.EFI_X64,
    9: Firmware.EFI_X64,
    11: Firmware.EFI_ARM64,
}

# dnsmasq's names for the PXE client system types of --pxe-service (proxy mode answers with a PXE menu).
_PXE_CSA: dict[int, str] = {0: "x86PC", 7: "BC_EFI", 9: "x86-64_EFI", 11: "ARM64_EFI"}

_IFNAME = re.compile(r"[A-Za-z0-9_.:-]{1,15}")
_FILENAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_LEASE = re.compile(r"infinite|\d{1,7}[smhdw]?")
# The BOOTP "file" field is 128 bytes with a terminating NUL; longer names need option overloading,
# which not every PXE ROM understands.
MAX_BOOT_URL = 127


@dataclass(frozen=True)
class BootFiles:
    """Which iPXE build each firmware fetches over TFTP (file names inside the TFTP root); None: not served."""

    bios: str | None = "undionly.kpxe"
    efi_x64: str | None = "snponly.efi"
    efi_arm64: str | None = None

    def for_firmware(self, firmware: Firmware) -> str | None:
        return {Firmware.BIOS: self.bios, Firmware.EFI_X64: self.efi_x64, Firmware.EFI_ARM64: self.efi_arm64}[firmware]


def boot_file_for(files: BootFiles, client_arch: int, *, ipxe: bool, boot_url: str) -> str | None:
    """What the rendered config makes dnsmasq offer a client: the rule in one function, for tests and docs.

    A client that already runs iPXE gets the HTTP URL of ``/boot.ipxe``; offering it iPXE again over TFTP
    would chain-load forever. Others get the iPXE build for their firmware, or nothing for an unknown one."""
    if ipxe:
        return boot_url
    firmware = CLIENT_ARCH.get(client_arch)
    return files.for_firmware(firmware) if firmware is not None else None


@dataclass(frozen=True)
class DhcpRange:
    """A full-DHCP address pool: ``START,END[,LEASE]`` as dnsmasq spells it."""

    start: ipaddress.IPv4Address
    end: ipaddress.IPv4Address
    lease: str = "12h"

    @classmethod
    def parse(cls, text: str) -> DhcpRange:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) not in (2, 3):
            raise ValidationFailed(
                f"{text!r}: a DHCP range is START,END[,LEASE], e.g. 10.0.0.100,10.0.0.200,12h", "range"
            )
        try:
            start, end = ipaddress.IPv4Address(parts[0]), ipaddress.IPv4Address(parts[1])
        except ValueError as exc:
            raise ValidationFailed(f"{text!r}: {exc}", "range") from None
        if end < start:
            raise ValidationFailed(f"{text!r}: the range ends before it starts", "range")
        lease = parts[2] if len(parts) == 3 else cls.lease
        if not _LEASE.fullmatch(lease):
            raise ValidationFailed(f"{lease!r}: a lease time is like 3600, 30m, 12h or infinite", "range")
        return cls(start, end, lease)

    def render(self) -> str:
        return f"{self.start},{self.end},{self.lease}"


@dataclass(frozen=True)
class DnsmasqConfig:
    interfaces: tuple[str, ...]
    mode: DhcpMode
    tftp_root: Path
    boot_url: str  # the HTTP URL of Ktizo's /boot.ipxe, for clients that already run iPXE
    lease_file: Path
    ranges: tuple[DhcpRange, ...] = ()  # full mode: the address pools
    proxy_subnets: tuple[ipaddress.IPv4Network, ...] = ()  # proxy mode: the subnets to add boot information on
    boot_files: BootFiles = field(default_factory=BootFiles)
    dhcp_script: Path | None = None  # run by dnsmasq on every lease change (discovery)
    pid_file: Path | None = None
    router_advertisements: bool = False
    user: str | None = None  # the user dnsmasq drops privileges to (its compiled-in default when None)
    log_dhcp: bool = False

    def validate(self) -> None:
        if not self.interfaces:
            raise ValidationFailed("name the interface dnsmasq serves PXE on (--interface)", "interface")
        for name in self.interfaces:
            if not _IFNAME.fullmatch(name):
                raise ValidationFailed(f"{name!r} is not an interface name", "interface")
        for path in (self.tftp_root, self.lease_file, self.dhcp_script, self.pid_file):
            # dnsmasq changes directory to / at start, so a relative path would point somewhere else.
            if path is not None and (not path.is_absolute() or "\n" in str(path)):
                raise ValidationFailed(f"{str(path)!r}: dnsmasq needs an absolute path", "path")
        _check_boot_url(self.boot_url)
        for file in (self.boot_files.bios, self.boot_files.efi_x64, self.boot_files.efi_arm64):
            if file is not None and not _FILENAME.fullmatch(file):
                raise ValidationFailed(f"{file!r} is not a plain file name in the TFTP root", "boot_files")
        if self.user is not None and not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", self.user):
            raise ValidationFailed(f"{self.user!r} is not a user name", "user")
        if self.mode is DhcpMode.FULL and not self.ranges:
            raise ValidationFailed("full DHCP mode needs an address range (--range START,END[,LEASE])", "range")
        if self.mode is DhcpMode.PROXY and not self.proxy_subnets:
            raise ValidationFailed(
                "proxy mode needs the subnet to serve: give the interface an IPv4 address or pass --subnet", "subnet"
            )


def _check_boot_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationFailed(f"{url!r}: the boot URL must be an http(s) URL of Ktizo's /boot.ipxe", "boot_url")
    if len(url) > MAX_BOOT_URL or re.search(r"[\s,\"'#\\]|[^\x21-\x7e]", url):
        raise ValidationFailed(
            f"{url!r}: a boot URL must be at most {MAX_BOOT_URL} plain characters without commas or quotes",
            "boot_url",
        )


def render(config: DnsmasqConfig) -> str:
    """The dnsmasq config file for ``config`` (validated first)."""
    config.validate()
    lines = [
        "# Written by Ktizo (`ktizo pxe config` prints it, `ktizo pxe run` writes and runs it).",
        "# DNS is off: Ktizo's dnsmasq only does DHCP and TFTP, next to whatever DNS server the site has.",
        "port=0",
    ]
    lines += [f"interface={name}" for name in config.interfaces]
    lines += [
        # Bound to the named interfaces only, so that another DHCP server elsewhere on the host is left alone.
        "bind-interfaces",
        "log-facility=-",
        f"dhcp-leasefile={config.lease_file}",
        f"pid-file={config.pid_file or ''}",
    ]
    if config.user:
        lines.append(f"user={config.user}")
    if config.log_dhcp:
        lines.append("log-dhcp")
    if config.dhcp_script is not None:
        lines.append(f"dhcp-script={config.dhcp_script}")
    lines += ["", "# TFTP: the iPXE builds for firmware that does not speak HTTP yet.", "enable-tftp"]
    lines.append(f"tftp-root={config.tftp_root}")
    lines += ["", "# Address pools" if config.mode is DhcpMode.FULL else "# proxyDHCP: boot information only"]
    if config.mode is DhcpMode.FULL:
        # dnsmasq pings an address before offering it, which delays every PXE boot by about 3 s.
        lines.append("no-ping")
        lines += [f"dhcp-range={r.render()}" for r in config.ranges]
    else:
        lines += [f"dhcp-range={subnet.network_address},proxy" for subnet in config.proxy_subnets]
    if config.router_advertisements:
        lines += [
            "",
            "# IPv6 router advertisements (prefix only, lifetime 0: not a default router). iPXE waits ~16 s",
            "# for one before it reports its network configured; with this it goes on at once.",
            "enable-ra",
        ]
        for name in config.interfaces:
            lines += [f"dhcp-range=::,constructor:{name},ra-only", f"ra-param={name},0,0"]
    lines += _boot_rules(config)
    return "\n".join(lines) + "\n"


def _boot_rules(config: DnsmasqConfig) -> list[str]:
    lines = [
        "",
        "# Who is asking: iPXE (user class or option 175), or firmware of a given architecture (option 93).",
        "dhcp-userclass=set:ipxe,iPXE",
        "dhcp-match=set:ipxe,175",
    ]
    lines += [f"dhcp-match=set:{fw.value},option:client-arch,{code}" for code, fw in CLIENT_ARCH.items()]
    lines += ["", "# iPXE gets Ktizo's script over HTTP; never iPXE again over TFTP, which would loop."]
    lines.append(f"dhcp-boot=tag:ipxe,{config.boot_url}")
    if config.mode is DhcpMode.FULL:
        # iPXE waits ~3 s for a proxyDHCP offer unless told there is none (iPXE setting 176, no-pxedhcp).
        lines.append("dhcp-option-force=tag:ipxe,encap:175,176,1b")
    served = [(fw, config.boot_files.for_firmware(fw)) for fw in Firmware]
    for fw, name in served:
        if name is not None:
            lines.append(f"dhcp-boot=tag:!ipxe,tag:{fw.value},{name}")
    if config.mode is DhcpMode.PROXY:
        # A proxyDHCP server answers PXE clients with a boot menu; one entry per architecture boots at once.
        # iPXE in a NIC's ROM asks the proxy too and takes its file name only from such an entry.
        lines.append("")
        for code, csa in _PXE_CSA.items():
            name = config.boot_files.for_firmware(CLIENT_ARCH[code])
            if name is not None:
                lines.append(f'pxe-service=tag:!ipxe,{csa},"Ktizo: iPXE",{name}')
            lines.append(f'pxe-service=tag:ipxe,{csa},"Ktizo",{config.boot_url}')
    missing = [fw.value for fw, name in served if name is None]
    if missing:
        lines.append(f"# Not served (no iPXE build in the TFTP root): {', '.join(missing)}")
    return lines
