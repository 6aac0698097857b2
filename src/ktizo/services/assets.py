"""Talos boot assets as use cases: fetch from the image factory, import from a directory, list, locate to serve.

Fetching and importing change what every netbooting machine runs, so both are audited."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from ktizo.db import Database
from ktizo.domain.errors import NotFound, ValidationFailed
from ktizo.pxe import assets as store
from ktizo.pxe.assets import ARCHES, NAMES, AssetFile, Stored
from ktizo.services import audit
from ktizo.services.context import Actor

FetchProgress = Callable[[str, int, int | None], None]  # label ("v1.13.0/amd64/vmlinuz"), bytes so far, total


@dataclass(frozen=True)
class AssetSet:
    version: str
    arch: str
    files: dict[str, AssetFile]

    @property
    def complete(self) -> bool:
        return all(name in self.files for name in NAMES)


def missing_message(version: str, arch: str, name: str) -> str:
    return (
        f"Talos {version} {arch} {name} is not in Ktizo's data directory: run "
        f"`ktizo assets fetch --talos-version {version} --arch {arch}` (or `ktizo assets import DIR`)"
    )


def parse_arches(text: str | Sequence[str]) -> list[str]:
    items = text.split(",") if isinstance(text, str) else list(text)
    arches = [store.check_arch(a.strip()) for a in items if a.strip()]
    if not arches:
        raise ValidationFailed("name at least one architecture", "arch")
    return list(dict.fromkeys(arches))


class AssetService:
    def __init__(self, db: Database, assets_dir: Path, factory_url: str) -> None:
        self.db = db
        self.root = assets_dir
        self.factory_url = factory_url

    def locate(self, version: str, arch: str, name: str) -> Path:
        """The file to serve. ``ValidationFailed`` for a malformed request, ``NotFound`` when not stored."""
        path = store.resolve_served(self.root, version, arch, name)
        if path is None:
            raise NotFound(missing_message(version, arch, name))
        return path

    def inventory(self) -> list[AssetSet]:
        sets: dict[tuple[str, str], dict[str, AssetFile]] = {}
        for f in store.scan(self.root):
            sets.setdefault((f.version, f.arch), {})[f.name] = f
        return [AssetSet(v, a, files) for (v, a), files in sets.items()]

    def fetch(
        self,
        actor: Actor,
        version: str,
        arches: Sequence[str] = ARCHES,
        *,
        checksums: dict[str, str] | None = None,
        progress: FetchProgress | None = None,
        client: httpx.Client | None = None,
        timeout: float = 60.0,
    ) -> list[Stored]:
        """Download kernel and initramfs for each architecture from the image factory.

        ``checksums`` maps file names as a ``sha256sum`` listing spells them (``vmlinuz-amd64``, ``kernel-amd64``,
        ``initramfs-amd64.xz``, or plain ``vmlinuz``) to their SHA-256; without one, the size the server
        announces is what is checked."""
        store.check_version(version)
        arches = parse_arches(arches)
        own = client is None
        http = client or httpx.Client(follow_redirects=True, timeout=httpx.Timeout(timeout, connect=15.0))
        stored: list[Stored] = []
        try:
            for arch in arches:
                directory = store.asset_dir(self.root, version, arch)
                for name, url in store.factory_urls(self.factory_url, version, arch).items():
                    expected = _expected(checksums or {}, name, arch)
                    label = f"{version}/{arch}/{name}"
                    report = (lambda done, total, label=label: progress(label, done, total)) if progress else None
                    result = store.download(http, url, directory / name, expected_sha256=expected, progress=report)
                    store.record_sum(directory, name, result.sha256)
                    stored.append(result)
        finally:
            if own:
                http.close()
        self._audit(actor, "asset_fetch", version, stored, {"source": self.factory_url})
        return stored

    def import_dir(self, actor: Actor, source: Path, version: str | None = None) -> list[Stored]:
        """Import from a directory laid out as the factory or a release names the files (``vmlinuz-amd64``,
        ``kernel-amd64``, ``initramfs-amd64.xz``, needs ``version``), as ``<arch>/{vmlinuz,initramfs.xz}`` (needs
        ``version``), or as another Ktizo's ``[talos/]<version>/<arch>/…``. A ``SHA256SUMS`` or ``sha256sum.txt``
        found beside the files is checked."""
        if not source.is_dir():
            raise ValidationFailed(f"{source} is not a directory", "source")
        if version is not None:
            store.check_version(version)
        plan = _import_plan(source, version)
        if not plan:
            wanted = "vmlinuz-amd64/initramfs-amd64.xz, amd64/vmlinuz, or <version>/<arch>/vmlinuz"
            hint = "" if version else " (flat layouts need --talos-version)"
            raise NotFound(f"no Talos boot assets in {source}: expected {wanted}{hint}")
        stored: list[Stored] = []
        by_version: dict[str, list[Stored]] = {}
        for ver, arch, name, path in plan:
            sums = {**store.read_sums(path.parent), **_read_sha256sum_txt(path.parent)}
            directory = store.asset_dir(self.root, ver, arch)
            result = store.import_file(path, directory / name, expected_sha256=sums.get(path.name))
            store.record_sum(directory, name, result.sha256)
            stored.append(result)
            by_version.setdefault(ver, []).append(result)
        for ver, files in by_version.items():
            self._audit(actor, "asset_import", ver, files, {"source": str(source)})
        return stored

    def _audit(self, actor: Actor, action: str, version: str, files: list[Stored], extra: dict[str, str]) -> None:
        details = {
            "version": version,
            "files": {str(f.path.relative_to(self.root)): f.sha256 for f in files},
            **extra,
        }
        with self.db.write() as s:
            audit.record(s, actor, action, details=details)


def _expected(checksums: dict[str, str], name: str, arch: str) -> str | None:
    for candidate in (*store.source_names(name, arch), name):
        if candidate in checksums:
            return checksums[candidate].lower()
    return None


def _read_sha256sum_txt(directory: Path) -> dict[str, str]:
    try:
        return store.parse_sums((directory / "sha256sum.txt").read_text())
    except OSError:
        return {}


def _import_plan(source: Path, version: str | None) -> list[tuple[str, str, str, Path]]:
    plan: list[tuple[str, str, str, Path]] = []
    if version is not None:
        for arch in ARCHES:
            for name in NAMES:
                flat = [source / n for n in store.source_names(name, arch)]
                found = next((p for p in [*flat, source / arch / name] if p.is_file()), None)
                if found is not None:
                    plan.append((version, arch, name, found))
        if plan:
            return plan
    tree = source / "talos" if (source / "talos").is_dir() else source
    for f in store.scan_versions(tree):
        if version is None or f.version == version:
            plan.append((f.version, f.arch, f.name, f.path))
    return plan
