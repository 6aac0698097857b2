"""The iPXE door: the entry script DHCP points at, and the per-machine script that decides what a machine boots.

The machine's facts arrive through first contact like at every other door; the Talos release booted is the newest
imported one of the cluster's Talos version, the same version its config is rendered for."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import cast
from urllib.parse import quote

from sqlalchemy.orm import Session

from ktizo.db import Database
from ktizo.domain.devices import DeviceStatus, Source
from ktizo.domain.errors import TooManyAttempts, ValidationFailed
from ktizo.domain.identity import is_placeholder, normalize_ip, normalize_mac, normalize_serial, normalize_uuid
from ktizo.services.boot import BootService
from ktizo.services.download_log import Batcher
from ktizo.services.first_contact import FirstContact, Knock, NewMachine, Registered
from ktizo.services.render import ConfigSource

log = logging.getLogger(__name__)
_ARCH = {"x86_64": "amd64", "i386": "amd64", "amd64": "amd64", "arm64": "arm64", "aarch64": "arm64"}
_FACT = re.compile(r"[A-Za-z0-9 ._,()\[\]/+#-]{1,64}")  # Lenovo: "ThinkSystem SR650 -[7X06CTO1WW]-"
_ARCH_NAME = re.compile(r"[a-z0-9_]{1,16}")
_SAFE_URL = re.compile(r"[A-Za-z0-9:/._%?=&\[\]-]+")
# What Talos needs on the kernel command line (shared/research/talos.md §1.7) plus consoles for both worlds.
KERNEL_ARGS = "talos.platform=metal console=tty0 console=ttyS0 init_on_alloc=1 slab_nomerge pti=on printk.devkmsg=on"


@dataclass(frozen=True)
class BootFacts:
    """What iPXE reports about the machine, validated; None where unknown."""

    mac: str
    uuid: str | None = None
    serial: str | None = None
    manufacturer: str | None = None
    product: str | None = None
    arch: str | None = None  # iPXE's ${buildarch}
    platform: str | None = None  # pcbios | efi
    ip: str | None = None

    def as_facts(self) -> dict[str, str]:
        names = ("manufacturer", "product", "arch", "platform", "ip")
        return {n if n != "ip" else "ipxe_ip": getattr(self, n) for n in names if getattr(self, n)}


def fact(value: str | None) -> str | None:
    """A free-text fact: kept only if it is short printable text (it is shown to operators, never scripted)."""
    if value is None or is_placeholder(value):
        return None
    text = value.strip()
    return text if _FACT.fullmatch(text) else None


def parse_boot_facts(query: dict[str, str]) -> BootFacts:
    mac = query.get("mac")
    if mac is None or is_placeholder(mac):
        raise ValidationFailed("iPXE sent no MAC address", "mac")
    uuid = query.get("uuid")
    serial = query.get("serial")
    ip = query.get("ip")
    try:
        ip_value = normalize_ip(ip, "ip") if ip and not is_placeholder(ip) else None
    except ValidationFailed:
        ip_value = None
    try:
        serial_value = normalize_serial(serial) if serial and not is_placeholder(serial) else None
    except ValidationFailed:
        serial_value = None
    arch = query.get("arch")
    platform = query.get("platform")
    return BootFacts(
        mac=normalize_mac(mac, "mac"),
        uuid=normalize_uuid(uuid) if uuid and not is_placeholder(uuid) else None,
        serial=serial_value if serial_value and _FACT.fullmatch(serial_value) else None,
        manufacturer=fact(query.get("manufacturer")),
        product=fact(query.get("product")),
        # Keep any sane architecture name iPXE reports: one Talos has no build for must be refused, not booted.
        arch=arch if arch and _ARCH_NAME.fullmatch(arch) else None,
        platform=platform if platform in ("pcbios", "efi") else None,
        ip=ip_value,
    )


def script_url(url: str) -> str:
    # Everything that reaches an iPXE script line is built from validated parts; this is the last guard.
    if not _SAFE_URL.fullmatch(url):
        raise ValidationFailed("refusing to put an unsafe URL into an iPXE script", "public_url")
    return url


class IpxeService:
    def __init__(
        self,
        db: Database,
        first_contact: FirstContact,
        source: ConfigSource,
        *,
        assets_dir: Path,
        oauth_enabled: bool = False,
        oauth_client_id: str = "ktizo",
        boot: BootService | None = None,
    ) -> None:
        self.db = db
        self.first_contact = first_contact
        self.source = source
        self.assets_dir = assets_dir
        self.oauth_enabled = oauth_enabled
        self.oauth_client_id = oauth_client_id
        self.boot = boot
        self._releases: tuple[tuple[str, int], str] | None = None
        # A storm's new machines registered together: one transaction of a few statements per batch.
        self.arrivals: Batcher[NewMachine] = Batcher(db, first_contact.register_all)

    @staticmethod
    def entry_script(base_url: str) -> str:
        """``/boot.ipxe``: what DHCP points iPXE at. It chains to the per-machine script with what iPXE knows."""
        base = script_url(base_url.rstrip("/"))
        query = (
            "mac=${net0/mac}&uuid=${uuid}&serial=${serial:uristring}&manufacturer=${manufacturer:uristring}"
            "&product=${product:uristring}&arch=${buildarch}&platform=${platform}&ip=${net0/ip}"
        )
        return (
            "#!ipxe\n"
            "# Ktizo: hand this machine's identity to Ktizo, which decides what it boots.\n"
            f"chain --autofree {base}/api/v1/boot/ipxe?{query} || goto failed\n"
            ":failed\n"
            "echo Ktizo could not be reached; trying the next boot device in 10 seconds.\n"
            "sleep 10\n"
            "exit 1\n"
        )

    def talos_release(self) -> str:
        """The newest imported Talos release of the cluster's Talos version (e.g. v1.13.9 for v1.13): what the
        machine's config is rendered for is what it boots."""
        minor = str(self.source.snapshot().talos_version)
        root = self.assets_dir / "talos"
        try:
            key = (minor, root.stat().st_mtime_ns)  # a release imported or removed changes the directory
        except FileNotFoundError:
            return f"{minor}.0"
        cached = self._releases
        if cached is not None and cached[0] == key:
            return cached[1]
        candidates = []
        for entry in root.iterdir():
            m = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)", entry.name)
            if m and entry.name.startswith(minor + "."):
                candidates.append((int(m.group(3)), entry.name))
        release = max(candidates)[1] if candidates else f"{minor}.0"
        self._releases = (key, release)
        return release

    def machine_script(self, facts: BootFacts, base_url: str, source_ip: str | None) -> str:
        """The per-machine decision: boot Talos, or leave the network boot (rejected or installed)."""
        quiet = self.quiet_script(facts, base_url, source_ip)
        if quiet is not None:
            return quiet
        status, installed = self._record_boot(facts, source_ip)
        return self._script(status, installed, facts, base_url)

    def quiet_script(self, facts: BootFacts, base_url: str, source_ip: str | None) -> str | None:
        """``machine_script`` from one read, for a machine whose knock changes nothing (a boot storm's machines
        retrying); None when the knock must go through first contact's write."""
        device = self.boot.quiet(self._knock(facts, source_ip)) if self.boot is not None else None
        if device is None:
            return None
        return self._script(DeviceStatus(device.status), device.installed_at is not None, facts, base_url)

    async def new_machine_script(self, facts: BootFacts, base_url: str, source_ip: str | None) -> str | None:
        """``machine_script`` for a machine nobody knows yet, registered in a batch with the others arriving at the
        same moment (``FirstContact.register_all``); None when the batch left it to ``machine_script``."""
        machine = NewMachine(self._knock(facts, source_ip))
        try:
            await self.arrivals.record(machine)
        except Exception:  # the batch rolled back: first contact one by one still registers each machine
            log.warning("a batch of new machines was not registered; registering them one by one", exc_info=True)
            return None
        if machine.outcome is Registered.LEFT:
            return None
        # Registered now, or over its address's budget: then booted unrecorded, as ``_record_boot`` says why.
        return self._script(DeviceStatus.PENDING, False, facts, base_url)

    def _script(self, status: DeviceStatus, installed: bool, facts: BootFacts, base_url: str) -> str:
        if status is DeviceStatus.REJECTED:
            return (
                "#!ipxe\n"
                "echo Ktizo: this machine was rejected by an operator. Booting the next device.\n"
                "sleep 5\n"
                "exit 1\n"
            )
        if installed:
            return "#!ipxe\necho Ktizo: Talos is installed on this machine; booting from disk.\nexit 0\n"
        arch = _ARCH.get(facts.arch or "x86_64")
        if arch is None:
            return (
                "#!ipxe\n"
                "echo Ktizo: Talos has no build for this machine's architecture (amd64 and arm64 only).\n"
                "sleep 10\n"
                "exit 1\n"
            )
        base = script_url(base_url.rstrip("/"))
        version = self.talos_release()
        assets = f"{base}/assets/talos/{version}/{arch}"
        # iPXE expands ${...} itself and has no escape, so the MAC it booted from is written out already
        # expanded; uuid and serial are left for iPXE to fill in (the same SMBIOS values Talos would use).
        config = script_url(f"{base}/api/v1/config/download?mac={quote(facts.mac, safe='')}")
        args = f"{KERNEL_ARGS} initrd=initramfs.xz talos.config={config}&uuid=${{uuid}}&serial=${{serial:uristring}}"
        if self.oauth_enabled:
            args += (
                f" talos.config.oauth.client_id={self.oauth_client_id}"
                " talos.config.oauth.extra_variable=mac talos.config.oauth.extra_variable=uuid"
                " talos.config.oauth.extra_variable=serial"
            )
        return (
            "#!ipxe\n"
            f"echo Ktizo: booting Talos {version} ({arch}); this machine is {status.value}.\n"
            f"kernel {assets}/vmlinuz {args} || goto failed\n"
            f"initrd {assets}/initramfs.xz || goto failed\n"
            "boot || goto failed\n"
            ":failed\n"
            "echo Ktizo: could not load Talos; is `ktizo assets fetch` done? Retrying in 30 seconds.\n"
            "sleep 30\n"
            "reboot\n"
        )

    @staticmethod
    def _knock(facts: BootFacts, source_ip: str | None) -> Knock:
        return Knock(
            door=Source.IPXE,
            mac=facts.mac,
            uuid=facts.uuid,
            serial=facts.serial,
            source_ip=source_ip,
            facts=facts.as_facts(),
        )

    def _record_boot(self, facts: BootFacts, source_ip: str | None) -> tuple[DeviceStatus, bool]:
        knock = self._knock(facts, source_ip)

        def arrive(s: Session) -> tuple[DeviceStatus, bool]:
            arrival = self.first_contact.arrive(s, knock)
            return DeviceStatus(arrival.device.status), arrival.device.installed_at is not None

        try:
            # Through group commit: a storm's knocks share transactions instead of queueing for SQLite's one
            # writer one by one. The script waits for the commit (a rule may approve the machine on arrival).
            return cast(tuple[DeviceStatus, bool], self.db.submit(arrive).result())
        except TooManyAttempts:
            # Boot it all the same, unrecorded: Talos's config request registers it once this address is within
            # its budget again (Talos retries), and nothing secret is in an iPXE script.
            return DeviceStatus.PENDING, False
