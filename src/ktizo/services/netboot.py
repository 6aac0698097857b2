"""Network boot use cases: the iPXE scripts, DHCP discovery events, Talos's OAuth2 device flow (console codes)
and the expiry of discovered devices nobody approved."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import CursorResult

from ktizo.db import Database
from ktizo.db.models import AuditEvent, Device, DeviceCode, ServiceToken
from ktizo.db.types import utcnow
from ktizo.domain.devices import DeviceStatus, Source
from ktizo.domain.errors import (
    KtizoError,
    NotFound,
    PermissionDenied,
    TooManyAttempts,
    Unauthenticated,
    ValidationFailed,
)
from ktizo.domain.identity import is_placeholder, normalize_ip, normalize_mac, normalize_serial, normalize_uuid
from ktizo.domain.users import UserRole
from ktizo.services import audit
from ktizo.services.context import Actor
from ktizo.services.devices import DeviceChanges, DeviceService, check_new_device_budget, insert_ignoring_conflict
from ktizo.services.watch import ApprovalWatcher

# Console codes: consonants only (no words, nothing to confuse with 0/O or 1/I), shown as XXXX-XXXX.
_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
_CODE_LEN = 8
DEVICE_CODE_TTL = dt.timedelta(minutes=30)
# As long as Talos keeps retrying one acquisition (3 h): a download that failed after the token was issued
# (no base config yet, say) must still work when the operator fixes it.
ACCESS_TOKEN_TTL = dt.timedelta(hours=3)
POLL_INTERVAL = 5
# Wrong console codes an operator may type before being locked out for a while.
CODE_MISSES_ALLOWED = 10
CODE_MISS_WINDOW = dt.timedelta(minutes=15)
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"

_ARCH = {"x86_64": "amd64", "i386": "amd64", "amd64": "amd64", "arm64": "arm64", "aarch64": "arm64"}
_FACT = re.compile(r"[A-Za-z0-9 ._,()\[\]/+#-]{1,64}")  # Lenovo: "ThinkSystem SR650 -[7X06CTO1WW]-"
_ARCH_NAME = re.compile(r"[a-z0-9_]{1,16}")
_SAFE_URL = re.compile(r"[A-Za-z0-9:/._%?=&\[\]-]+")
# What Talos needs on the kernel command line (shared/research/talos.md §1.7) plus consoles for both worlds.
KERNEL_ARGS = "talos.platform=metal console=tty0 console=ttyS0 init_on_alloc=1 slab_nomerge pti=on printk.devkmsg=on"


class OAuthError(KtizoError):
    """An RFC 6749/8628 error answer: ``error`` is the code a client acts on."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.status = status


@dataclass(frozen=True)
class BootFacts:
    """What iPXE reports about the machine, validated; None where unknown."""

    mac: str
    uuid: str | None = None
    serial: str | None = None
    manufacturer: str | None = None
    product: str | None = None
    arch: str | None = None  # iPXE's ${buildarch}
    platform: str | None = None  # pcbios | efi
    ip: str | None = None

    def as_facts(self) -> dict[str, str]:
        names = ("manufacturer", "product", "arch", "platform", "ip")
        facts = {n if n != "ip" else "ipxe_ip": getattr(self, n) for n in names if getattr(self, n)}
        return facts


def _fact(value: str | None) -> str | None:
    """A free-text fact: kept only if it is short printable text (it is shown to operators, never scripted)."""
    if value is None or is_placeholder(value):
        return None
    text = value.strip()
    return text if _FACT.fullmatch(text) else None


def parse_boot_facts(query: dict[str, str]) -> BootFacts:
    mac = query.get("mac")
    if mac is None or is_placeholder(mac):
        raise ValidationFailed("iPXE sent no MAC address", "mac")
    uuid = query.get("uuid")
    serial = query.get("serial")
    ip = query.get("ip")
    try:
        ip_value = normalize_ip(ip, "ip") if ip and not is_placeholder(ip) else None
    except ValidationFailed:
        ip_value = None
    try:
        serial_value = normalize_serial(serial) if serial and not is_placeholder(serial) else None
    except ValidationFailed:
        serial_value = None
    arch = query.get("arch")
    platform = query.get("platform")
    return BootFacts(
        mac=normalize_mac(mac, "mac"),
        uuid=normalize_uuid(uuid) if uuid and not is_placeholder(uuid) else None,
        serial=serial_value if serial_value and _FACT.fullmatch(serial_value) else None,
        manufacturer=_fact(query.get("manufacturer")),
        product=_fact(query.get("product")),
        # Keep any sane architecture name iPXE reports: one Talos has no build for must be refused, not booted.
        arch=arch if arch and _ARCH_NAME.fullmatch(arch) else None,
        platform=platform if platform in ("pcbios", "efi") else None,
        ip=ip_value,
    )


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def normalize_user_code(code: str) -> str:
    text = re.sub(r"[\s-]", "", code).upper()
    if len(text) != _CODE_LEN or any(c not in _CODE_ALPHABET for c in text):
        raise ValidationFailed("a console code is 8 letters like BCDF-GHJK", "user_code")
    return f"{text[:4]}-{text[4:]}"


def _script_url(url: str) -> str:
    # Everything that reaches an iPXE script line is built from validated parts; this is the last guard.
    if not _SAFE_URL.fullmatch(url):
        raise ValidationFailed("refusing to put an unsafe URL into an iPXE script", "public_url")
    return url


class NetbootService:
    def __init__(
        self,
        db: Database,
        devices: DeviceService,
        watcher: ApprovalWatcher,
        *,
        assets_dir: Path,
        talos_version: str,
        oauth_enabled: bool = False,
        oauth_client_id: str = "ktizo",
        discovery_subnets: list[str] | None = None,
    ) -> None:
        self.db = db
        self.devices = devices
        self.watcher = watcher
        self.assets_dir = assets_dir
        self.talos_version = talos_version
        self.oauth_enabled = oauth_enabled
        self.oauth_client_id = oauth_client_id
        self.discovery_subnets = [ipaddress.ip_network(n, strict=False) for n in discovery_subnets or []]

    # -- iPXE ------------------------------------------------------------------------------------------

    @staticmethod
    def entry_script(base_url: str) -> str:
        """``/boot.ipxe``: what DHCP points iPXE at. It chains to the per-machine script with what iPXE knows."""
        base = _script_url(base_url.rstrip("/"))
        query = (
            "mac=${net0/mac}&uuid=${uuid}&serial=${serial:uristring}&manufacturer=${manufacturer:uristring}"
            "&product=${product:uristring}&arch=${buildarch}&platform=${platform}&ip=${net0/ip}"
        )
        return (
            "#!ipxe\n"
            "# Ktizo: hand this machine's identity to Ktizo, which decides what it boots.\n"
            f"chain --autofree {base}/api/v1/boot/ipxe?{query} || goto failed\n"
            ":failed\n"
            "echo Ktizo could not be reached; trying the next boot device in 10 seconds.\n"
            "sleep 10\n"
            "exit 1\n"
        )

    def _asset_version(self) -> str:
        """The newest imported Talos release of the configured minor version (e.g. v1.13.9 for v1.13)."""
        minor = self.talos_version if self.talos_version.startswith("v") else f"v{self.talos_version}"
        root = self.assets_dir / "talos"
        candidates = []
        if root.is_dir():
            for entry in root.iterdir():
                m = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)", entry.name)
                if m and entry.name.startswith(minor + "."):
                    candidates.append((int(m.group(3)), entry.name))
        return max(candidates)[1] if candidates else f"{minor}.0"

    def machine_script(self, facts: BootFacts, base_url: str, source_ip: str | None) -> str:
        """The per-machine decision: boot Talos, or leave the network boot (rejected or installed)."""
        device = self._record_boot(facts, source_ip)
        status = DeviceStatus(device.status)
        if status is DeviceStatus.REJECTED:
            return (
                "#!ipxe\n"
                "echo Ktizo: this machine was rejected by an operator. Booting the next device.\n"
                "sleep 5\n"
                "exit 1\n"
            )
        if device.installed_at is not None:
            return "#!ipxe\necho Ktizo: Talos is installed on this machine; booting from disk.\nexit 0\n"
        arch = _ARCH.get(facts.arch or "x86_64")
        if arch is None:
            return (
                "#!ipxe\n"
                "echo Ktizo: Talos has no build for this machine's architecture (amd64 and arm64 only).\n"
                "sleep 10\n"
                "exit 1\n"
            )
        base = _script_url(base_url.rstrip("/"))
        version = self._asset_version()
        assets = f"{base}/assets/talos/{version}/{arch}"
        # iPXE expands ${...} itself and has no escape, so the MAC it booted from is written out already
        # expanded; uuid and serial are left for iPXE to fill in (the same SMBIOS values Talos would use).
        config = _script_url(f"{base}/api/v1/config/download?mac={quote(facts.mac, safe='')}")
        args = f"{KERNEL_ARGS} initrd=initramfs.xz talos.config={config}&uuid=${{uuid}}&serial=${{serial:uristring}}"
        if self.oauth_enabled:
            args += (
                f" talos.config.oauth.client_id={self.oauth_client_id}"
                " talos.config.oauth.extra_variable=mac talos.config.oauth.extra_variable=uuid"
                " talos.config.oauth.extra_variable=serial"
            )
        return (
            "#!ipxe\n"
            f"echo Ktizo: booting Talos {version} ({arch}); this machine is {status.value}.\n"
            f"kernel {assets}/vmlinuz {args} || goto failed\n"
            f"initrd {assets}/initramfs.xz || goto failed\n"
            "boot || goto failed\n"
            ":failed\n"
            "echo Ktizo: could not load Talos; is `ktizo assets fetch` done? Retrying in 30 seconds.\n"
            "sleep 30\n"
            "reboot\n"
        )

    def _record_boot(self, facts: BootFacts, source_ip: str | None) -> Device:
        now = utcnow()
        with self.db.write() as s:
            try:
                check_new_device_budget(s, facts.mac, source_ip, self.devices.new_per_minute)
            except TooManyAttempts:
                # Boot it all the same, unrecorded: Talos's config request registers it once this address is
                # within its budget again (Talos retries), and nothing secret is in an iPXE script.
                return Device(mac_address=facts.mac, status=DeviceStatus.PENDING.value)
            new_id = insert_ignoring_conflict(
                s,
                {
                    "mac_address": facts.mac,
                    "uuid": facts.uuid,
                    "serial": facts.serial,
                    "status": "pending",
                    "role": "worker",
                    "notes": "",
                    "source": Source.IPXE.value,
                    "facts": facts.as_facts(),
                    "first_seen": now,
                    "last_seen": now,
                    "last_ip": source_ip,
                    "revision": 1,
                },
            )
            device = s.scalar(select(Device).where(Device.mac_address == facts.mac))
            assert device is not None
            if new_id is not None:
                audit.record(s, Actor.device(source_ip), "register", device, {"source": Source.IPXE.value})
            else:
                device.facts = {**(device.facts or {}), **facts.as_facts()}
                device.last_seen, device.last_ip = now, source_ip
                # Bind identity factors iPXE reports for the first time, as the config download does.
                if not device.uuid and facts.uuid:
                    device.uuid = facts.uuid
                if not device.serial and facts.serial:
                    device.serial = facts.serial
        return device

    # -- DHCP discovery --------------------------------------------------------------------------------

    def issue_dhcp_token(self, path: Path) -> str:
        """A fresh token for the local dnsmasq's event hook: its hash in the database, the token in ``path``."""
        token = "ktzdhcp_" + secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)  # an existing file keeps its old mode through O_TRUNC
            f.write(token + "\n")
        with self.db.write() as s:
            row = s.get(ServiceToken, "dhcp")
            if row is None:
                s.add(ServiceToken(name="dhcp", token_hash=_sha(token)))
            else:
                row.token_hash, row.created_at = _sha(token), utcnow()
        return token

    def check_dhcp_token(self, token: str | None) -> None:
        with self.db.read() as s:
            row = s.get(ServiceToken, "dhcp")
        if not token or row is None or not hmac.compare_digest(row.token_hash, _sha(token)):
            raise Unauthenticated("not the DHCP event token of this Ktizo's dnsmasq")

    def dhcp_event(self, action: str, mac: str, ip: str, hostname: str | None) -> str:
        """Record a lease: an unknown MAC becomes a pending device (source dhcp). Returns what was done."""
        if action not in ("add", "old", "del"):
            raise ValidationFailed("action is add, old or del", "action")
        address = ipaddress.ip_address(ip)
        if self.discovery_subnets and not any(address in net for net in self.discovery_subnets):
            return "ignored: outside the discovery subnets"
        now = utcnow()
        facts: dict[str, Any] = {"lease_ip": str(address)}
        if hostname and _fact(hostname):
            facts["dhcp_hostname"] = hostname
        with self.db.write() as s:
            device = s.scalar(select(Device).where(Device.mac_address == mac))
            if device is None:
                if action == "del":
                    return "ignored: unknown MAC released its lease"
                new_id = insert_ignoring_conflict(
                    s,
                    {
                        "mac_address": mac,
                        "status": "pending",
                        "role": "worker",
                        "notes": "",
                        "source": Source.DHCP.value,
                        "facts": facts,
                        "first_seen": now,
                        "last_seen": now,
                        "last_ip": str(address),
                        "lease_ip": str(address),
                        "revision": 1,
                    },
                )
                if new_id is not None:
                    audit.record(
                        s,
                        Actor(name="dnsmasq", kind="system"),
                        "register",
                        s.get(Device, new_id),
                        {"source": Source.DHCP.value, "lease_ip": str(address)},
                    )
                return "registered"
            if action == "del":
                if device.lease_ip == str(address):
                    device.lease_ip = None
                return "lease released"
            device.lease_ip = str(address)
            device.last_seen = now
            device.facts = {**(device.facts or {}), **facts}
        return "updated"

    # -- OAuth2 device authorization grant (RFC 8628), as Talos runs it -------------------------------

    def _check_client(self, client_id: str | None) -> None:
        if not self.oauth_enabled:
            raise OAuthError(
                "invalid_client", "the OAuth device flow is not enabled on this Ktizo (KTIZO_OAUTH_ENABLED)", 401
            )
        if client_id != self.oauth_client_id:
            raise OAuthError("invalid_client", "unknown client_id", 401)

    def start_device_flow(self, form: dict[str, str], base_url: str, source_ip: str | None) -> dict[str, Any]:
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
        with self.db.write() as s:
            try:
                check_new_device_budget(s, mac_value, source_ip, self.devices.new_per_minute)
            except TooManyAttempts as exc:
                raise OAuthError("temporarily_unavailable", exc.message, 429) from None
            new_id = insert_ignoring_conflict(
                s,
                {
                    "mac_address": mac_value,
                    "uuid": uuid_value,
                    "serial": serial_value,
                    "status": "pending",
                    "role": "worker",
                    "notes": "",
                    "source": Source.DEVICE_CODE.value,
                    "facts": {},
                    "first_seen": now,
                    "last_seen": now,
                    "last_ip": source_ip,
                    "revision": 1,
                },
            )
            device = s.scalar(select(Device).where(Device.mac_address == mac_value))
            assert device is not None
            if new_id is not None:
                audit.record(s, Actor.device(source_ip), "register", device, {"source": Source.DEVICE_CODE.value})
            if device.uuid and uuid_value and device.uuid != uuid_value:
                raise OAuthError("access_denied", "this MAC is bound to another machine's UUID")
            user_code = self._free_user_code(s)
            s.add(
                DeviceCode(
                    device_id=device.id,
                    client_id=self.oauth_client_id,
                    device_code_hash=_sha(device_code),
                    user_code=user_code,
                    interval=POLL_INTERVAL,
                    expires_at=now + DEVICE_CODE_TTL,
                    uuid=uuid_value,
                    serial=serial_value,
                )
            )
            audit.record(s, Actor.device(source_ip), "device_code", device, {"user_code": user_code})
        verify = f"{base_url.rstrip('/')}/ui/device-codes"
        return {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": verify,
            "verification_uri_complete": f"{verify}?code={user_code}",
            "expires_in": int(DEVICE_CODE_TTL.total_seconds()),
            "interval": POLL_INTERVAL,
        }

    @staticmethod
    def _free_user_code(s: Any) -> str:
        for _ in range(20):
            raw = "".join(secrets.choice(_CODE_ALPHABET) for _ in range(_CODE_LEN))
            code = f"{raw[:4]}-{raw[4:]}"
            if s.scalar(select(DeviceCode.id).where(DeviceCode.user_code == code)) is None:
                return code
        raise OAuthError("temporarily_unavailable", "could not allocate a console code", 503)

    def poll_token(self, form: dict[str, str]) -> dict[str, Any]:
        self._check_client(form.get("client_id"))
        if form.get("grant_type") != GRANT_TYPE:
            raise OAuthError("unsupported_grant_type", f"grant_type must be {GRANT_TYPE}")
        code = form.get("device_code") or ""
        now = utcnow()
        error: OAuthError | None = None
        token = "ktzdev_" + secrets.token_urlsafe(32)
        # Errors are decided inside the transaction but raised after it: the poll bookkeeping (last poll,
        # a slowed-down interval, an expired or denied code) must be committed, not rolled back.
        with self.db.write() as s:
            row = s.scalar(select(DeviceCode).where(DeviceCode.device_code_hash == _sha(code)).with_for_update())
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
                row.access_token_hash = _sha(token)
                row.token_expires_at = now + ACCESS_TOKEN_TTL
                audit.record(s, Actor.device(None), "device_token", device, {"user_code": row.user_code})
        if error is not None:
            raise error
        return {"access_token": token, "token_type": "Bearer", "expires_in": int(ACCESS_TOKEN_TTL.total_seconds())}

    def check_access_token(self, device_id: int, authorization: str | None) -> None:
        """With the device flow on, a config download must carry the token issued to that very device."""
        if not self.oauth_enabled:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise PermissionDenied("this Ktizo serves configs only with the token of the OAuth device flow")
        with self.db.read() as s:
            row = s.scalar(select(DeviceCode).where(DeviceCode.access_token_hash == _sha(token)))
        if row is None or row.device_id != device_id or (row.token_expires_at and row.token_expires_at <= utcnow()):
            raise PermissionDenied("that token was not issued to this machine")

    # -- console codes, for operators --------------------------------------------------------------------

    def _code_row(self, actor: Actor, code: str) -> DeviceCode:
        user_code = normalize_user_code(code)
        since = utcnow() - CODE_MISS_WINDOW
        with self.db.read() as s:
            misses = (
                s.scalar(
                    select(func.count())
                    .select_from(AuditEvent)
                    .where(
                        AuditEvent.action == "device_code_miss", AuditEvent.actor == actor.name, AuditEvent.at >= since
                    )
                )
                or 0
            )
            if misses >= CODE_MISSES_ALLOWED:
                raise PermissionDenied(
                    f"too many wrong console codes ({misses} in {int(CODE_MISS_WINDOW.total_seconds() // 60)} "
                    "minutes); wait before trying again"
                )
            row = s.scalar(select(DeviceCode).where(DeviceCode.user_code == user_code))
        if row is None or row.status != "pending" or row.expires_at <= utcnow():
            with self.db.write() as s:
                audit.record(s, actor, "device_code_miss", None, {"user_code": user_code})
            raise NotFound(f"no machine is waiting with console code {user_code}")
        return row

    def lookup_code(self, actor: Actor, code: str) -> Device:
        actor.require(UserRole.OPERATOR)
        row = self._code_row(actor, code)
        return self.devices.get(row.device_id)

    def approve_code(self, actor: Actor, code: str, changes: DeviceChanges) -> Device:
        """Approve the machine showing ``code``: the code and the device change in one transaction, so a token
        poll can never see one without the other."""
        actor.require(UserRole.OPERATOR)
        row = self._code_row(actor, code)
        with self.db.write() as s:
            result = s.execute(
                update(DeviceCode)
                .where(DeviceCode.id == row.id, DeviceCode.status == "pending")
                .values(status="approved", approved_by=actor.name)
            )
            claimed = cast("CursorResult[Any]", result).rowcount
            if not claimed:
                raise NotFound(f"no machine is waiting with console code {row.user_code}")
            device = s.scalar(select(Device).where(Device.id == row.device_id).with_for_update())
            if device is None:
                raise NotFound(f"no machine is waiting with console code {row.user_code}")
            if device.status != DeviceStatus.APPROVED.value or changes.items():
                # Approving an approved device with new fields is the same 409 as a direct approval.
                device = self.devices.approve_in(s, actor, device, changes)
        self.devices.notify(device.id)
        return device

    # -- expiry ------------------------------------------------------------------------------------------

    def expire_discovered(self, older_than: dt.timedelta) -> int:
        """Remove pending devices that were discovered (not pre-registered) and never approved in time."""
        cutoff = utcnow() - older_than
        actor = Actor.system("expiry")
        with self.db.write() as s:
            stmt = (
                select(Device)
                .where(
                    Device.status == DeviceStatus.PENDING.value,
                    Device.source != Source.MANUAL.value,
                    Device.first_seen < cutoff,
                )
                .limit(1000)
            )
            if s.get_bind().dialect.name == "postgresql":
                # Two replicas running the job at once each take different rows, never the same twice.
                stmt = stmt.with_for_update(skip_locked=True)
            rows = list(s.scalars(stmt))
            for device in rows:
                audit.record(
                    s, actor, "expire", device, {"source": device.source, "first_seen": device.first_seen.isoformat()}
                )
            if rows:
                s.execute(delete(Device).where(Device.id.in_([d.id for d in rows])))
        return len(rows)


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
