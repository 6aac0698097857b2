"""A local git repository driven through the ``git`` command: explicit argv, never a shell, no prompts, no hooks,
no signing, every call with a timeout."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

COMMITTER = ("Ktizo", "ktizo@ktizo")
# Whatever the user's or the system's git configuration says, a commit here runs no hook, asks for no key.
_FIXED = (
    "-c", "core.hooksPath=/dev/null",
    "-c", "commit.gpgSign=false",
    "-c", "core.autocrlf=false",
    "-c", "core.quotePath=false",
)  # fmt: skip
_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)
_AUTHOR_UNSAFE = re.compile(r"[<>\x00-\x1f\x7f]")
_EMAIL_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


class GitError(Exception):
    """A git command failed (or timed out); the message never carries a remote's credentials."""


def redact(text: str) -> str:
    """A URL's user and password (``https://user:token@host/…``) replaced by ``***``."""
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", text)


@dataclass(frozen=True)
class Author:
    name: str
    email: str

    @classmethod
    def of(cls, actor: str) -> Author:
        """``alice`` -> ``alice <alice@ktizo>``; ``rule:web`` -> ``rule:web <rule-web@ktizo>``."""
        name = _AUTHOR_UNSAFE.sub("", actor).strip() or "unknown"
        local = _EMAIL_UNSAFE.sub("-", name).strip("-.") or "unknown"
        return cls(name=name, email=f"{local}@ktizo")


class Repo:
    """The work tree at ``path`` on ``branch``. ``ensure()`` makes it a repository (``git init``) when the path is
    missing or empty, and refuses a non-empty directory that is not one."""

    def __init__(self, path: Path, *, branch: str = "main", timeout: float = 30.0) -> None:
        self.path = path
        self.branch = branch
        self.timeout = timeout

    # -- plumbing ------------------------------------------------------------------------------------

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_") or k in ("GIT_SSH_COMMAND", "GIT_SSH")}
        env.update(
            GIT_TERMINAL_PROMPT="0",
            GIT_COMMITTER_NAME=COMMITTER[0],
            GIT_COMMITTER_EMAIL=COMMITTER[1],
            LC_ALL="C",
        )
        env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
        env.update(extra or {})
        return env

    def git(
        self,
        *args: str,
        input: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        argv = ["git", *_FIXED, *args]
        try:
            done = subprocess.run(  # noqa: S603 - explicit argv, no shell
                argv,
                cwd=self.path,
                input=input,
                capture_output=True,
                text=True,
                env=self._env(env),
                timeout=timeout or self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise GitError(f"git {args[0]} timed out after {timeout or self.timeout:g} s") from None
        except FileNotFoundError:
            raise GitError("the git command is not installed") from None
        if check and done.returncode != 0:
            lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            first = [line for line in lines if line.startswith(("fatal:", "error:", "!"))] or lines
            raise GitError(redact(f"git {args[0]} failed: " + " / ".join(first[:3])))
        return done

    # -- the repository ------------------------------------------------------------------------------

    def ensure(self) -> None:
        if (self.path / ".git").exists():
            return
        if self.path.exists() and any(self.path.iterdir()):
            raise GitError(f"{self.path} is neither a git repository nor empty: Ktizo will not write into it")
        self.path.mkdir(parents=True, exist_ok=True)
        self.git("init", "--quiet", f"--initial-branch={self.branch}")

    def head(self) -> str | None:
        done = self.git("rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False)
        if done.returncode != 0:
            return None
        return done.stdout.strip() or None

    def files(self, folders: Sequence[str]) -> Iterator[str]:
        """The ``.yaml`` files under these folders of the work tree, relative to it."""
        for folder in folders:
            root = self.path / folder
            if root.is_dir():
                for file in sorted(root.glob("*.yaml")):
                    yield f"{folder}/{file.name}"

    def read(self, rel: str) -> str | None:
        try:
            return (self.path / rel).read_text()
        except FileNotFoundError:
            return None

    def write(self, rel: str, text: str) -> bool:
        """Write the file if its text differs; True when it did."""
        target = self.path / rel
        if self.read(rel) == text:
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        tmp.replace(target)
        return True

    def remove(self, rel: str) -> bool:
        try:
            (self.path / rel).unlink()
        except FileNotFoundError:
            return False
        return True

    def changes(self, folders: Sequence[str]) -> list[str]:
        """``git status --porcelain`` of these folders: ``A path``, ``M path``, ``D path``, ``R old -> new``."""
        present = [f for f in folders if (self.path / f).exists()]
        missing = [f for f in folders if f not in present]
        if present:
            self.git("add", "--all", "--", *present)
        if missing:  # a folder removed by hand: its files are gone from the next commit too
            self.git("rm", "-r", "--cached", "--quiet", "--ignore-unmatch", "--", *missing)
        out = self.git("status", "--porcelain", "--untracked-files=all", "--", *folders).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def commit(
        self, message: str, author: Author, folders: Sequence[str], *, when: dt.datetime | None = None
    ) -> str | None:
        """Stage the folders and commit them when something changed; the new commit, or None."""
        if not self.changes(folders):
            return None
        env = {"GIT_AUTHOR_NAME": author.name, "GIT_AUTHOR_EMAIL": author.email}
        if when is not None:
            env["GIT_AUTHOR_DATE"] = when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S+0000")
        self.git("commit", "--quiet", "--no-verify", "--cleanup=verbatim", "--file=-", input=message, env=env)
        return self.head()

    def count(self, since: str | None, until: str | None) -> int | None:
        """Commits in ``until`` that ``since`` lacks (all of them when ``since`` is None)."""
        if until is None:
            return 0
        spec = until if since is None else f"{since}..{until}"
        done = self.git("rev-list", "--count", spec, check=False)
        return int(done.stdout.strip()) if done.returncode == 0 else None

    # -- the remote ----------------------------------------------------------------------------------

    def push(self, remote: str) -> None:
        """Push HEAD to the remote's branch (a fast-forward only: never forced)."""
        self.git("push", "--quiet", "--porcelain", remote, f"HEAD:refs/heads/{self.branch}")

    def fast_forward(self, remote: str) -> bool:
        """Bring the branch up to the remote's when the remote is ahead (another replica wrote); True if it moved."""
        done = self.git("fetch", "--quiet", remote, f"refs/heads/{self.branch}", check=False)
        if done.returncode != 0:
            return False
        theirs = self.git("rev-parse", "--verify", "--quiet", "FETCH_HEAD^{commit}", check=False).stdout.strip()
        ours = self.head()
        if not theirs or theirs == ours:
            return False
        if ours is not None:
            ahead = self.git("merge-base", "--is-ancestor", ours, theirs, check=False)
            if ahead.returncode != 0:
                return False
        self.git("reset", "--quiet", "--hard", theirs)
        return True
