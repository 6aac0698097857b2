"""Writing files so that a crash at any instant leaves either the old content or the new, never half of either.

Every write goes to a temp file in the target's own directory (a rename never crosses file systems), created
with O_EXCL so nothing else can be sitting there, chmod-ed explicitly so the umask has no say, fsync-ed, then
``os.replace``-d over the target and the directory fsync-ed so the rename itself survives a power cut. Temp
names (``.NAME.tmp-<16 hex>``) are recognisable so the next run can sweep up what a crash left behind."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_TEMP = re.compile(r"\.(?P<name>.+)\.tmp-[0-9a-f]{16}")
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{secrets.token_hex(8)}")


def ensure_dir(path: Path, mode: int = 0o700) -> None:
    """Create ``path`` (and parents) with ``mode`` exactly if it is missing; an existing directory is left as is."""
    if path.is_dir():
        if path.stat().st_mode & 0o022:
            log.warning("%s is writable by group or others: anyone who can write there can swap the files", path)
        return
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    os.chmod(path, mode)  # mkdir's mode went through the umask


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_fd(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, _CREATE, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(target: Path, data: bytes, mode: int, *, keep_prev: bool = False) -> None:
    """Replace ``target`` with ``data`` at ``mode``; with ``keep_prev`` the old file stays as ``NAME.prev``."""
    tmp = temp_name(target)
    try:
        _write_fd(tmp, data, mode)
        if keep_prev and target.exists():
            prev = target.with_name(target.name + ".prev")
            with contextlib.suppress(FileNotFoundError):
                prev.unlink()
            # A hard link, not a copy: the target never goes missing, and .prev keeps the old inode's mode.
            os.link(target, prev)
        os.replace(tmp, target)
    except Exception:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


def write_new(target: Path, data: bytes, mode: int) -> None:
    """Write a file that must not exist yet, in place (no rename): for records whose absence is the safe state."""
    try:
        _write_fd(target, data, mode)
    except Exception:
        with contextlib.suppress(OSError):
            target.unlink()
        raise
    fsync_dir(target.parent)


def clean_stale_temps(directory: Path, names: Iterable[str]) -> list[Path]:
    """Remove temp files an interrupted write of one of ``names`` left in ``directory``. Call it under the lock
    that guards those writes, or it could pull a temp from under a live writer."""
    wanted = set(names)
    removed = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        match = _TEMP.fullmatch(entry.name)
        if match and match["name"] in wanted and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
                log.info("removed %s, left by an interrupted write", entry.path)
    return removed


def remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


@contextlib.contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_file`` (a sibling of what it guards: the guarded file itself is replaced,
    so a lock on it would be a lock on an inode nobody looks at any more)."""
    ensure_dir(lock_file.parent)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock
