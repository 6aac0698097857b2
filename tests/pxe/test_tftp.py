"""The TFTP root: iPXE builds copied from the package, one per firmware, readable by dnsmasq's user."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from ktizo.pxe.dnsmasq import BootFiles
from ktizo.pxe.tftp import IPXE_DIR, IpxeMissing, prepare_tftp_root, unreachable_for


def _fake_ipxe(tmp_path: Path, *names: str) -> Path:
    source = tmp_path / "ipxe"
    for name in names:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(name.encode() * 10)
    return source


def test_copies_builds_and_maps_firmware(tmp_path: Path) -> None:
    source = _fake_ipxe(tmp_path, "undionly.kpxe", "ipxe.efi", "snponly.efi", "arm64-efi/snponly.efi")
    root = tmp_path / "tftp"
    tftp = prepare_tftp_root(root, source)
    assert tftp.boot_files == BootFiles("undionly.kpxe", "snponly.efi", "ipxe-arm64.efi")
    assert (root / "ipxe-arm64.efi").read_bytes() == b"arm64-efi/snponly.efi" * 10
    assert oct(root.stat().st_mode & 0o777) == "0o755"
    assert all(oct(p.stat().st_mode & 0o777) == "0o644" for p in root.iterdir())
    assert prepare_tftp_root(root, source, efi_x64="ipxe.efi").boot_files.efi_x64 == "ipxe.efi"


def test_unchanged_files_are_left_alone_and_changed_ones_replaced(tmp_path: Path) -> None:
    source = _fake_ipxe(tmp_path, "undionly.kpxe")
    root = tmp_path / "tftp"
    prepare_tftp_root(root, source)
    before = (root / "undionly.kpxe").stat().st_ino
    prepare_tftp_root(root, source)
    assert (root / "undionly.kpxe").stat().st_ino == before
    (source / "undionly.kpxe").write_bytes(b"new build")
    prepare_tftp_root(root, source)
    assert (root / "undionly.kpxe").read_bytes() == b"new build"


def test_an_operators_own_arm64_build_is_served(tmp_path: Path) -> None:
    source = _fake_ipxe(tmp_path, "undionly.kpxe")
    root = tmp_path / "tftp"
    root.mkdir()
    (root / "ipxe-arm64.efi").write_bytes(b"built by hand")
    assert prepare_tftp_root(root, source).boot_files.efi_arm64 == "ipxe-arm64.efi"


def test_no_ipxe_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(IpxeMissing, match="apt-get install ipxe"):
        prepare_tftp_root(tmp_path / "tftp", tmp_path / "nothing")


@pytest.mark.skipif(not (IPXE_DIR / "undionly.kpxe").exists(), reason="Debian's ipxe is not installed")
def test_debians_package(tmp_path: Path) -> None:
    files = prepare_tftp_root(tmp_path / "tftp", IPXE_DIR).boot_files
    assert files.bios == "undionly.kpxe" and files.efi_x64 == "snponly.efi"


def test_unreachable_for_finds_the_closed_directory() -> None:
    # pytest's own tmp_path sits below a 0700 directory, which is exactly what this looks for: use /tmp.
    base = Path(tempfile.mkdtemp(prefix="ktizo-tftp-"))
    try:
        base.chmod(0o755)
        closed = base / "home"
        target = closed / "data" / "pxe" / "tftp"
        target.mkdir(parents=True)
        closed.chmod(0o700)
        nobody = 65534
        assert unreachable_for(target, nobody, nobody) == closed
        assert unreachable_for(target, os.getuid(), os.getgid()) is None  # the owner may enter
        closed.chmod(0o711)
        assert unreachable_for(target, nobody, nobody) is None
    finally:
        shutil.rmtree(base)
