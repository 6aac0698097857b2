"""Talos's built-in approval handshake: the OAuth2 device authorization grant (RFC 8628), as Talos runs it.

The machine asks for a code (first contact, like at every door), shows it on its console and polls for a token;
the config download then requires the token issued to that very machine. Operators approve by the code
(``console_codes``)."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ktizo.db import Database
from ktizo.db.engine import keep_on_refusal
from ktizo.db.models import Device, DeviceCode
from ktizo.db.types import utcnow
from ktizo.domain.devices import DeviceStatus, Source
from ktizo.domain.errors import KtizoError, PermissionDenied, TooManyAttempts, ValidationFailed
from ktizo.domain.identity import is_placeholder, normalize_mac, normalize_serial, normalize_uuid
from ktizo.services import audit, refusals
from ktizo.services.context import Actor
from ktizo.services.first_contact import FirstContact, Knock

# Console codes: consonants only (no words, nothing to confuse with 0/O or 1/I), shown as XXXX-XXXX.
CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
CODE_LEN = 8
DEVICE_CODE_TTL = dt.timedelta(minutes=30)
# As long as Talos keeps retrying one acquisition (3 h): a download that failed after the token was issued
# (no base config yet, say) must still work when the operator fixes it.
ACCESS_TOKEN_TTL = dt.timedelta(hours=3)
POLL_INTERVAL = 5
# A machine shows one code at a time; a few live ones per machine allow for a reboot mid-flow. More requests for
# the same machine supersede the oldest, so nobody can pile up codes by naming a MAC.
LIVE_CODES_PER_MACHINE = 3
CODE_REQUEST_WINDOW = dt.timedelta(minutes=1)
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"


class OAuthError(KtizoError):
    """An RFC 6749/8628 error answer: ``error`` is the code a client acts on."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.status = status


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def normalize_user_code(code: str) -> str:
    text = re.sub(r"[\s-]", "", code).upper()
    if len(text) != CODE_LEN or any(c not in CODE_ALPHABET for c in text):
        raise ValidationFailed("a console code is 8 letters like BCDF-GHJK", "user_code")
    return f"{text[:4]}-{text[4:]}"


class DeviceFlowService:
    def __init__(
        self,
        db: Database,
        first_contact: FirstContact,
        *,
        enabled: bool = False,
        client_id: str = "ktizo",
        requests_per_minute: int = 0,
    ) -> None:
        self.db = db
        self.first_contact = first_contact
        self.enabled = enabled
        self.client_id = client_id
        self.requests_per_minute = requests_per_minute  # code requests per source address (0: no limit)

    def _check_client(self, client_id: str | None) -> None:
        if not self.enabled:
            raise OAuthError(
                "invalid_client", "the OAuth device flow is not enabled on this Ktizo (KTIZO_OAUTH_ENABLED)", 401
            )
        if client_id != self.client_id:
            raise OAuthError("invalid_client", "unknown client_id", 401)

    def start(self, form: dict[str, str], base_url: str, source_ip: str | None) -> dict[str, Any]:
        self._check_client(form.get("client_id"))
        mac, uuid, serial = form.get("mac"), form.get("uuid"), form.get("serial")
        try:
            mac_value = normalize_mac(mac, "mac") if mac and not is_placeholder(mac) else None
            uuid_value = normalize_uuid(uuid) if uuid and not is_placeholder(uuid) else None
            serial_value = normalize_serial(serial) if serial and not is_placeholder(serial) else None
        except ValidationFailed as exc:
            raise OAuthError("invalid_request", str(exc)) from None
        if mac_value is None:
            raise OAuthError(
                "invalid_request",
                "the device flow needs the machine's MAC: boot Talos with talos.config.oauth.extra_variable=mac",
            )
        device_code = secrets.token_urlsafe(32)
        now = utcnow()
        user_code = ""
        knock = Knock(door=Source.DEVICE_CODE, mac=mac_value, uuid=uuid_value, serial=serial_value, source_ip=source_ip)
        with self.db.write() as s:
            try:
                arrival = self.first_contact.arrive(s, knock)
                self._check_request_budget(s, source_ip)
            except TooManyAttempts as exc:
                raise OAuthError("temporarily_unavailable", exc.message, 429) from None
            device = arrival.device
            if arrival.mismatch is None:
                user_code = self._issue(s, device, device_code, knock, now)
        if arrival.mismatch is not None:  # raised after the block: first contact's record of it must stay
            keep_on_refusal()
            raise OAuthError("access_denied", "this machine's identity does not match what Ktizo knows of it")
        verify = f"{base_url.rstrip('/')}/ui/device-codes"
        return {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": verify,
            "verification_uri_complete": f"{verify}?code={user_code}",
            "expires_in": int(DEVICE_CODE_TTL.total_seconds()),
            "interval": POLL_INTERVAL,
        }

    def _issue(self, s: Session, device: Device, device_code: str, knock: Knock, now: dt.datetime) -> str:
        self._supersede_old_codes(s, device.id, now)
        user_code = self._free_user_code(s)
        s.add(
            DeviceCode(
                device_id=device.id,
                client_id=self.client_id,
                device_code_hash=sha(device_code),
                user_code=user_code,
                interval=POLL_INTERVAL,
                expires_at=now + DEVICE_CODE_TTL,
                uuid=knock.uuid,
                serial=knock.serial,
                source_ip=knock.source_ip,
            )
        )
        # Counted per machine and minute: a client asking for codes in a loop does not flood the audit log.
        refusals.refuse(s, knock.who, "device_code", knock.subject, device, {"user_code": user_code})
        return user_code

    def _check_request_budget(self, s: Session, source_ip: str | None) -> None:
        if not self.requests_per_minute or not source_ip:
            return
        now = utcnow()
        n, oldest = s.execute(
            select(func.count(), func.min(DeviceCode.created_at)).where(
                DeviceCode.source_ip == source_ip, DeviceCode.created_at >= now - CODE_REQUEST_WINDOW
            )
        ).one()
        if n >= self.requests_per_minute:
            wait = TooManyAttempts.seconds_until(oldest + CODE_REQUEST_WINDOW, now)
            raise TooManyAttempts(f"too many console-code requests from this address; try again in {wait} s", wait)

    @staticmethod
    def _supersede_old_codes(s: Session, device_id: int, now: dt.datetime) -> None:
        live = s.scalars(
            select(DeviceCode.id)
            .where(DeviceCode.device_id == device_id, DeviceCode.status == "pending", DeviceCode.expires_at > now)
            .order_by(DeviceCode.id.desc())
            .offset(LIVE_CODES_PER_MACHINE - 1)
        ).all()
        if live:
            s.execute(update(DeviceCode).where(DeviceCode.id.in_(live)).values(status="expired"))

    @staticmethod
    def _free_user_code(s: Session) -> str:
        for _ in range(20):
            raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LEN))
            code = f"{raw[:4]}-{raw[4:]}"
            if s.scalar(select(DeviceCode.id).where(DeviceCode.user_code == code)) is None:
                return code
        raise OAuthError("temporarily_unavailable", "could not allocate a console code", 503)

    def poll(self, form: dict[str, str]) -> dict[str, Any]:
        self._check_client(form.get("client_id"))
        if form.get("grant_type") != GRANT_TYPE:
            raise OAuthError("unsupported_grant_type", f"grant_type must be {GRANT_TYPE}")
        code = form.get("device_code") or ""
        now = utcnow()
        error: OAuthError | None = None
        token = "ktzdev_" + secrets.token_urlsafe(32)
        # Errors are decided inside the transaction but raised after it: the poll bookkeeping (last poll, a
        # slowed-down interval, an expired or denied code) must be committed, not rolled back.
        with self.db.write() as s:
            row = s.scalar(select(DeviceCode).where(DeviceCode.device_code_hash == sha(code)).with_for_update())
            if row is None or row.status == "consumed":
                raise OAuthError("invalid_grant", "unknown or already used device_code")
            device = s.get(Device, row.device_id)
            too_fast = row.last_poll_at is not None and (now - row.last_poll_at).total_seconds() < row.interval - 0.5
            row.last_poll_at = now
            if row.expires_at <= now or row.status == "expired":
                row.status = "expired"
                error = OAuthError("expired_token", "the console code expired; Talos will start over")
            elif too_fast:
                row.interval += 5
                error = OAuthError("slow_down", f"poll every {row.interval} seconds")
            elif device is None or row.status == "denied" or device.status == DeviceStatus.REJECTED.value:
                row.status = "denied"
                error = OAuthError("access_denied", "an operator rejected this machine")
            elif device.status != DeviceStatus.APPROVED.value or not _vouched_for(row, device):
                error = OAuthError("authorization_pending", "waiting for an operator to approve the code")
            else:
                row.status = "consumed"
                row.access_token_hash = sha(token)
                row.token_expires_at = now + ACCESS_TOKEN_TTL
                audit.record(s, Actor.device(None), "device_token", device, {"user_code": row.user_code})
        if error is not None:
            keep_on_refusal()
            raise error
        return {"access_token": token, "token_type": "Bearer", "expires_in": int(ACCESS_TOKEN_TTL.total_seconds())}

    def check_access_token(self, device_id: int, authorization: str | None) -> None:
        """With the device flow on, a config download must carry the token issued to that very device."""
        if not self.enabled:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise PermissionDenied("this Ktizo serves configs only with the token of the OAuth device flow")
        with self.db.read() as s:
            row = s.scalar(select(DeviceCode).where(DeviceCode.access_token_hash == sha(token)))
        valid = row is not None and hmac.compare_digest(row.access_token_hash or "", sha(token))
        if (
            not valid
            or row is None
            or row.device_id != device_id
            or (row.token_expires_at and row.token_expires_at <= utcnow())
        ):
            raise PermissionDenied("that token was not issued to this machine")


def _vouched_for(code: DeviceCode, device: Device) -> bool:
    """May this flow have the approved device's token? Yes when an operator approved this very code. When the
    device was approved otherwise (device list, API, CLI), anyone can start a flow naming its MAC, so the flow
    must have been waiting at the time of that approval and must have reported the SMBIOS identity the device
    is bound to; any other flow needs its own code approved."""
    if code.status == "approved":
        return True
    if device.approved_at is None or code.created_at > device.approved_at:
        return False
    if not device.uuid or code.uuid != device.uuid:
        return False
    return not (device.serial and code.serial and code.serial != device.serial)
