"""Webhooks: subscriptions to events, and their delivery from the outbox (``services.events``).

Every change worth telling writes an ``Event`` row in its own transaction (``audit.record``). The dispatcher turns
each event into one ``WebhookDelivery`` per enabled subscription that wants it (a unique pair: made once, however
many replicas dispatch); the deliverer claims due deliveries with a lease (``claimed_until``, ``SKIP LOCKED`` on
PostgreSQL), commits, sends outside any transaction, and records the outcome in a second short transaction.

The promise is *at least once, exactly once in the normal case*: a process that dies after the receiver answered
but before the outcome was recorded leaves the lease to expire, and the delivery is sent again with the same
``X-Ktizo-Delivery`` id, which is what receivers deduplicate on. Nothing else sends a delivery twice.

Bodies are signed: ``X-Ktizo-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``, over the exact
bytes sent. Targets are http(s) only, redirects are never followed, every phase has a timeout, and
``KTIZO_WEBHOOK_DENY`` (CIDRs) refuses targets that resolve into those networks (the address checked is the one
connected to)."""

from __future__ import annotations

import builtins
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import re
import secrets
import socket
import urllib.parse
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from ktizo import __version__
from ktizo.db import Database
from ktizo.db.engine import current_transaction
from ktizo.db.models import Event, Webhook, WebhookDelivery
from ktizo.db.types import utcnow
from ktizo.domain.errors import Conflict, NotFound, ValidationFailed
from ktizo.domain.users import UserRole
from ktizo.pki.sealing import Sealer
from ktizo.services import audit, events
from ktizo.services.context import Actor
from ktizo.services.first_contact import insert_ignoring_conflict

log = logging.getLogger("ktizo.webhooks")

TEST_EVENT = "webhook.test"
FORMATS = ("json", "slack")
STATUSES = ("pending", "delivered", "failed")
SPEC_FIELDS = ("url", "events", "format", "secret", "enabled")
SECRET_MIN = 16
SECRET_MAX = 256
SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
URL_MAX = 2048
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

TIMEOUT = 10.0  # seconds, for each of connect, write and every read
LEASE = dt.timedelta(seconds=3 * TIMEOUT + 5)  # connect + write + read, and a margin: longer than any one send
RETRY_FOR = dt.timedelta(hours=24)
BASE_DELAY = 10.0  # seconds; doubled with every failed attempt
MAX_DELAY = 3600.0
JITTER = 0.2
DISPATCH_BATCH = 500
DELIVER_BATCH = 16  # sent at once, each in its own thread: a target that times out holds up none of the others
ERROR_MAX = 300


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Ktizo-Signature`` header's value for ``body`` sent at ``timestamp`` (Unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def backoff(attempts: int, rand: float | None = None) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: 10 s doubled each time, at most an hour,
    ±20 % jitter (so that many deliveries to one receiver that was down do not all come back at once)."""
    base: float = min(BASE_DELAY * 2.0 ** min(attempts, 64), MAX_DELAY)
    r = random.random() if rand is None else rand  # noqa: S311 - jitter, not a secret
    return base * (1 - JITTER + 2 * JITTER * r)


def shown_url(url: str) -> str:
    """A target as people without the admin role see it: scheme, host and port; the path and query (which for
    Slack and many other services are the credential) hidden."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    rest = "/…" if (parts.path not in ("", "/") or parts.query) else "/"
    return f"{parts.scheme}://{host}{port}{rest}"


# -- validation -----------------------------------------------------------------------------------------------


def normalize_name(value: object, field: str = "name") -> str:
    text = value.strip().lower() if isinstance(value, str) else ""
    if not _NAME.fullmatch(text):
        raise ValidationFailed(
            "a webhook name is 1-63 lower-case letters, digits and '-', starting and ending with a letter or digit "
            "(a DNS label)",
            field,
        )
    return text


def normalize_url(value: object, field: str = "url") -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValidationFailed("a URL is required: http://… or https://…", field)
    text = value.strip()
    if len(text) > URL_MAX:
        raise ValidationFailed(f"at most {URL_MAX} characters", field)
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in text):
        raise ValidationFailed("a URL has no spaces or control characters", field)
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValidationFailed(f"not a URL: {exc}", field) from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValidationFailed("only http:// and https:// targets are allowed", field)
    if not parts.hostname:
        raise ValidationFailed("the URL has no host", field)
    if parts.username is not None or parts.password is not None:
        raise ValidationFailed("credentials in the URL are not allowed: the signature authenticates Ktizo", field)
    if parts.fragment:
        raise ValidationFailed("a URL fragment is never sent: leave it out", field)
    if port == 0:
        raise ValidationFailed("port 0 is not a port", field)
    return text


def normalize_events(value: object, field: str = "events") -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        raise ValidationFailed("at least one event: a name such as device.approved, or *", field)
    out: set[str] = set()
    for item in value:
        name = item.strip() if isinstance(item, str) else ""
        if name != "*" and name not in events.NAMES:
            known = ", ".join(sorted(events.NAMES))
            raise ValidationFailed(f"unknown event {str(item)[:64]!r}; known: * or {known}", field)
        out.add(name)
    return ["*"] if "*" in out else sorted(out)


def normalize_format(value: object, field: str = "format") -> str:
    text = value.strip().lower() if isinstance(value, str) else ""
    if text not in FORMATS:
        raise ValidationFailed("format is json or slack", field)
    return text


def check_secret(value: object, field: str = "secret") -> str:
    if not isinstance(value, str):
        raise ValidationFailed("the secret is a string", field)
    if len(value) < SECRET_MIN:
        raise ValidationFailed(f"a secret of at least {SECRET_MIN} characters (or none: one is made)", field)
    if len(value) > SECRET_MAX or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValidationFailed(f"at most {SECRET_MAX} printable characters", field)
    return value


def check_enabled(value: object, field: str = "enabled") -> bool:
    if not isinstance(value, bool):
        raise ValidationFailed("enabled is true or false", field)
    return value


def parse_deny(networks: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(n.strip(), strict=False) for n in networks if n.strip()]


# -- what is sent ---------------------------------------------------------------------------------------------


def body_of(delivery_id: str, event: str, at: dt.datetime, payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": delivery_id,
        "event": event,
        "at": at.isoformat().replace("+00:00", "Z"),
        "machine": payload.get("machine"),
        "actor": payload.get("actor"),
        "details": payload.get("details") or {},
    }


def _slack_escape(text: str) -> str:
    # Slack reads <…> as links and mentions (<!channel>): what a machine reported must stay text.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_text(body: dict[str, Any]) -> str:
    """One readable line: ``[ktizo] device.approved: node-01 (52:54:00:12:34:56, 10.0.5.100/24) by alice``."""
    machine = body.get("machine") or {}
    facts = [
        str(machine[k])
        for k in ("mac_address", "machine_id", "ip_address", "status")
        if machine.get(k) and not (k == "machine_id" and machine.get("mac_address"))
    ]
    subject = str(machine.get("hostname") or machine.get("mac_address") or machine.get("machine_id") or "")
    if machine.get("hostname") is None and facts:
        facts = facts[1:] if facts[0] == subject else facts
    what = f"{subject} ({', '.join(facts)})" if subject and facts else subject or ", ".join(facts)
    actor = (body.get("actor") or {}).get("name") or "system"
    line = f"[ktizo] {body['event']}: {what or 'no machine'} by {actor}"
    return _slack_escape(line[:1000])


def encode(fmt: str, body: dict[str, Any]) -> bytes:
    document = {"text": slack_text(body)} if fmt == "slack" else body
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False, default=str).encode()


# -- records --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryView:
    id: int
    delivery_id: str
    webhook: str
    event_id: int
    event: str
    status: str
    attempts: int
    created_at: dt.datetime
    next_attempt_at: dt.datetime
    claimed_until: dt.datetime | None
    delivered_at: dt.datetime | None
    last_status: int | None
    last_error: str | None


@dataclass(frozen=True)
class SendResult:
    delivery_id: str
    ok: bool
    status: int | None
    error: str | None


@dataclass(frozen=True)
class _Claimed:
    id: int
    delivery_id: str
    url: str
    secret: str
    format: str
    event: str
    at: dt.datetime
    payload: dict[str, Any]
    attempts: int  # before this one
    created_at: dt.datetime


class Refused(Exception):
    """A target this process will not connect to (``KTIZO_WEBHOOK_DENY``), or one that does not resolve."""


class WebhookService:
    def __init__(
        self,
        db: Database,
        sealer: Sealer,
        *,
        deny: Iterable[str] = (),
        timeout: float = TIMEOUT,
        lease: dt.timedelta = LEASE,
    ) -> None:
        self.db = db
        self.sealer = sealer
        self.deny = parse_deny(deny)
        self.timeout = timeout
        self.lease = lease
        self.user_agent = f"ktizo/{__version__}"

    # -- subscriptions ----------------------------------------------------------------------------------------

    def list(self) -> builtins.list[Webhook]:
        with self.db.read() as s:
            return builtins.list(s.scalars(select(Webhook).order_by(Webhook.name)))

    def get(self, name: str) -> Webhook:
        with self.db.read() as s:
            return self._get(s, name)

    @staticmethod
    def _get(s: Session, name: str, *, lock: bool = False) -> Webhook:
        key = name.strip().lower()[:64] if isinstance(name, str) else ""
        stmt = select(Webhook).where(Webhook.name == key)
        hook = s.scalar(stmt.with_for_update() if lock else stmt)
        if hook is None:
            raise NotFound(f"no webhook {key!r}: `ktizo webhooks list` shows them")
        return hook

    def create(
        self,
        actor: Actor,
        name: str,
        url: str,
        event_names: Iterable[str],
        *,
        format: str = "json",
        secret: str | None = None,
        enabled: bool = True,
    ) -> tuple[Webhook, str]:
        """A new subscription; returns it and its secret (made here when none is given), shown only now."""
        actor.require(UserRole.ADMIN)
        name = normalize_name(name)
        spec: dict[str, Any] = {
            "url": url,
            "events": builtins.list(event_names),
            "format": format,
            "enabled": enabled,
            "secret": new_secret() if secret is None else secret,
        }
        with self.db.write() as s:
            if s.scalar(select(Webhook.id).where(Webhook.name == name)) is not None:
                raise Conflict(f"a webhook {name!r} exists", "name")
            self.apply_in(s, actor, name, spec)
            hook = self._get(s, name)
        return hook, spec["secret"]

    def update(
        self,
        actor: Actor,
        name: str,
        *,
        url: str | None = None,
        event_names: Iterable[str] | None = None,
        format: str | None = None,
        secret: str | None = None,
        enabled: bool | None = None,
    ) -> Webhook:
        """Change the fields given; the others (and the secret, unless given) stay."""
        actor.require(UserRole.ADMIN)
        with self.db.write() as s:
            hook = self._get(s, name, lock=True)
            spec: dict[str, Any] = {
                "url": hook.url if url is None else url,
                "events": hook.events if event_names is None else builtins.list(event_names),
                "format": hook.format if format is None else format,
                "enabled": hook.enabled if enabled is None else enabled,
            }
            if secret is not None:
                spec["secret"] = secret
            self.apply_in(s, actor, hook.name, spec)
        return self.get(name)

    def delete(self, actor: Actor, name: str) -> None:
        with self.db.write() as s:
            if not self.delete_in(s, actor, name):
                raise NotFound(f"no webhook {str(name)[:64]!r}: `ktizo webhooks list` shows them")

    # -- for apply / export (inside the caller's transaction) -------------------------------------------------

    def apply_in(self, s: Session, actor: Actor, name: str, spec: dict[str, Any]) -> str:
        """Make the webhook ``name`` what ``spec`` says (``url``, ``events``, ``format`` json|slack, ``secret``,
        ``enabled``), in the caller's session. A missing secret keeps an existing webhook's (so an export without
        secrets applies as unchanged) and is refused for a new one. Returns created | configured | unchanged;
        raises ValidationFailed naming the spec field."""
        actor.require(UserRole.ADMIN)
        name = normalize_name(name)
        if not isinstance(spec, dict):
            raise ValidationFailed("a webhook's spec is a mapping", None)
        for key in spec:
            if key not in SPEC_FIELDS:
                raise ValidationFailed(f"unknown field {str(key)[:64]!r}; a webhook has {', '.join(SPEC_FIELDS)}", key)
        url = normalize_url(spec.get("url"))
        wanted = normalize_events(spec.get("events"))
        fmt = normalize_format(spec.get("format", "json"))
        enabled = check_enabled(spec.get("enabled", True))
        secret = check_secret(spec["secret"]) if spec.get("secret") is not None else None
        hook = s.scalar(select(Webhook).where(Webhook.name == name).with_for_update())
        if hook is None:
            if secret is None:
                raise ValidationFailed(f"a new webhook needs a secret of at least {SECRET_MIN} characters", "secret")
            hook = Webhook(
                name=name,
                url=url,
                events=wanted,
                format=fmt,
                enabled=enabled,
                secret_sealed=self.sealer.seal(secret),
                created_at=utcnow(),
                created_by=actor.name,
                revision=1,
            )
            s.add(hook)
            s.flush()
            audit.record(s, actor, "webhook_create", None, _details(hook, secret_changed=True))
            return "created"
        secret_changed = secret is not None and not hmac.compare_digest(
            secret.encode(), self.sealer.open(hook.secret_sealed).encode()
        )
        same = hook.url == url and builtins.list(hook.events) == wanted and hook.format == fmt
        if same and hook.enabled == enabled and not secret_changed:
            return "unchanged"
        hook.url, hook.events, hook.format, hook.enabled = url, wanted, fmt, enabled
        if secret_changed and secret is not None:
            hook.secret_sealed = self.sealer.seal(secret)
        hook.revision += 1
        s.flush()
        audit.record(s, actor, "webhook_update", None, _details(hook, secret_changed=secret_changed))
        return "configured"

    def delete_in(self, s: Session, actor: Actor, name: str) -> bool:
        """Delete the webhook ``name`` and its delivery log, in the caller's session; False when there is none."""
        actor.require(UserRole.ADMIN)
        hook = s.scalar(select(Webhook).where(Webhook.name == str(name).strip().lower()[:64]).with_for_update())
        if hook is None:
            return False
        audit.record(s, actor, "webhook_delete", None, _details(hook, secret_changed=False))
        s.delete(hook)
        s.flush()
        return True

    def export(self, include_secrets: bool = False) -> builtins.list[tuple[str, dict[str, Any]]]:
        """Every webhook as ``(name, spec)``, by name; the secret only with ``include_secrets``."""
        out = []
        for hook in self.list():
            spec: dict[str, Any] = {"url": hook.url, "events": builtins.list(hook.events), "format": hook.format}
            if not hook.enabled:
                spec["enabled"] = False
            if include_secrets:
                spec["secret"] = self.sealer.open(hook.secret_sealed)
            out.append((hook.name, spec))
        return out

    # -- the delivery log ---------------------------------------------------------------------------------------

    def deliveries(
        self, name: str | None = None, *, status: str | None = None, limit: int = 100
    ) -> builtins.list[DeliveryView]:
        """Newest first."""
        if status is not None and status not in STATUSES:
            raise ValidationFailed(f"status is one of {', '.join(STATUSES)}", "status")
        limit = max(1, min(int(limit), 1000))
        with self.db.read() as s:
            stmt = (
                select(WebhookDelivery, Webhook.name, Event.event)
                .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
                .join(Event, Event.id == WebhookDelivery.event_id)
            )
            if name is not None:
                stmt = stmt.where(WebhookDelivery.webhook_id == self._get(s, name).id)
            if status is not None:
                stmt = stmt.where(WebhookDelivery.status == status)
            stmt = stmt.order_by(WebhookDelivery.id.desc()).limit(limit)
            return [_view(d, hook, event) for d, hook, event in s.execute(stmt)]

    def counts(self) -> dict[str, dict[str, int]]:
        """Deliveries per webhook name and status."""
        with self.db.read() as s:
            rows = s.execute(
                select(Webhook.name, WebhookDelivery.status, func.count())
                .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
                .group_by(Webhook.name, WebhookDelivery.status)
            )
            out: dict[str, dict[str, int]] = {}
            for name, status, n in rows:
                out.setdefault(name, {})[status] = n
            return out

    # -- dispatch: events -> deliveries -------------------------------------------------------------------------

    def dispatch(self, limit: int = DISPATCH_BATCH) -> int:
        """Turn the oldest events still marked for webhooks into deliveries, one per enabled subscription that
        wants them (from the subscription's creation on); returns how many deliveries were made."""
        made = 0
        with self.db.write() as s:
            hooks = builtins.list(s.scalars(select(Webhook).where(Webhook.enabled.is_(True))))
            if not hooks:
                # Nobody subscribed: a boot storm's thousands of download events a second are cleared in one
                # statement, not loaded (a subscription made later wants only what happens from then on).
                s.execute(update(Event).where(Event.webhooks_pending.is_(True)).values(webhooks_pending=False))
                return 0
            # Only what matching needs: an event's payload is read when a delivery of it is sent.
            stmt = (
                select(Event.id, Event.event, Event.at)
                .where(Event.webhooks_pending.is_(True))
                .order_by(Event.id)
                .limit(limit)
            )
            if s.get_bind().dialect.name == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True)
            batch = builtins.list(s.execute(stmt))
            if not batch:
                return 0
            now = utcnow()
            for event in batch:
                for hook in hooks:
                    if events.wants(hook.events, event.event) and event.at >= hook.created_at:
                        values = {
                            "webhook_id": hook.id,
                            "event_id": event.id,
                            "delivery_id": str(uuid.uuid4()),
                            "status": "pending",
                            "attempts": 0,
                            "created_at": now,
                            "next_attempt_at": now,
                        }
                        if insert_ignoring_conflict(s, WebhookDelivery, values, returning=WebhookDelivery.id):
                            made += 1
            s.execute(update(Event).where(Event.id.in_([e.id for e in batch])).values(webhooks_pending=False))
        return made

    # -- delivery -----------------------------------------------------------------------------------------------

    def run(self) -> int:
        """One round of the job: dispatch new events, then deliver what is due. Outside any transaction."""
        self.dispatch()
        return self.deliver()

    def deliver(self, limit: int = DELIVER_BATCH) -> int:
        """Claim the due deliveries (a lease; SKIP LOCKED on PostgreSQL), send them at once, record each outcome.
        Must run outside a transaction: the claim commits before anything is sent. Returns how many were sent."""
        if current_transaction() is not None:
            raise RuntimeError("webhook delivery runs outside a transaction: the claim must commit before sending")
        claimed = self._claim(limit)
        if not claimed:
            return 0
        if len(claimed) == 1:
            self._record(claimed[0], self._send_claimed(claimed[0]))
            return 1
        with ThreadPoolExecutor(max_workers=len(claimed), thread_name_prefix="ktizo-webhook") as pool:
            results = builtins.list(pool.map(self._send_claimed, claimed))
        for item, result in zip(claimed, results, strict=True):
            self._record(item, result)
        return len(claimed)

    def _claim(self, limit: int) -> builtins.list[_Claimed]:
        now = utcnow()
        out: builtins.list[_Claimed] = []
        with self.db.write() as s:
            stmt = (
                select(WebhookDelivery)
                .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
                .where(
                    WebhookDelivery.status == "pending",
                    WebhookDelivery.next_attempt_at <= now,
                    or_(WebhookDelivery.claimed_until.is_(None), WebhookDelivery.claimed_until <= now),
                    Webhook.enabled.is_(True),
                )
                .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
                .limit(limit)
            )
            if s.get_bind().dialect.name == "postgresql":
                stmt = stmt.with_for_update(of=WebhookDelivery, skip_locked=True)
            rows = builtins.list(s.scalars(stmt))
            for row in rows:
                if row.created_at + RETRY_FOR <= now:
                    row.status = "failed"
                    row.claimed_until = None
                    row.last_error = _short(f"gave up: not delivered within {_hours(RETRY_FOR)} ({row.last_error})")
                    continue
                hook = s.get(Webhook, row.webhook_id)
                event = s.get(Event, row.event_id)
                if hook is None or event is None:
                    continue
                row.claimed_until = now + self.lease
                out.append(
                    _Claimed(
                        id=row.id,
                        delivery_id=row.delivery_id,
                        url=hook.url,
                        secret=self.sealer.open(hook.secret_sealed),
                        format=hook.format,
                        event=event.event,
                        at=event.at,
                        payload=event.payload or {},
                        attempts=row.attempts,
                        created_at=row.created_at,
                    )
                )
        return out

    def _send_claimed(self, item: _Claimed) -> SendResult:
        try:
            body = encode(item.format, body_of(item.delivery_id, item.event, item.at, item.payload))
            return self._send(item.url, item.secret, item.event, item.delivery_id, body)
        except Exception as exc:  # a bug here must not leave the lease to decide: record it as a failed attempt
            log.exception("webhook delivery %s failed unexpectedly", item.delivery_id)
            return SendResult(item.delivery_id, False, None, _short(f"internal error: {type(exc).__name__}"))

    def _record(self, item: _Claimed, result: SendResult) -> None:
        now = utcnow()
        attempts = item.attempts + 1
        values: dict[str, Any] = {
            "attempts": attempts,
            "claimed_until": None,
            "last_status": result.status,
            "last_error": result.error,
        }
        if result.ok:
            values.update(status="delivered", delivered_at=now, last_error=None)
        else:
            retry_at = now + dt.timedelta(seconds=backoff(attempts))
            if retry_at >= item.created_at + RETRY_FOR:
                values.update(status="failed", last_error=_short(f"gave up after {attempts} attempts: {result.error}"))
            else:
                values.update(next_attempt_at=retry_at)
        with self.db.write() as s:
            # A delivery another process recorded as delivered (its lease had run out) stays delivered.
            s.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == item.id, WebhookDelivery.status == "pending")
                .values(**values)
            )
        if not result.ok:
            log.info("webhook delivery %s attempt %d: %s", item.delivery_id, attempts, result.error)

    # -- sending ------------------------------------------------------------------------------------------------

    def test(self, name: str) -> SendResult:
        """Send a ``webhook.test`` event to the webhook now (not queued, not retried); returns how it went."""
        hook = self.get(name)
        delivery_id = str(uuid.uuid4())
        machine = {"id": None, "kind": "talos", "hostname": "ktizo-test", "mac_address": "00:00:5e:00:53:01"}
        payload = {
            "machine": machine,
            "actor": {"name": "ktizo", "kind": "system", "source_ip": None},
            "details": {"message": f"a test of the webhook {hook.name}"},
        }
        body = encode(hook.format, body_of(delivery_id, TEST_EVENT, utcnow(), payload))
        return self._send(hook.url, self.sealer.open(hook.secret_sealed), TEST_EVENT, delivery_id, body)

    def _send(self, url: str, secret: str, event: str, delivery_id: str, body: bytes) -> SendResult:
        import httpx  # loaded by the process that delivers, not by every CLI command

        timestamp = int(utcnow().timestamp())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": self.user_agent,
            "X-Ktizo-Event": event,
            "X-Ktizo-Delivery": delivery_id,
            "X-Ktizo-Signature": signature(secret, timestamp, body),
        }
        extensions: dict[str, Any] = {}
        try:
            target = url
            if self.deny:
                target, host = self._pinned(url)
                headers["Host"] = host
                if urllib.parse.urlsplit(url).scheme.lower() == "https":
                    extensions["sni_hostname"] = urllib.parse.urlsplit(url).hostname
            with httpx.Client(
                follow_redirects=False,
                timeout=httpx.Timeout(self.timeout),
                trust_env=False,
                headers={"Accept": "*/*"},
            ) as client:
                request = client.build_request("POST", target, content=body, headers=headers, extensions=extensions)
                response = client.send(request, stream=True)
                try:
                    code = response.status_code
                    snippet = _read_some(response)
                finally:
                    response.close()
        except Refused as exc:
            return SendResult(delivery_id, False, None, _short(str(exc)))
        except httpx.TimeoutException as exc:
            return SendResult(delivery_id, False, None, f"timed out ({type(exc).__name__}, {self.timeout:g} s)")
        except httpx.HTTPError as exc:
            return SendResult(delivery_id, False, None, _short(f"{type(exc).__name__}: {_reason(exc)}"))
        except OSError as exc:
            return SendResult(delivery_id, False, None, _short(f"{type(exc).__name__}: {exc.strerror or exc}"))
        if 200 <= code < 300:
            return SendResult(delivery_id, True, code, None)
        if 300 <= code < 400:
            return SendResult(delivery_id, False, code, f"HTTP {code}: a redirect, not followed")
        return SendResult(delivery_id, False, code, _short(f"HTTP {code}" + (f": {snippet}" if snippet else "")))

    def _pinned(self, url: str) -> tuple[str, str]:
        """Resolve the target, refuse it when any of its addresses is in KTIZO_WEBHOOK_DENY, and return the URL
        with the checked address in place of the name (so a second DNS answer cannot differ), and the Host."""
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise Refused(f"cannot resolve {host[:100]}: {exc.strerror or exc}") from None
        addresses = []
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
            for network in self.deny:
                if address.version == network.version and address in network:
                    raise Refused(f"refused by KTIZO_WEBHOOK_DENY: {host[:100]} is {address}, in {network}")
            addresses.append(address)
        if not addresses:
            raise Refused(f"cannot resolve {host[:100]}")
        first = addresses[0]
        literal = f"[{first}]" if first.version == 6 else str(first)
        netloc = f"{literal}:{parts.port}" if parts.port else literal
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")), parts.netloc


# -- helpers --------------------------------------------------------------------------------------------------


def _read_some(response: Any, limit: int = 200) -> str:
    """The start of a refusal's body, for last_error: receivers often say why."""
    try:
        if not 200 <= response.status_code < 300:
            for chunk in response.iter_bytes(limit):
                return " ".join(chunk[:limit].decode("utf-8", "replace").split())
    except Exception:  # noqa: S110 - the status code says enough
        pass
    return ""


def _reason(exc: Exception) -> str:
    # httpx's messages carry no URL; the innermost cause is the readable one (Connection refused…).
    cause: BaseException = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    return str(cause) or str(exc) or type(exc).__name__


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= ERROR_MAX else text[: ERROR_MAX - 1] + "…"


def _hours(delta: dt.timedelta) -> str:
    return f"{delta.total_seconds() / 3600:g} h"


def _details(hook: Webhook, *, secret_changed: bool) -> dict[str, Any]:
    return {
        "name": hook.name,
        "url": shown_url(hook.url),
        "events": builtins.list(hook.events),
        "format": hook.format,
        "enabled": hook.enabled,
        "secret_changed": secret_changed,
    }


def _view(d: WebhookDelivery, hook: str, event: str) -> DeliveryView:
    return DeliveryView(
        id=d.id,
        delivery_id=d.delivery_id,
        webhook=hook,
        event_id=d.event_id,
        event=event,
        status=d.status,
        attempts=d.attempts,
        created_at=d.created_at,
        next_attempt_at=d.next_attempt_at,
        claimed_until=d.claimed_until,
        delivered_at=d.delivered_at,
        last_status=d.last_status,
        last_error=d.last_error,
    )
