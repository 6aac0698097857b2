"""Talos boot assets: download from a stand-in image factory (resume, size and checksum checks, atomic rename),
import from a directory, and the CLI around both."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from ktizo.cli import app
from ktizo.db.models import AuditEvent
from ktizo.domain.errors import NotFound, ValidationFailed
from ktizo.pxe import assets as store
from ktizo.services.assets import AssetService
from ktizo.services.context import Actor
from ktizo.services.registry import Services
from ktizo.settings import Settings
from tests.pxe.conftest import Factory

V = "v1.13.0"
KERNEL = os.urandom(300_000)
INITRAMFS = os.urandom(500_000)


def _publish(factory: Factory, arch: str = "amd64") -> None:
    factory.files[f"/image/schematic0/{V}/kernel-{arch}"] = KERNEL
    factory.files[f"/image/schematic0/{V}/initramfs-{arch}.xz"] = INITRAMFS


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_resumes_an_interrupted_transfer_with_range(factory: Factory, tmp_path: Path) -> None:
    _publish(factory)
    url = f"{factory.url}/{V}/kernel-amd64"
    target = tmp_path / "vmlinuz"
    factory.cut_after["/image/schematic0/v1.13.0/kernel-amd64"] = 100_000
    seen: list[tuple[int, int | None]] = []
    with httpx.Client() as client:
        with pytest.raises(store.IncompleteDownload, match="run the fetch again to resume"):
            store.download(client, url, target)
        assert not target.exists(), "a partial download must never appear under the real name"
        part = tmp_path / "vmlinuz.part"
        assert part.stat().st_size == 100_000

        result = store.download(client, url, target, progress=lambda done, total: seen.append((done, total)))

    assert factory.requests[-1][1] == "bytes=100000-"
    assert result.resumed_from == 100_000
    assert target.read_bytes() == KERNEL
    assert result.sha256 == _sha(KERNEL) and result.size == len(KERNEL)
    assert not part.exists() and not (tmp_path / "vmlinuz.part.validator").exists()
    assert seen[0] == (100_000, len(KERNEL)) and seen[-1] == (len(KERNEL), len(KERNEL))


def test_a_changed_file_on_the_server_restarts_the_download(factory: Factory, tmp_path: Path) -> None:
    _publish(factory)
    path = f"/image/schematic0/{V}/kernel-amd64"
    factory.cut_after[path] = 50_000
    with httpx.Client() as client:
        with pytest.raises(store.IncompleteDownload):
            store.download(client, factory.url + path.removeprefix("/image/schematic0"), tmp_path / "vmlinuz")
        factory.files[path] = b"new release" * 1000  # its ETag changes, so If-Range makes the server send it all
        result = store.download(client, factory.url + path.removeprefix("/image/schematic0"), tmp_path / "vmlinuz")
    assert result.resumed_from == 0
    assert (tmp_path / "vmlinuz").read_bytes() == b"new release" * 1000


def test_size_mismatch_is_refused_and_nothing_is_installed(factory: Factory, tmp_path: Path) -> None:
    _publish(factory)
    path = f"/image/schematic0/{V}/kernel-amd64"
    factory.cut_after[path] = 1000
    factory.lie_total[path] = len(KERNEL) + 5  # the resumed answer claims a bigger file than it sends
    url = factory.url + path.removeprefix("/image/schematic0")
    with httpx.Client() as client:
        with pytest.raises(store.IncompleteDownload):
            store.download(client, url, tmp_path / "vmlinuz")
        with pytest.raises(store.IncompleteDownload, match=f"got {len(KERNEL)} of {len(KERNEL) + 5}"):
            store.download(client, url, tmp_path / "vmlinuz")
    assert not (tmp_path / "vmlinuz").exists()


def test_partial_file_longer_than_the_remote_file_is_discarded(factory: Factory, tmp_path: Path) -> None:
    _publish(factory)
    (tmp_path / "vmlinuz.part").write_bytes(b"x" * (len(KERNEL) + 10))
    with httpx.Client() as client:
        result = store.download(client, f"{factory.url}/{V}/kernel-amd64", tmp_path / "vmlinuz")
    assert result.sha256 == _sha(KERNEL)


def test_checksum_mismatch_is_refused_and_the_file_in_service_stays(factory: Factory, tmp_path: Path) -> None:
    _publish(factory)
    (tmp_path / "vmlinuz").write_bytes(b"the kernel machines boot today")
    with httpx.Client() as client, pytest.raises(store.AssetError, match="checksum mismatch"):
        store.download(client, f"{factory.url}/{V}/kernel-amd64", tmp_path / "vmlinuz", expected_sha256="0" * 64)
    assert (tmp_path / "vmlinuz").read_bytes() == b"the kernel machines boot today"
    assert not (tmp_path / "vmlinuz.part").exists()


def test_missing_release_says_so(factory: Factory, tmp_path: Path) -> None:
    with httpx.Client() as client, pytest.raises(store.AssetError, match="404"):
        store.download(client, f"{factory.url}/v9.9.9/kernel-amd64", tmp_path / "vmlinuz")


@pytest.mark.parametrize("version", ["1.13.0", "v1.13", "v1.13.0/../x", "v1.13.0\n", "latest", "v1.13.0-evil.1"])
def test_version_is_validated(version: str) -> None:
    with pytest.raises(ValidationFailed):
        store.check_version(version)


def test_service_fetch_lays_files_out_records_sums_and_audits(
    factory: Factory, settings: Settings, services: Services
) -> None:
    _publish(factory, "amd64")
    _publish(factory, "arm64")
    service = AssetService(services.db, settings.assets_dir, factory.url)
    sums = {"kernel-amd64": _sha(KERNEL), "initramfs-arm64.xz": _sha(INITRAMFS)}
    stored = service.fetch(Actor.cli(), V, ["amd64", "arm64"], checksums=sums)
    assert len(stored) == 4
    for arch in ("amd64", "arm64"):
        directory = settings.assets_dir / "talos" / V / arch
        assert (directory / "vmlinuz").read_bytes() == KERNEL
        assert store.read_sums(directory) == {"vmlinuz": _sha(KERNEL), "initramfs.xz": _sha(INITRAMFS)}
    (listed,) = [s for s in service.inventory() if s.arch == "amd64"]
    assert listed.complete and listed.files["vmlinuz"].sha256 == _sha(KERNEL)
    with services.db.read() as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "asset_fetch")).one()
    assert event.actor == "cli" and event.details["version"] == V
    assert event.details["files"][f"talos/{V}/amd64/vmlinuz"] == _sha(KERNEL)
    assert service.locate(V, "amd64", "vmlinuz").read_bytes() == KERNEL
    with pytest.raises(NotFound, match=r"ktizo assets fetch --talos-version v1\.12\.0"):
        service.locate("v1.12.0", "amd64", "vmlinuz")
    with pytest.raises(ValidationFailed):
        service.locate(V, "amd64", "../../ktizo.db")


def test_import_flat_release_layout_checks_sha256sum_txt(
    tmp_path: Path, settings: Settings, services: Services
) -> None:
    src = tmp_path / "release"
    src.mkdir()
    (src / "vmlinuz-amd64").write_bytes(KERNEL)
    (src / "initramfs-amd64.xz").write_bytes(INITRAMFS)
    (src / "sha256sum.txt").write_text(f"{_sha(KERNEL)}  vmlinuz-amd64\n{_sha(INITRAMFS)}  initramfs-amd64.xz\n")
    service = AssetService(services.db, settings.assets_dir, "http://unused")
    with pytest.raises(NotFound, match="--talos-version"):
        service.import_dir(Actor.cli(), src)
    stored = service.import_dir(Actor.cli(), src, V)
    assert {f.path.name for f in stored} == {"vmlinuz", "initramfs.xz"}
    assert (settings.assets_dir / "talos" / V / "amd64" / "initramfs.xz").read_bytes() == INITRAMFS

    (src / "sha256sum.txt").write_text(f"{'0' * 64}  vmlinuz-amd64\n")
    with pytest.raises(store.AssetError, match="checksum mismatch"):
        service.import_dir(Actor.cli(), src, "v1.13.1")
    assert not (settings.assets_dir / "talos" / "v1.13.1" / "amd64" / "vmlinuz").exists()


def test_import_a_tree_from_another_ktizo(tmp_path: Path, settings: Settings, services: Services) -> None:
    other = tmp_path / "other" / "talos" / "v1.12.4" / "arm64"
    other.mkdir(parents=True)
    (other / "vmlinuz").write_bytes(b"k")
    (other / "initramfs.xz").write_bytes(b"i")
    service = AssetService(services.db, settings.assets_dir, "http://unused")
    stored = service.import_dir(Actor.cli(), tmp_path / "other")
    assert sorted(str(f.path.relative_to(settings.assets_dir)) for f in stored) == [
        "talos/v1.12.4/arm64/initramfs.xz",
        "talos/v1.12.4/arm64/vmlinuz",
    ]
    with services.db.read() as s:
        assert s.scalars(select(AuditEvent.action).where(AuditEvent.action == "asset_import")).all()


@pytest.fixture
def cli(settings: Settings, services: Services):  # type: ignore[no-untyped-def]
    runner = CliRunner()
    env = {"KTIZO_DATA_DIR": str(settings.data_dir), "KTIZO_DATABASE_URL": settings.effective_database_url}

    def run(*args: str, code: int = 0):  # type: ignore[no-untyped-def]
        result = runner.invoke(app, list(args), env=env)
        assert result.exit_code == code, result.output
        return result

    return run


def test_cli_fetch_shows_progress_resumes_and_lists(cli, factory: Factory, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    _publish(factory)
    factory.cut_after[f"/image/schematic0/{V}/initramfs-amd64.xz"] = 200_000
    failed = cli("assets", "fetch", "--talos-version", V, "--arch", "amd64", "--base-url", factory.url, code=1)
    assert "run the fetch again to resume" in failed.output
    done = cli("assets", "fetch", "--talos-version", V, "--arch", "amd64", "--base-url", factory.url)
    assert f"{V}/amd64/initramfs.xz" in done.output  # the progress bar's label
    assert "resumed at 200000 bytes" in done.output
    assert (settings.assets_dir / "talos" / V / "amd64" / "initramfs.xz").read_bytes() == INITRAMFS

    listed = json.loads(cli("assets", "list", "--json").stdout)
    assert listed == [
        {
            "version": V,
            "arch": "amd64",
            "complete": True,
            "files": {
                "vmlinuz": {"size": len(KERNEL), "sha256": _sha(KERNEL)},
                "initramfs.xz": {"size": len(INITRAMFS), "sha256": _sha(INITRAMFS)},
            },
        }
    ]
    assert "v1.13.0  amd64" in cli("assets", "list").output
    bad = cli("assets", "fetch", "--talos-version", "1.13", "--base-url", factory.url, code=2)
    assert "is not a Talos release version" in bad.output


def test_cli_import(cli, tmp_path: Path, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "usb" / "amd64"
    src.mkdir(parents=True)
    (src / "vmlinuz").write_bytes(KERNEL)
    (src / "initramfs.xz").write_bytes(INITRAMFS)
    out = cli("assets", "import", str(tmp_path / "usb"), "--talos-version", V).output
    assert f"talos/{V}/amd64/vmlinuz" in out
    assert "no boot assets" not in cli("assets", "list").output
