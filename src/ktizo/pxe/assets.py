"""Talos boot assets on disk: names, validation, download from the image factory, import from a directory.

Layout under the assets directory: ``talos/<version>/<arch>/{vmlinuz,initramfs.xz}`` with a ``SHA256SUMS`` file
beside them. A file only ever appears there complete: downloads go to ``<name>.part`` (kept for resuming with a
Range request when the connection drops) and are renamed into place after the size and checksum checks.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from ktizo.domain.errors import ValidationFailed

ARCHES = ("amd64", "arm64")
NAMES = ("vmlinuz", "initramfs.xz")
SUMS = "SHA256SUMS"
_VERSION = re.compile(r"v\d{1,3}\.\d{1,3}\.\d{1,3}(?:-(?:alpha|beta|rc)\.\d{1,3})?")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20

Progress = Callable[[int, int | None], None]  # bytes so far, total (None when the server does not say)


class AssetError(RuntimeError):
    """A download or import that did not produce a verified file."""


class IncompleteDownload(AssetError):
    """The connection ended early; the partial file is kept and the next fetch resumes it."""


def check_version(version: str) -> str:
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise ValidationFailed(f"{version[:40]!r} is not a Talos release version like v1.13.0", "version")
    return version


def check_arch(arch: str) -> str:
    if arch not in ARCHES:
        raise ValidationFailed(f"{arch[:40]!r} is not an architecture Talos ships ({', '.join(ARCHES)})", "arch")
    return arch


def check_name(name: str) -> str:
    if name not in NAMES:
        raise ValidationFailed(f"{name[:40]!r} is not a boot asset ({', '.join(NAMES)})", "name")
    return name


def asset_dir(root: Path, version: str, arch: str) -> Path:
    return root / "talos" / check_version(version) / check_arch(arch)


def factory_urls(base_url: str, version: str, arch: str) -> dict[str, str]:
    """The image factory's URLs for one release and architecture (``base_url`` names the schematic)."""
    base = base_url.rstrip("/") + f"/{check_version(version)}"
    check_arch(arch)
    return {"vmlinuz": f"{base}/kernel-{arch}", "initramfs.xz": f"{base}/initramfs-{arch}.xz"}


# Names the same files go by elsewhere: the factory (kernel-amd64), Talos's GitHub releases (vmlinuz-amd64).
def source_names(name: str, arch: str) -> tuple[str, ...]:
    if name == "vmlinuz":
        return (f"vmlinuz-{arch}", f"kernel-{arch}")
    return (f"initramfs-{arch}.xz",)


def parse_sums(text: str) -> dict[str, str]:
    """``sha256sum`` output (``HEX  NAME`` or ``HEX *NAME``) -> {base name: hex}."""
    sums: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2 and _SHA256.fullmatch(parts[0].lower()):
            sums[Path(parts[1].lstrip("*")).name] = parts[0].lower()
    return sums


def read_sums(directory: Path) -> dict[str, str]:
    try:
        return parse_sums((directory / SUMS).read_text())
    except OSError:
        return {}


def record_sum(directory: Path, name: str, sha256: str) -> None:
    sums = read_sums(directory)
    sums[name] = sha256
    text = "".join(f"{digest}  {n}\n" for n, digest in sorted(sums.items()))
    _atomic_write(directory / SUMS, text.encode())


@dataclass(frozen=True)
class Stored:
    path: Path
    size: int
    sha256: str
    resumed_from: int = 0  # bytes that were already there from an interrupted download


def download(
    client: httpx.Client,
    url: str,
    target: Path,
    *,
    expected_sha256: str | None = None,
    progress: Progress | None = None,
) -> Stored:
    """Fetch ``url`` into ``target`` via ``target.part``: resumes a partial file with Range/If-Range, checks the size
    the server announced and ``expected_sha256`` if given, then renames atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    validator_file = target.with_name(target.name + ".part.validator")
    have = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}  # sizes and checksums are of the bytes on the wire
    validator = _read_text(validator_file) if have else None
    if have:
        headers["Range"] = f"bytes={have}-"
        if validator:
            # If the file changed on the server since the partial download, send it whole instead of a range.
            headers["If-Range"] = validator
    try:
        with client.stream("GET", url, headers=headers) as response:
            start, total = _plan(response, have)
            if response.status_code == 416:
                if total is not None and have == total:
                    return _finish(part, target, validator_file, total, expected_sha256, resumed_from=have)
                part.unlink(missing_ok=True)  # the partial file is longer than the file now is: start over
                validator_file.unlink(missing_ok=True)
                return download(client, url, target, expected_sha256=expected_sha256, progress=progress)
            new_validator = response.headers.get("etag") or response.headers.get("last-modified")
            if new_validator and not new_validator.startswith("W/"):
                validator_file.write_text(new_validator)
            with part.open("r+b" if start else "wb") as out:
                out.seek(start)
                out.truncate()
                done = start
                if progress:
                    progress(done, total)
                for chunk in response.iter_raw():  # as it arrives: a chunk buffer would lose bytes on a drop
                    out.write(chunk)
                    done += len(chunk)
                    if total is not None and done > total:
                        break
                    if progress:
                        progress(done, total)
                out.flush()
                os.fsync(out.fileno())
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        # Nothing was transferred: no name resolution, no route, or nobody listening. Resuming is not the point.
        host = httpx.URL(url).host
        raise AssetError(
            f"{url}: cannot reach {host} ({exc}). Without internet access on this machine, download the files "
            "elsewhere and bring them in with `ktizo assets import DIR`, or point KTIZO_ASSETS_BASE_URL (or "
            "--base-url) at a mirror you can reach"
        ) from exc
    except (httpx.TransportError, httpx.StreamError) as exc:
        got = part.stat().st_size if part.exists() else 0
        raise IncompleteDownload(
            f"{url}: the transfer broke off after {got} bytes ({exc}); run the fetch again to resume"
        ) from exc
    size = part.stat().st_size
    if total is not None and size < total:
        raise IncompleteDownload(f"{url}: got {size} of {total} bytes; run the fetch again to resume")
    return _finish(part, target, validator_file, total, expected_sha256, resumed_from=start)


def _plan(response: httpx.Response, have: int) -> tuple[int, int | None]:
    """Where the body starts in the file, and the file's total size, from the status and headers."""
    status = response.status_code
    content_range = response.headers.get("content-range", "")
    if status == 206:
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range.strip())
        if not m or int(m.group(1)) != have:
            raise AssetError(f"{response.url}: the server answered a different range ({content_range!r})")
        return have, None if m.group(3) == "*" else int(m.group(3))
    if status == 416:
        m = re.fullmatch(r"bytes \*/(\d+)", content_range.strip())
        return have, int(m.group(1)) if m else None
    if status == 200:
        length = response.headers.get("content-length")
        return 0, int(length) if length and length.isdecimal() else None
    if status == 404:
        raise AssetError(f"{response.url}: not found (HTTP 404): check the Talos version and the factory URL")
    raise AssetError(f"{response.url}: HTTP {status}")


def _finish(
    part: Path, target: Path, validator_file: Path, total: int | None, expected: str | None, *, resumed_from: int
) -> Stored:
    size = part.stat().st_size
    if total is not None and size != total:
        part.unlink()
        validator_file.unlink(missing_ok=True)
        raise AssetError(f"{target.name}: size mismatch: {size} bytes where the server announced {total}; discarded")
    digest = sha256_file(part)
    if expected is not None and digest != expected.lower():
        part.unlink()
        validator_file.unlink(missing_ok=True)
        raise AssetError(f"{target.name}: checksum mismatch: sha256 {digest}, expected {expected}; discarded")
    part.chmod(0o644)
    os.replace(part, target)
    _fsync_dir(target.parent)
    validator_file.unlink(missing_ok=True)
    return Stored(target, size, digest, resumed_from)


def import_file(source: Path, target: Path, *, expected_sha256: str | None = None) -> Stored:
    """Copy ``source`` to ``target`` through a temporary file, verifying ``expected_sha256`` if given."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.import")
    h = hashlib.sha256()
    try:
        with source.open("rb") as src, tmp.open("wb") as dst:
            for block in iter(lambda: src.read(_CHUNK), b""):
                h.update(block)
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
        digest = h.hexdigest()
        if expected_sha256 is not None and digest != expected_sha256.lower():
            raise AssetError(f"{source}: checksum mismatch: sha256 {digest}, expected {expected_sha256}")
        tmp.chmod(0o644)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return Stored(target, target.stat().st_size, digest)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class AssetFile:
    version: str
    arch: str
    name: str
    path: Path
    size: int
    sha256: str | None  # from SHA256SUMS, as recorded when it was stored


def scan(root: Path) -> Iterator[AssetFile]:
    """Every complete asset under ``root`` (the assets directory), ordered by version, arch, name."""
    return scan_versions(root / "talos")


def scan_versions(talos: Path) -> Iterator[AssetFile]:
    """Every complete asset in ``talos/<version>/<arch>/``."""
    if not talos.is_dir():
        return
    for version_dir in sorted(p for p in talos.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name)):
        for arch in ARCHES:
            directory = version_dir / arch
            sums = read_sums(directory)
            for name in NAMES:
                path = directory / name
                if path.is_file() and not path.is_symlink():
                    yield AssetFile(version_dir.name, arch, name, path, path.stat().st_size, sums.get(name))


def resolve_served(root: Path, version: str, arch: str, name: str) -> Path | None:
    """The file to serve for a validated request, or None. Refuses anything whose real path leaves ``root``
    (a symlink planted in the tree), and anything that is not a regular file."""
    path = asset_dir(root, version, arch) / check_name(name)
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not real.is_relative_to(root.resolve()) or not real.is_file():
        return None
    return real


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
