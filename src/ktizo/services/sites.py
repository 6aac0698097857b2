"""Sites and their enrollment keys (seed 004): a site's agents enroll with its ``cek_`` key, with no operator in the
loop when the site's policy is ``auto-approve``.

A key is ``cek_`` + base64url of 32 random bytes, shown once; at rest only its Argon2id hash, a version that only
grows, and a fingerprint ``vN (XXXX)`` (the first four hex digits, upper case, of the whole key's SHA-256). Exactly
one key per site is active, held by a partial unique index; a rotation deactivates the old key and inserts the next
in one transaction, so the old key is refused from that commit on."""

from __future__ import annotations

import builtins
import datetime as dt
import functools
import hashlib
import re
import secrets
import threading
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ktizo.db import Database
from ktizo.db.models import Device, Site, SiteKey
from ktizo.db.types import utcnow
from ktizo.domain.errors import Conflict, NotFound, ValidationFailed
from ktizo.domain.users import UserRole
from ktizo.services import audit
from ktizo.services.context import Actor

KEY_PREFIX = "cek_"
KEY_BYTES = 32
POLICIES = ("auto-approve", "manual")
_CODE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_hasher = PasswordHasher()  # Argon2id, RFC 9106's low-memory profile (64 MiB)


@functools.cache
def _dummy_hash() -> str:
    """What an unknown site's key is checked against: the same work, so a miss cannot be told from a wrong key."""
    return _hasher.hash(KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES))


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def key_fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:4].upper()


def shown(version: int, fingerprint: str) -> str:
    return f"v{version} ({fingerprint})"


def normalize_site_code(value: str, field: str = "site_code") -> str:
    text = value.strip().lower() if isinstance(value, str) else ""
    if not _CODE.fullmatch(text):
        raise ValidationFailed(
            "a site code is 1-64 lower-case letters, digits, '-' or '_', starting with a letter or digit", field
        )
    return text


@dataclass(frozen=True)
class KeyInfo:
    site_id: int
    site_code: str
    version: int
    fingerprint: str  # "vN (XXXX)"
    created_at: dt.datetime
    created_by: str
    expires_at: dt.datetime | None
    max_uses: int | None
    uses: int


@dataclass(frozen=True)
class Verified:
    """A key that opened its site's door: which site, which key version."""

    site: Site
    key: SiteKey


class SiteService:
    def __init__(self, db: Database, *, concurrency: int = 4) -> None:
        self.db = db
        # Argon2 at 64 MiB each: a burst of enrollments must not take the server's memory (enrollment.md §4.4).
        self._verifying = threading.BoundedSemaphore(concurrency)

    # -- sites -----------------------------------------------------------------------------------------

    def list(self) -> builtins.list[Site]:
        with self.db.read() as s:
            return builtins.list(s.scalars(select(Site).order_by(Site.site_code)))

    def get(self, ref: str | int) -> Site:
        with self.db.read() as s:
            return self._get(s, ref)

    @staticmethod
    def _get(s: Session, ref: str | int, *, lock: bool = False) -> Site:
        text = str(ref).strip().lower()
        stmt = select(Site)
        stmt = (
            stmt.where(Site.id == int(text))
            if text.isdigit() and len(text) < 10
            else stmt.where(Site.site_code == text)
        )
        site = s.scalar(stmt.with_for_update() if lock else stmt)
        if site is None:
            raise NotFound(f"no site {str(ref)[:64]!r}: `ktizo sites list` shows them")
        return site

    def create(
        self,
        actor: Actor,
        code: str,
        *,
        name: str = "",
        policy: str = "auto-approve",
        max_pending: int | None = None,
        max_agents: int | None = None,
    ) -> Site:
        actor.require(UserRole.ADMIN)
        site = Site(
            site_code=normalize_site_code(code),
            name=_name(name),
            enrollment_policy=_policy(policy),
            max_pending=_limit(max_pending, "max_pending"),
            max_agents=_limit(max_agents, "max_agents"),
            created_at=utcnow(),
            created_by=actor.name,
        )
        with self.db.write() as s:
            if s.scalar(select(Site.id).where(Site.site_code == site.site_code)) is not None:
                raise Conflict(f"a site {site.site_code!r} exists", "site_code")
            s.add(site)
            s.flush()
            audit.record(s, actor, "site_create", None, _site_details(site))
        return site

    def update(
        self,
        actor: Actor,
        ref: str | int,
        *,
        name: str | None = None,
        policy: str | None = None,
        max_pending: int | bool | None = False,
        max_agents: int | bool | None = False,
    ) -> Site:
        """Change a site; ``max_pending``/``max_agents`` left False stay as they are, None removes the limit."""
        actor.require(UserRole.ADMIN)
        with self.db.write() as s:
            site = self._get(s, ref, lock=True)
            if name is not None:
                site.name = _name(name)
            if policy is not None:
                site.enrollment_policy = _policy(policy)
            if max_pending is not False:
                site.max_pending = _limit(max_pending, "max_pending")
            if max_agents is not False:
                site.max_agents = _limit(max_agents, "max_agents")
            audit.record(s, actor, "site_update", None, _site_details(site))
        return site

    def delete(self, actor: Actor, ref: str | int) -> Site:
        """Delete a site and its keys; its agents stay (enrolled, without a site)."""
        actor.require(UserRole.ADMIN)
        with self.db.write() as s:
            site = self._get(s, ref, lock=True)
            audit.record(s, actor, "site_delete", None, _site_details(site))
            s.delete(site)
        return site

    # -- keys ------------------------------------------------------------------------------------------

    def rotate_key(
        self,
        actor: Actor,
        ref: str | int,
        *,
        expires_at: dt.datetime | None = None,
        max_uses: int | None = None,
    ) -> tuple[str, KeyInfo]:
        """A new key for the site (the old one refused from this commit on); returns the key, shown only now."""
        actor.require(UserRole.ADMIN)
        if expires_at is not None and expires_at <= utcnow():
            raise ValidationFailed("expires_at must be in the future", "expires_at")
        max_uses = _limit(max_uses, "max_uses")
        key = new_key()
        digest = _hasher.hash(key)
        now = utcnow()
        with self.db.write() as s:
            site = self._get(s, ref, lock=True)  # serialises rotations of one site
            last = s.scalar(select(func.max(SiteKey.version)).where(SiteKey.site_id == site.id)) or 0
            old = s.scalar(select(SiteKey).where(SiteKey.site_id == site.id, SiteKey.active.is_(True)))
            if old is not None:
                old.active = False
                old.deactivated_at = now
                s.flush()  # the partial unique index sees one active key at every moment
            row = SiteKey(
                site_id=site.id,
                version=last + 1,
                key_hash=digest,
                fingerprint=key_fingerprint(key),
                active=True,
                created_at=now,
                created_by=actor.name,
                expires_at=expires_at,
                max_uses=max_uses,
                uses=0,
            )
            s.add(row)
            s.flush()
            info = _info(site, row)
            audit.record(
                s,
                actor,
                "site_key.rotated",
                None,
                {
                    "site": site.site_code,
                    "old": shown(old.version, old.fingerprint) if old is not None else None,
                    "new": info.fingerprint,
                    "expires_at": expires_at.isoformat() if expires_at else None,
                    "max_uses": max_uses,
                },
            )
        return key, info

    def active_key(self, ref: str | int) -> KeyInfo | None:
        with self.db.read() as s:
            site = self._get(s, ref)
            row = s.scalar(select(SiteKey).where(SiteKey.site_id == site.id, SiteKey.active.is_(True)))
            return _info(site, row) if row is not None else None

    def keys(self, ref: str | int) -> builtins.list[KeyInfo]:
        with self.db.read() as s:
            site = self._get(s, ref)
            rows = s.scalars(select(SiteKey).where(SiteKey.site_id == site.id).order_by(SiteKey.version.desc()))
            return [_info(site, row) for row in rows]

    def enrollments_by_version(self, ref: str | int) -> builtins.list[tuple[int, int, dt.datetime | None]]:
        """(key version, agents enrolled with it, the latest first contact among them), newest version first."""
        with self.db.read() as s:
            site = self._get(s, ref)
            rows = s.execute(
                select(Device.key_version, func.count(), func.max(Device.first_seen))
                .where(Device.site_id == site.id)
                .group_by(Device.key_version)
                .order_by(Device.key_version.desc())
            ).all()
            return [(int(v or 0), int(n), last) for v, n, last in rows]

    def verify(self, s: Session, code: str, key: str) -> tuple[Verified | None, str]:
        """The site and key ``key`` opens, or None and why (``unknown_site``, ``bad_key``, ``expired_key``,
        ``used_up_key``). An unknown site costs one Argon2 verify like a wrong key does."""
        site = s.scalar(select(Site).where(Site.site_code == code)) if _CODE.fullmatch(code or "") else None
        row = (
            s.scalar(select(SiteKey).where(SiteKey.site_id == site.id, SiteKey.active.is_(True)))
            if site is not None
            else None
        )
        ok = False
        with self._verifying:
            try:
                ok = bool(_hasher.verify(row.key_hash if row is not None else _dummy_hash(), key))
            except (VerificationError, InvalidHashError):
                ok = False
        if site is None:
            return None, "unknown_site"
        if row is None or not ok:
            return None, "bad_key"
        now = utcnow()
        if row.expires_at is not None and row.expires_at <= now:
            return None, "expired_key"
        if row.max_uses is not None:
            used = s.execute(
                update(SiteKey).where(SiteKey.id == row.id, SiteKey.uses < row.max_uses).values(uses=SiteKey.uses + 1)
            )
            if not getattr(used, "rowcount", 0):
                return None, "used_up_key"
        else:
            s.execute(update(SiteKey).where(SiteKey.id == row.id).values(uses=SiteKey.uses + 1))
        return Verified(site, row), "ok"


def _info(site: Site, row: SiteKey) -> KeyInfo:
    return KeyInfo(
        site_id=site.id,
        site_code=site.site_code,
        version=row.version,
        fingerprint=shown(row.version, row.fingerprint),
        created_at=row.created_at,
        created_by=row.created_by,
        expires_at=row.expires_at,
        max_uses=row.max_uses,
        uses=row.uses,
    )


def _site_details(site: Site) -> dict[str, object]:
    return {
        "site": site.site_code,
        "name": site.name,
        "policy": site.enrollment_policy,
        "max_pending": site.max_pending,
        "max_agents": site.max_agents,
    }


def _name(value: str) -> str:
    text = (value or "").strip()
    if len(text) > 200 or not text.isprintable():
        raise ValidationFailed("a site name is printable text of at most 200 characters", "name")
    return text


def _policy(value: str) -> str:
    text = (value or "").strip().lower()
    if text not in POLICIES:
        raise ValidationFailed("enrollment_policy is auto-approve or manual", "enrollment_policy")
    return text


def _limit(value: int | None, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1_000_000:
        raise ValidationFailed(f"{field} is a number from 0 to 1000000, or empty for no limit", field)
    return value
