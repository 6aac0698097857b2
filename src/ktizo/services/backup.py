"""Backup and restore of one Ktizo installation: the database and the data directory beside it.

On SQLite the database is copied with SQLite's online backup API, which is safe while ``ktizo serve`` writes (WAL:
the copy is one consistent snapshot, and the server is never blocked). On PostgreSQL nothing is dumped here: the
operator runs ``pg_dump`` (printed exactly), and the data directory's files are still copied.

A backup directory holds ``MANIFEST.json`` (Ktizo's version, the database's schema revision, the time, every
file's SHA-256), ``ktizo.db`` on SQLite, and the data directory's other files under ``data/``. What is left out:
the boot assets (large, fetched again with ``ktizo assets fetch``) unless asked for, ``pxe/`` (dnsmasq's state,
remade by ``ktizo pxe run``), and a secret key file kept inside the data directory (a backup beside its key seals
nothing). Restoring checks every SHA-256 before it writes anything, then upgrades the schema to this release's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import URL, make_url

from ktizo import __version__
from ktizo.db import Database, migrate
from ktizo.domain.errors import Conflict, ValidationFailed
from ktizo.services.schema import display_url, sqlite_file
from ktizo.settings import Settings

MANIFEST = "MANIFEST.json"
DATABASE_FILE = "ktizo.db"
DATA = "data"
PG_DUMP = "ktizo.pgdump"
FORMAT = 1
# The database's own files, never copied as files (the backup API copies the database).
_DATABASE_SUFFIXES = ("", "-wal", "-shm", "-journal")


@dataclass
class BackupResult:
    directory: Path
    dialect: str
    schema_revision: str | None
    files: list[str]
    skipped: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)  # what the operator still runs (PostgreSQL)


@dataclass
class RestoreResult:
    data_dir: Path
    dialect: str
    backup_revision: str | None
    files: list[str]
    revision_before: str | None = None
    revision_after: str | None = None
    commands: list[str] = field(default_factory=list)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _private_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out, source.open("rb") as src:
        shutil.copyfileobj(src, out, 1024 * 1024)
    os.chmod(target, 0o600)


def _inside(path: Path | None, directory: Path) -> bool:
    if path is None:
        return False
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


def _data_files(settings: Settings, *, with_assets: bool, database: Path | None) -> tuple[list[Path], list[str]]:
    """The data directory's files to back up (relative paths), and what is left out and why."""
    root = settings.data_dir
    skipped: list[str] = []
    if not root.is_dir():
        return [], skipped
    excluded_dirs = {root / "pxe": "pxe/ (dnsmasq's state, remade by `ktizo pxe run`)"}
    if not with_assets:
        excluded_dirs[settings.assets_dir] = "assets/ (boot assets: --with-assets, or `ktizo assets fetch` again)"
    database_files = {Path(f"{database}{suffix}").resolve() for suffix in _DATABASE_SUFFIXES} if database else set()
    key_file = settings.secret_key_file.resolve() if settings.secret_key_file else None
    found: list[Path] = []

    def walk(directory: Path) -> Iterator[Path]:
        for entry in sorted(directory.iterdir()):
            if entry.is_symlink():
                skipped.append(f"{entry.relative_to(root)} (a symbolic link)")
            elif entry.is_dir():
                if entry in excluded_dirs:
                    if any(entry.iterdir()):
                        skipped.append(excluded_dirs[entry])
                    continue
                yield from walk(entry)
            elif entry.is_file():
                yield entry

    for path in walk(root):
        resolved = path.resolve()
        if resolved in database_files:
            continue
        if key_file is not None and resolved == key_file:
            skipped.append(f"{path.relative_to(root)} (the secret key file: keep it apart from the backup)")
            continue
        found.append(path.relative_to(root))
    return found, skipped


def _libpq_url(url: str) -> str:
    """The URL for pg_dump/pg_restore (libpq's spelling: no SQLAlchemy driver, no password)."""
    parsed = make_url(url)
    bare = URL.create(
        "postgresql",
        username=parsed.username,
        host=parsed.host,
        port=parsed.port,
        database=parsed.database,
        query=parsed.query,
    )
    return bare.render_as_string(hide_password=False)


def backup(settings: Settings, directory: Path, *, force: bool = False, with_assets: bool = False) -> BackupResult:
    directory = directory.expanduser().resolve()
    if directory.exists() and not directory.is_dir():
        raise ValidationFailed(f"{directory} is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise Conflict(f"{directory} is not empty: pick an empty directory, or pass --force to write over it")
    if _inside(directory, settings.data_dir):
        raise ValidationFailed(f"{directory} is inside the data directory {settings.data_dir}: back up elsewhere")
    url = settings.effective_database_url
    dialect = make_url(url).get_backend_name()
    database = sqlite_file(url) if dialect == "sqlite" else None
    if dialect == "sqlite" and (database is None or not database.is_file()):
        raise ValidationFailed(f"there is no SQLite database to back up at {database or display_url(url)}")
    if dialect not in ("sqlite", "postgresql"):
        raise ValidationFailed(f"cannot back up a {dialect} database")

    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    if force:
        for stale in (directory / MANIFEST, directory / DATABASE_FILE):
            stale.unlink(missing_ok=True)
        shutil.rmtree(directory / DATA, ignore_errors=True)
    files: dict[str, str] = {}
    revision: str | None = None
    commands: list[str] = []
    if database is not None:
        target = directory / DATABASE_FILE
        _online_copy(database, target)
        revision = _sqlite_revision(target)
        files[DATABASE_FILE] = _sha256(target)
    else:
        db = Database(url)
        try:
            revision = migrate.current_revision(db)
        finally:
            db.dispose()
        dump = directory / PG_DUMP
        commands.append(f"pg_dump --format=custom --no-owner --file={dump} '{_libpq_url(url)}'")

    relative, skipped = _data_files(settings, with_assets=with_assets, database=database)
    for rel in relative:
        target = directory / DATA / rel
        _private_copy(settings.data_dir / rel, target)
        files[f"{DATA}/{rel.as_posix()}"] = _sha256(target)

    manifest = {
        "format": FORMAT,
        "ktizo_version": __version__,
        "database": dialect,
        "schema_revision": revision,
        "schema_head": migrate.head_revision(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "files": [{"path": path, "sha256": digest} for path, digest in sorted(files.items())],
    }
    fd = os.open(directory / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return BackupResult(directory, dialect, revision, sorted(files), skipped, commands)


def _online_copy(source: Path, target: Path) -> None:
    """SQLite's backup API in one step: a read transaction on the source (WAL: writers go on), the pages copied
    into a fresh file, which is then made a single self-contained file (no -wal) and checked."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    src = sqlite3.connect(source, timeout=60)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")
        problems = dst.execute("PRAGMA integrity_check").fetchall()
        if problems != [("ok",)]:
            raise ValidationFailed(f"the backup copy fails SQLite's integrity check: {problems[:3]}")
    finally:
        dst.close()
        src.close()
    os.chmod(target, 0o600)


def _sqlite_revision(path: Path) -> str | None:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        has = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='alembic_version'").fetchone()
        if not has:
            return None
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        return str(row[0]) if row else None
    finally:
        conn.close()


def read_manifest(directory: Path) -> dict[str, object]:
    """The backup's manifest, after checking every file it lists against its SHA-256 (and that nothing escapes
    the backup directory)."""
    path = directory / MANIFEST
    if not path.is_file():
        raise ValidationFailed(f"{directory} holds no {MANIFEST}: not a Ktizo backup")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValidationFailed(f"{path} cannot be read: {exc}") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), list)
    ):
        raise ValidationFailed(f"{path} is not a manifest this Ktizo reads (format {FORMAT})")
    root = directory.resolve()
    for entry in manifest["files"]:
        rel = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(rel, str) or not _inside(root / rel, root) or Path(rel).is_absolute():
            raise ValidationFailed(f"{path}: a file entry outside the backup: {entry!r}")
        file = root / rel
        if not file.is_file():
            raise ValidationFailed(f"the backup is missing {rel}")
        if _sha256(file) != entry.get("sha256"):
            raise ValidationFailed(f"{rel} does not match its SHA-256 in {MANIFEST}: the backup was changed or damaged")
    return manifest


def restore(settings: Settings, directory: Path, *, force: bool = False) -> RestoreResult:
    directory = directory.expanduser().resolve()
    manifest = read_manifest(directory)
    entries = [str(e["path"]) for e in manifest["files"]]  # type: ignore[attr-defined]
    backed_up = str(manifest.get("database"))
    url = settings.effective_database_url
    dialect = make_url(url).get_backend_name()
    if backed_up != dialect:
        raise ValidationFailed(f"this backup holds a {backed_up} installation; the target database is {dialect}")
    revision = manifest.get("schema_revision")
    revision = str(revision) if revision is not None else None
    if revision is not None and revision not in migrate.known_revisions():
        raise ValidationFailed(
            f"the backup's schema revision {revision} is newer than this Ktizo knows (its head is "
            f"{migrate.head_revision()}): restore it with Ktizo {manifest.get('ktizo_version')} or later"
        )
    database = sqlite_file(url) if dialect == "sqlite" else None
    if dialect == "sqlite":
        if database is None:
            raise ValidationFailed(f"cannot restore into {display_url(url)}")
        if DATABASE_FILE not in entries:
            raise ValidationFailed(f"the backup holds no {DATABASE_FILE}")
        existing = [Path(f"{database}{s}") for s in _DATABASE_SUFFIXES if Path(f"{database}{s}").exists()]
        if existing and not force:
            raise Conflict(
                f"there is already a database at {database}: restore into an empty data directory, or pass --force "
                "to replace it (stop `ktizo serve` first)"
            )
    data_dir = settings.data_dir
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    restored: list[str] = []
    for rel in entries:
        if not rel.startswith(f"{DATA}/"):
            continue
        target = data_dir / rel.removeprefix(f"{DATA}/")
        if not _inside(target, data_dir):
            raise ValidationFailed(f"{rel} would land outside the data directory")
        _private_copy(directory / rel, target)
        restored.append(rel)
    result = RestoreResult(data_dir, dialect, revision, restored)
    if database is not None:
        for suffix in _DATABASE_SUFFIXES:
            Path(f"{database}{suffix}").unlink(missing_ok=True)
        _private_copy(directory / DATABASE_FILE, database)
        restored.append(DATABASE_FILE)
        db = Database(url)
        try:
            result.revision_before = migrate.current_revision(db)
            migrate.upgrade(db)
            result.revision_after = migrate.current_revision(db)
        finally:
            db.dispose()
    else:
        dump = directory / PG_DUMP
        result.commands.append(
            f"pg_restore --clean --if-exists --no-owner --dbname='{_libpq_url(url)}' {dump}",
        )
        result.commands.append("ktizo db upgrade")
    return result
