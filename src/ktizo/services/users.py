"""Operators and their credentials: Argon2id passwords, bearer tokens kept only as SHA-256."""

from __future__ import annotations

import builtins
import datetime as dt
import functools
import hashlib
import hmac
import secrets
import threading
from collections import Counter
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ktizo.db import Database
from ktizo.db.engine import keep_on_refusal
from ktizo.db.models import ApiToken, User
from ktizo.db.types import utcnow
from ktizo.domain.bounds import is_possible_id
from ktizo.domain.errors import Conflict, NotFound, TooManyAttempts, Unauthenticated, ValidationFailed
from ktizo.domain.users import UserRole, normalize_username
from ktizo.services import audit, refusals
from ktizo.services.context import Actor

TOKEN_PREFIX = "ktz_"  # noqa: S105 - a public prefix, not a secret
SESSION_TTL = dt.timedelta(hours=12)
# Password guessing is throttled by the refusal counters (services.refusals), in the database, so every replica
# sees the same count. Per user name and source address, so a guesser elsewhere cannot lock the
# administrator out; per source address too, so spraying many user names from one place stops as well.
LOGIN_WINDOW = dt.timedelta(minutes=15)
LOGIN_FAILURES_PER_USER = 10
LOGIN_FAILURES_PER_SOURCE = 50
_hasher = PasswordHasher()  # argon2-cffi's defaults are Argon2id with RFC 9106's low-memory profile


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the username does not exist, so that a miss costs as much time as a wrong password.
    Made on first use: hashing costs 64 MiB and tens of milliseconds, which no CLI command should pay at start."""
    return _hasher.hash(secrets.token_urlsafe(16))


@dataclass(frozen=True)
class Principal:
    user_id: int
    username: str
    role: UserRole

    def actor(self, source_ip: str | None) -> Actor:
        return Actor.user(self.username, self.role, source_ip)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def check_password_strength(password: str) -> None:
    if len(password) < 12:
        raise ValidationFailed("password must be at least 12 characters", "password")
    if len(password) > 1024:
        raise ValidationFailed("password must be at most 1024 characters", "password")


@dataclass(frozen=True)
class TokenInfo:
    """A token as an admin sees it: never the token, only its prefix and history."""

    id: int
    username: str
    name: str
    prefix: str
    created_at: dt.datetime
    expires_at: dt.datetime | None
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None

    def active(self, now: dt.datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


class UserService:
    def __init__(self, db: Database, *, concurrency: int = 4) -> None:
        self.db = db
        # Argon2id verifies with 64 MiB each: forty concurrent sign-ins would be 2.5 GB and starve everything
        # else. They take turns; attempts waiting or running count toward the throttle as if they had failed.
        self._verifying = threading.BoundedSemaphore(concurrency)
        self._in_flight: Counter[tuple[str, str]] = Counter()
        self._in_flight_lock = threading.Lock()

    def any_users(self) -> bool:
        with self.db.read() as s:
            return (s.scalar(select(func.count()).select_from(User)) or 0) > 0

    def ensure_admin(self) -> str | None:
        """On first start: create ``admin`` with a random password and return it (to be shown once)."""
        if self.any_users():
            return None
        password = secrets.token_urlsafe(18)
        try:
            self.create(Actor.system(), "admin", UserRole.ADMIN, password)
        except Conflict:  # another replica won the race; its log shows the password
            return None
        return password

    def create(self, actor: Actor, username: str, role: UserRole, password: str | None) -> User:
        actor.require(UserRole.ADMIN)
        name = normalize_username(username)
        if password is not None:
            check_password_strength(password)
        with self.db.write() as s:
            if s.scalar(select(User.id).where(User.username == name)) is not None:
                raise Conflict(f"user {name} already exists")
            user = User(
                username=name,
                role=role.value,
                password_hash=_hasher.hash(password) if password is not None else None,
            )
            s.add(user)
            s.flush()
            audit.record(s, actor, "user_create", None, {"username": name, "role": role.value})
        return user

    def list(self) -> list[User]:
        with self.db.read() as s:
            return list(s.scalars(select(User).order_by(User.username)).all())

    def get_by_name(self, username: str) -> User:
        with self.db.read() as s:
            user = s.scalar(select(User).where(User.username == normalize_username(username)))
        if user is None:
            raise NotFound(f"no user named {username}")
        return user

    def authenticate(self, username: str, password: str, source_ip: str | None) -> Principal:
        try:
            name = normalize_username(username)
        except ValidationFailed:
            name = ""
        subject = name or "?"
        address = source_ip or ""
        with self._in_flight_lock:
            in_flight_user = self._in_flight[(subject, address)]
            in_flight_source = sum(n for (_, a), n in self._in_flight.items() if a == address)
            self._in_flight[(subject, address)] += 1
        try:
            with self.db.read() as s:
                user = s.scalar(select(User).where(User.username == name)) if name else None
                wait = self._login_wait(s, subject, source_ip, in_flight_user, in_flight_source)
            if wait:
                self._refuse(subject, source_ip, {"throttled": True})
                minutes = -(-wait // 60)
                plural = "s" if minutes != 1 else ""
                raise TooManyAttempts(
                    f"too many failed sign-ins from this address; try again in {minutes} minute{plural}", wait
                )
            ok = False
            with self._verifying:
                try:
                    ok = _hasher.verify(user.password_hash if user and user.password_hash else _dummy_hash(), password)
                except (VerificationError, InvalidHashError):
                    ok = False
            if not ok or user is None or user.disabled or not user.password_hash:
                self._refuse(subject, source_ip, {})
                raise Unauthenticated("wrong username or password")
        finally:
            with self._in_flight_lock:
                self._in_flight[(subject, address)] -= 1
                if not self._in_flight[(subject, address)]:
                    del self._in_flight[(subject, address)]
        with self.db.write() as s:
            s.execute(update(User).where(User.id == user.id).values(last_login_at=utcnow()))
            refusals.forgive(s, "login_failed", user.username, source_ip)  # old typos no longer count
            audit.record(s, Actor.user(user.username, UserRole(user.role), source_ip), "login")
        return Principal(user.id, user.username, UserRole(user.role))

    def _refuse(self, subject: str, source_ip: str | None, details: dict[str, object]) -> None:
        with self.db.write() as s:  # evidence: it stands although the sign-in is refused
            refusals.refuse(
                s, Actor(name=subject, kind="user", source_ip=source_ip), "login_failed", subject, None, details
            )
        keep_on_refusal()

    @staticmethod
    def _login_wait(s: Session, name: str, source_ip: str | None, in_flight_user: int, in_flight_source: int) -> int:
        """Seconds until this user name may try again from this address; 0 when it may now. Failures are counted
        in the database (every replica sees them), attempts still running in this process on top."""
        now = utcnow()
        since = now - LOGIN_WINDOW
        address = source_ip or ""
        checks = (
            (
                refusals.count(s, "login_failed", since, subject=name, source_ip=address),
                in_flight_user,
                LOGIN_FAILURES_PER_USER,
            ),
            (refusals.count(s, "login_failed", since, source_ip=address), in_flight_source, LOGIN_FAILURES_PER_SOURCE),
        )
        for (count, oldest), running, allowed in checks:
            if count + running >= allowed:
                if oldest is None:
                    return int(LOGIN_WINDOW.total_seconds())  # only attempts in flight: wait for them
                return TooManyAttempts.seconds_until(oldest + LOGIN_WINDOW, now)
        return 0

    def create_token(self, actor: Actor, username: str, *, name: str = "", ttl: dt.timedelta | None = None) -> str:
        """Make a bearer token for ``username`` and return it; only its hash is stored."""
        target = normalize_username(username)
        if actor.name != target or actor.kind != "user":
            actor.require(UserRole.ADMIN)
        token = new_token()
        with self.db.write() as s:
            user = s.scalar(select(User).where(User.username == target))
            if user is None:
                raise NotFound(f"no user named {target}")
            s.add(
                ApiToken(
                    user_id=user.id,
                    name=name[:64],
                    token_hash=hash_token(token),
                    prefix=token[:10],
                    expires_at=utcnow() + ttl if ttl else None,
                )
            )
            audit.record(s, actor, "token_create", None, {"username": target, "name": name[:64], "expires": bool(ttl)})
        return token

    def resolve_token(self, token: str) -> Principal:
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            raise Unauthenticated("that is not a Ktizo API token")
        digest = hash_token(token)
        now = utcnow()
        with self.db.read() as s:
            row = s.execute(select(ApiToken, User).join(User).where(ApiToken.token_hash == digest)).first()
        # The index lookup already matched the digest; compare again in constant time for defence in depth.
        if row is None or not hmac.compare_digest(row[0].token_hash, digest):
            raise Unauthenticated("unknown or revoked token")
        tok, user = row
        if tok.revoked_at is not None or (tok.expires_at is not None and tok.expires_at <= now) or user.disabled:
            raise Unauthenticated("unknown or revoked token")
        if tok.last_used_at is None or (now - tok.last_used_at) > dt.timedelta(minutes=1):
            with self.db.write() as s:
                s.execute(update(ApiToken).where(ApiToken.id == tok.id).values(last_used_at=now))
        return Principal(user.id, user.username, UserRole(user.role))

    def revoke_token(self, actor: Actor, token: str) -> None:
        with self.db.write() as s:
            tok = s.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
            if tok is None:
                raise NotFound("no such token")
            tok.revoked_at = utcnow()
            audit.record(s, actor, "token_revoke", None, {"prefix": tok.prefix})

    # -- the Users page --------------------------------------------------------------------------------

    def set_disabled(self, actor: Actor, username: str, disabled: bool) -> User:
        """Disable (or enable again) a user: a disabled user's password and tokens stop working at once."""
        actor.require(UserRole.ADMIN)
        with self.db.write() as s:
            user = _user_for_update(s, username)
            if disabled and actor.kind == "user" and user.username == actor.name:
                raise Conflict("you cannot disable your own account")
            if user.disabled == disabled:
                return user
            _admin_guard(s, user, demote=disabled)
            user.disabled = disabled
            audit.record(s, actor, "user_disable" if disabled else "user_enable", None, {"username": user.username})
        return user

    def set_role(self, actor: Actor, username: str, role: UserRole) -> User:
        actor.require(UserRole.ADMIN)
        with self.db.write() as s:
            user = _user_for_update(s, username)
            if user.role == role.value:
                return user
            _admin_guard(s, user, demote=role is not UserRole.ADMIN)
            before = user.role
            user.role = role.value
            ended = _end_sessions(s, user)
            audit.record(
                s,
                actor,
                "user_role",
                None,
                {"username": user.username, "from": before, "to": role.value, "tokens_revoked": ended},
            )
        return user

    def reset_password(self, actor: Actor, username: str) -> str:
        """Give ``username`` a new random password and return it (to be shown once and handed over)."""
        actor.require(UserRole.ADMIN)
        password = secrets.token_urlsafe(18)
        digest = _hasher.hash(password)
        with self.db.write() as s:
            user = _user_for_update(s, username)
            user.password_hash = digest
            ended = _end_sessions(s, user)
            audit.record(s, actor, "password_reset", None, {"username": user.username, "tokens_revoked": ended})
        return password

    def list_tokens(self, actor: Actor, username: str | None = None) -> builtins.list[TokenInfo]:
        """Tokens, newest first: everyone's for an admin, one's own otherwise."""
        if username is None or normalize_username(username) != actor.name or actor.kind != "user":
            actor.require(UserRole.ADMIN)
        stmt = select(ApiToken, User.username).join(User).order_by(ApiToken.id.desc())
        if username is not None:
            stmt = stmt.where(User.username == normalize_username(username))
        with self.db.read() as s:
            rows = s.execute(stmt).all()
        return [
            TokenInfo(t.id, name, t.name, t.prefix, t.created_at, t.expires_at, t.last_used_at, t.revoked_at)
            for t, name in rows
        ]

    def revoke_token_id(self, actor: Actor, token_id: int) -> TokenInfo:
        """Revoke a token by its id (an admin's, or its owner's own)."""
        if not is_possible_id(token_id):  # no row has it; as a parameter it would be a driver error
            raise NotFound(f"no token with id {token_id}")
        with self.db.write() as s:
            row = s.execute(select(ApiToken, User.username).join(User).where(ApiToken.id == token_id)).first()
            if row is None:
                raise NotFound(f"no token with id {token_id}")
            tok, owner = row
            if owner != actor.name or actor.kind != "user":
                actor.require(UserRole.ADMIN)
            if tok.revoked_at is None:
                tok.revoked_at = utcnow()
                audit.record(s, actor, "token_revoke", None, {"prefix": tok.prefix, "username": owner, "id": tok.id})
            info = TokenInfo(
                tok.id, owner, tok.name, tok.prefix, tok.created_at, tok.expires_at, tok.last_used_at, tok.revoked_at
            )
        return info


def _end_sessions(s: Session, user: User) -> int:
    """Revoke every live token of ``user`` (UI sessions are tokens too): a new password or a new role must not
    leave a session opened with the old one. Returns how many were revoked."""
    result = s.execute(
        update(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    return int(getattr(result, "rowcount", 0) or 0)


def _admin_guard(s: Session, user: User, *, demote: bool) -> None:
    """Refuse the change that would leave no enabled admin (nobody could manage users any more)."""
    if user.role != UserRole.ADMIN.value or user.disabled or not demote:
        return
    others = s.scalar(
        select(func.count())
        .select_from(User)
        .where(User.role == UserRole.ADMIN.value, User.disabled.is_(False), User.id != user.id)
    )
    if not others:
        raise Conflict(f"{user.username} is the last enabled admin; make another admin first")


def _user_for_update(s: Session, username: str) -> User:
    user = s.scalar(select(User).where(User.username == normalize_username(username)).with_for_update())
    if user is None:
        raise NotFound(f"no user named {username}")
    return user
