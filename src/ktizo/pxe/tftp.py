"""The TFTP root dnsmasq serves: iPXE builds from Debian's ``ipxe`` package, one per firmware kind."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ktizo.pxe.dnsmasq import BootFiles, Firmware

IPXE_DIR = Path("/usr/lib/ipxe")


@dataclass(frozen=True)
class IpxeBuild:
    name: str  # the file name in the TFTP root, which is what DHCP offers
    firmware: Firmware
    candidates: tuple[str, ...]  # where distributions put it, relative to the iPXE directory, best first


# Debian's ``ipxe`` ships undionly.kpxe (BIOS: uses the firmware's own PXE/UNDI driver), ipxe.efi (all of iPXE's
# NIC drivers) and snponly.efi (drives the NIC through UEFI's SNP: the NIC the firmware booted from, which is why
# it is the default). Bookworm has no arm64 build; newer packages or an operator may provide one under these names.
BUILDS: tuple[IpxeBuild, ...] = (
    IpxeBuild("undionly.kpxe", Firmware.BIOS, ("undionly.kpxe",)),
    IpxeBuild("snponly.efi", Firmware.EFI_X64, ("snponly.efi", "x86_64-efi/snponly.efi")),
    IpxeBuild("ipxe.efi", Firmware.EFI_X64, ("ipxe.efi", "x86_64-efi/ipxe.efi")),
    IpxeBuild(
        "ipxe-arm64.efi",
        Firmware.EFI_ARM64,
        ("arm64-efi/snponly.efi", "arm64-efi/ipxe.efi", "ipxe-arm64.efi", "snponly-arm64.efi"),
    ),
)


class IpxeMissing(RuntimeError):
    """No iPXE build to serve at all."""


@dataclass(frozen=True)
class TftpRoot:
    path: Path
    files: dict[str, Path]  # name in the root -> where it came from
    boot_files: BootFiles


def find_builds(source_dir: Path = IPXE_DIR, root: Path | None = None) -> dict[str, Path]:
    """The iPXE builds there are to serve: name in the TFTP root -> the file it comes from. A build that only
    exists in ``root`` (an operator put their own there, e.g. an arm64 one) is served as it is."""
    found: dict[str, Path] = {}
    for build in BUILDS:
        source = next((source_dir / c for c in build.candidates if (source_dir / c).is_file()), None)
        if source is not None:
            found[build.name] = source
        elif root is not None and (root / build.name).is_file():
            found[build.name] = root / build.name
    return found


def boot_files(names: Iterable[str], *, efi_x64: str = "snponly.efi") -> BootFiles:
    """Which of ``names`` each firmware gets; ``efi_x64`` picks snponly.efi or ipxe.efi when both are there."""
    present = set(names)

    def pick(firmware: Firmware, preferred: str | None = None) -> str | None:
        candidates = [b.name for b in BUILDS if b.firmware is firmware and b.name in present]
        if preferred in candidates:
            return preferred
        return candidates[0] if candidates else None

    return BootFiles(
        bios=pick(Firmware.BIOS), efi_x64=pick(Firmware.EFI_X64, efi_x64), efi_arm64=pick(Firmware.EFI_ARM64)
    )


def prepare_tftp_root(root: Path, source_dir: Path = IPXE_DIR, *, efi_x64: str = "snponly.efi") -> TftpRoot:
    """Copy the iPXE builds found in ``source_dir`` into ``root`` (only what changed)."""
    found = find_builds(source_dir, root)
    if not found:
        raise IpxeMissing(f"no iPXE builds in {source_dir}: install Debian's ipxe package (apt-get install ipxe)")
    root.mkdir(parents=True, exist_ok=True)
    # dnsmasq reads TFTP files after dropping its privileges: the root must be readable by everyone.
    root.chmod(0o755)
    for name, source in found.items():
        if source.parent != root:
            _install(source, root / name)
    return TftpRoot(root, found, boot_files(found, efi_x64=efi_x64))


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _install(source: Path, target: Path) -> None:
    if target.is_file() and target.stat().st_size == source.stat().st_size and _digest(target) == _digest(source):
        return
    tmp = target.with_name(f".{target.name}.tmp")
    with source.open("rb") as src, tmp.open("wb") as dst:
        for block in iter(lambda: src.read(1 << 20), b""):
            dst.write(block)
    tmp.chmod(0o644)
    os.replace(tmp, target)  # a TFTP transfer in progress keeps reading the old file


def unreachable_for(path: Path, uid: int, gid: int) -> Path | None:
    """The first directory on the way to ``path`` that user ``uid``/group ``gid`` cannot enter, or None.

    dnsmasq opens TFTP files as its unprivileged user, so a data directory under a 0700 home (/root) makes
    every transfer fail with "permission denied"; better to say so before the first machine boots."""
    current = Path(path.anchor)
    for part in path.parts[1:]:
        current = current / part
        try:
            st = current.stat()
        except FileNotFoundError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            break
        if st.st_uid == uid:
            allowed = st.st_mode & stat.S_IXUSR
        elif st.st_gid == gid:
            allowed = st.st_mode & stat.S_IXGRP
        else:
            allowed = st.st_mode & stat.S_IXOTH
        if not allowed:
            return current
    return None
