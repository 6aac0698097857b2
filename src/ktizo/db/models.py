"""Tables. Every invariant that must hold across replicas (one row per MAC, unique token hashes) is a constraint."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, validates

from ktizo.db.types import UTCDateTime, utcnow

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Device(Base):
    """A machine at the door: a Talos machine (known by MAC, bound to its SMBIOS UUID and serial) or an agent host
    (known by its machine-id). One registry, one state machine, one audit log for both.

    Two approved machines never share a hostname or a static address: partial unique indexes over approved rows,
    on ``hostname`` (always stored lower-cased) and ``static_ip`` (``ip_address`` without its prefix, kept in step
    by the validators below; the Core statements of the boot path never write either column)."""

    __tablename__ = "devices"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'approved', 'rejected')", name="status"),
        CheckConstraint("role IN ('controlplane', 'worker')", name="role"),
        CheckConstraint("kind IN ('talos', 'agent')", name="kind"),
        CheckConstraint(
            "(kind = 'talos' AND role IS NOT NULL) OR "
            "(kind = 'agent' AND role IS NULL AND (machine_id IS NOT NULL OR machine_uid IS NOT NULL))",
            name="kind_fields",
        ),
        Index("ix_devices_first_ip_first_seen", "first_ip", "first_seen"),
        Index(
            "uq_devices_approved_hostname",
            "hostname",
            unique=True,
            sqlite_where=text("status = 'approved' AND hostname IS NOT NULL"),
            postgresql_where=text("status = 'approved' AND hostname IS NOT NULL"),
        ),
        Index(
            "uq_devices_approved_address",
            "static_ip",
            unique=True,
            sqlite_where=text("status = 'approved' AND static_ip IS NOT NULL"),
            postgresql_where=text("status = 'approved' AND static_ip IS NOT NULL"),
        ),
        # A machine known only by its SMBIOS UUID must not be created twice by concurrent first contacts.
        Index(
            "uq_devices_uuid_without_mac",
            "uuid",
            unique=True,
            sqlite_where=text("mac_address IS NULL"),
            postgresql_where=text("mac_address IS NULL"),
        ),
        # The audit log refers to devices by id after they are deleted: SQLite must never hand a deleted
        # device's id to a new one (PostgreSQL's sequence never does).
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="talos", server_default="talos")
    machine_id: Mapped[str | None] = mapped_column(String(64), unique=True)  # agents: /etc/machine-id
    mac_address: Mapped[str | None] = mapped_column(String(17), unique=True)
    uuid: Mapped[str | None] = mapped_column(String(36), index=True)
    serial: Mapped[str | None] = mapped_column(String(128), index=True)
    hostname: Mapped[str | None] = mapped_column(String(253), index=True)
    ip_address: Mapped[str | None] = mapped_column(String(64))
    static_ip: Mapped[str | None] = mapped_column(String(45))  # ip_address without the prefix, for uniqueness
    role: Mapped[str | None] = mapped_column(String(16), default="worker")  # Talos machines only
    status: Mapped[str] = mapped_column(String(16), default="pending", server_default="pending", index=True)
    notes: Mapped[str] = mapped_column(Text, default="", server_default="")
    source: Mapped[str] = mapped_column(String(16), default="manual", server_default="manual")
    facts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    first_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    last_seen: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_ip: Mapped[str | None] = mapped_column(String(45))
    first_ip: Mapped[str | None] = mapped_column(String(45))  # never changes: the new-machine budget counts it
    # Indexed: every worker's ApprovalWatcher asks several times a second what was decided since its last look.
    approved_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, index=True)
    approved_by: Mapped[str | None] = mapped_column(String(64))
    rejected_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, index=True)
    rejected_by: Mapped[str | None] = mapped_column(String(64))
    last_config_download: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict, server_default="{}")
    patch: Mapped[str | None] = mapped_column(Text)  # the device's own strategic-merge patch
    install_disk: Mapped[str | None] = mapped_column(String(255))
    lease_ip: Mapped[str | None] = mapped_column(String(45))  # from dnsmasq: a second identity factor
    installed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)  # then iPXE boots the local disk
    # Agents: the FQDN and the addresses their certificate names (set at approval from what the host reported and
    # the operator accepted), and where `ktizo agents probe` reaches the agent (the check-in's peer and port).
    fqdn: Mapped[str | None] = mapped_column(String(253))
    addresses: Mapped[list[str]] = mapped_column(JSON, default=list, server_default="[]")
    agent_address: Mapped[str | None] = mapped_column(String(64))
    # Zero-touch agents: their site, the machine_uid they enrolled with (a hash of the machine-id and Ktizo's CA
    # fingerprint), the version of the site key they used, and whether they are active or held at the collision gate.
    site_id: Mapped[int | None] = mapped_column(ForeignKey("sites.id", ondelete="SET NULL"), index=True)
    machine_uid: Mapped[str | None] = mapped_column(String(80), unique=True)
    key_version: Mapped[int | None] = mapped_column(Integer)
    # Pre-registered by ``ktizo apply`` with ``status: approved`` where approval must wait for the machine (an
    # agent's certificate needs its enrollment): who asked. The first knock with this identity approves it.
    approve_on_arrival: Mapped[str | None] = mapped_column(String(64))
    extra_nics: Mapped[list[dict[str, Any]]] = mapped_column(
        JSON, default=list, server_default="[]"
    )  # [{mac, addresses: [...]}]
    # Bumped by every change that alters what the device is served; rendered configs are cached per revision.
    revision: Mapped[int] = mapped_column(Integer, default=1, server_default="1")

    @validates("hostname")
    def _lower_hostname(self, _key: str, value: str | None) -> str | None:
        return value.lower() if value else value

    @validates("ip_address")
    def _derive_static_ip(self, _key: str, value: str | None) -> str | None:
        self.static_ip = value.split("/")[0] if value else None
        return value


class User(Base):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint("role IN ('viewer', 'operator', 'admin')", name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_login_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user", cascade="all, delete-orphan")


class ApiToken(Base):
    """A bearer token; only its SHA-256 is kept (tokens are 256-bit random, so a fast hash is enough)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64), default="")
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    user: Mapped[User] = relationship(back_populates="tokens")


class AuditEvent(Base):
    """Append-only (database triggers refuse UPDATE and DELETE). ``device_id`` is not a foreign key on purpose:
    a deleted device keeps its history."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_device_at", "device_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64), index=True)
    actor_type: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(32), index=True)
    device_id: Mapped[int | None] = mapped_column(Integer)
    device_mac: Mapped[str | None] = mapped_column(String(17))
    source_ip: Mapped[str | None] = mapped_column(String(45))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # A refusal repeated within a minute is one audit row; the count of repeats is kept in ``refusals``.
    refusal_id: Mapped[int | None] = mapped_column(Integer)


class Refusal(Base):
    """Repeated refusals (failed sign-ins, identity mismatches, wrong console codes, console-code requests) counted
    per subject, source address and minute: an attacker hammering a door makes one row a minute, not thousands, and
    the throttles sum these counts (in the database, so every replica agrees)."""

    __tablename__ = "refusals"
    __table_args__ = (
        UniqueConstraint("action", "subject", "source_ip", "minute", name="uq_refusals_action_subject_minute"),
        Index("ix_refusals_action_source_minute", "action", "source_ip", "minute"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    action: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(200))
    source_ip: Mapped[str] = mapped_column(String(45), default="", server_default="")
    minute: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    count: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    first_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    device_id: Mapped[int | None] = mapped_column(Integer)


class AuditRetention(Base):
    """One row: audit rows older than ``prune_before`` may be deleted (the triggers refuse every other DELETE);
    only the retention job moves it (``KTIZO_AUDIT_RETENTION_DAYS``)."""

    __tablename__ = "audit_retention"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prune_before: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class ConfigState(Base):
    """One row whose revision moves whenever anything configs are rendered from changes (cluster settings,
    base configs, secrets, groups). Every replica compares it on the boot path to know when to reload."""

    __tablename__ = "config_state"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


class ClusterSettings(Base):
    """The cluster's parameters (one row, id 1): what ``generate`` turns into base configs."""

    __tablename__ = "cluster_settings"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cluster_name: Mapped[str | None] = mapped_column(String(63))
    endpoint: Mapped[str | None] = mapped_column(String(255))
    talos_version: Mapped[str | None] = mapped_column(String(16))  # None: KTIZO_TALOS_VERSION
    kubernetes_version: Mapped[str | None] = mapped_column(String(32))
    install_disk: Mapped[str | None] = mapped_column(String(255), default="/dev/sda")
    install_image: Mapped[str | None] = mapped_column(String(255))
    pod_subnets: Mapped[list[str]] = mapped_column(JSON, default=lambda: ["10.244.0.0/16"])
    service_subnets: Mapped[list[str]] = mapped_column(JSON, default=lambda: ["10.96.0.0/12"])
    dns_domain: Mapped[str] = mapped_column(String(253), default="cluster.local")
    cert_sans: Mapped[list[str]] = mapped_column(JSON, default=list)
    gateway: Mapped[str | None] = mapped_column(String(45))
    nameservers: Mapped[list[str]] = mapped_column(JSON, default=list)
    revision: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    updated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    updated_by: Mapped[str | None] = mapped_column(String(64))


class ClusterSecrets(Base):
    """The Talos secrets bundle (one row, id 1), sealed when a secret key is configured."""

    __tablename__ = "cluster_secrets"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    bundle: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    source: Mapped[str] = mapped_column(String(16))  # generated | imported


class BaseConfigRow(Base):
    """The base config of a role, sealed when a secret key is configured (a controlplane config holds CA keys)."""

    __tablename__ = "base_configs"
    __table_args__ = (CheckConstraint("role IN ('controlplane', 'worker')", name="role"),)

    role: Mapped[str] = mapped_column(String(16), primary_key=True)
    content: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16))  # generated | uploaded
    revision: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(64))


class DeviceGroup(Base):
    """Config templates per group of devices: a strategic-merge patch and network defaults, chosen by labels
    or explicit membership, applied in priority order (lowest first, so the highest priority wins)."""

    __tablename__ = "device_groups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    priority: Mapped[int] = mapped_column(Integer, default=100, server_default="100")
    selector: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    patch: Mapped[str | None] = mapped_column(Text)
    gateway: Mapped[str | None] = mapped_column(String(45))
    nameservers: Mapped[list[str]] = mapped_column(JSON, default=list)
    description: Mapped[str] = mapped_column(Text, default="", server_default="")
    revision: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class GroupMember(Base):
    __tablename__ = "group_members"

    group_id: Mapped[int] = mapped_column(ForeignKey("device_groups.id", ondelete="CASCADE"), primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True, index=True)


class DeviceCode(Base):
    """Talos's OAuth2 device authorization grant (RFC 8628): the code on the machine's console that an
    operator approves. Only hashes of the device code and the access token are kept."""

    __tablename__ = "device_codes"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'approved', 'denied', 'consumed', 'expired')", name="status"),
        Index("ix_device_codes_source_ip_created_at", "source_ip", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    client_id: Mapped[str] = mapped_column(String(64))
    device_code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_code: Mapped[str] = mapped_column(String(16), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="pending", server_default="pending")
    interval: Mapped[int] = mapped_column(Integer, default=5, server_default="5")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    last_poll_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    access_token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    token_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    approved_by: Mapped[str | None] = mapped_column(String(64))
    # What the machine said it was when it asked for the code: a device approved from the device list (not by
    # its code) hands a token only to a flow that proved the identity the device is bound to.
    uuid: Mapped[str | None] = mapped_column(String(36))
    serial: Mapped[str | None] = mapped_column(String(128))
    source_ip: Mapped[str | None] = mapped_column(String(45))  # console-code requests per address are budgeted


class ServiceToken(Base):
    """Credentials of Ktizo's own helpers (the dnsmasq DHCP-event hook), kept as SHA-256."""

    __tablename__ = "service_tokens"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Authority(Base):
    """Ktizo's agent CA: one row, made on first use. The key is sealed when a secret key is configured and never
    leaves the services."""

    __tablename__ = "pki_authority"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cert_pem: Mapped[str] = mapped_column(Text)
    key: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(71))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Enrollment(Base):
    """An agent's enrollment request while it is live: pending, or approved with its certificate waiting for the
    one pickup. At most one per machine; the polling token is stored as its SHA-256 and dies with the row."""

    __tablename__ = "enrollments"
    __table_args__ = (CheckConstraint("status IN ('pending', 'approved', 'rejected')", name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    csr_pem: Mapped[str] = mapped_column(Text)
    key_type: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="pending", server_default="pending")
    certificate_serial: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    source_ip: Mapped[str | None] = mapped_column(String(45))
    # Zero-touch: the site and key version it came with, and, at the collision gate, what the claimant reported
    # (the machine it collides with is ``device_id``; nothing is minted until an operator decides).
    site_id: Mapped[int | None] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"))
    key_version: Mapped[int | None] = mapped_column(Integer)
    collision: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    claim: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default="{}")


class AgentCertificate(Base):
    """Every certificate the agent CA issued. Kept after its machine is purged (``device_id`` then NULL) until it
    expires, so the CRL goes on listing it."""

    __tablename__ = "agent_certificates"

    serial: Mapped[str] = mapped_column(String(40), primary_key=True)  # hex, 32 digits
    device_id: Mapped[int | None] = mapped_column(ForeignKey("devices.id", ondelete="SET NULL"), index=True)
    machine_id: Mapped[str] = mapped_column(String(64))
    cert_pem: Mapped[str] = mapped_column(Text)
    not_before: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    not_after: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    issued_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    issued_by: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(16))  # enroll | renew
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, index=True)
    revoked_by: Mapped[str | None] = mapped_column(String(64))


class Site(Base):
    """A site whose agents enroll with its key, without an operator when its policy is ``auto-approve``."""

    __tablename__ = "sites"
    __table_args__ = (CheckConstraint("enrollment_policy IN ('auto-approve', 'manual')", name="policy"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site_code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="", server_default="")
    enrollment_policy: Mapped[str] = mapped_column(String(16), default="auto-approve", server_default="auto-approve")
    max_pending: Mapped[int | None] = mapped_column(Integer)
    max_agents: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(64), default="", server_default="")


class SiteKey(Base):
    """A site's enrollment key (``cek_…``): its Argon2id hash, version and fingerprint. Exactly one is active per
    site (a partial unique index); a rotation deactivates the old one and inserts the next in one transaction."""

    __tablename__ = "site_enrollment_keys"
    __table_args__ = (
        UniqueConstraint("site_id", "version", name="uq_site_enrollment_keys_site_version"),
        Index(
            "uq_site_enrollment_keys_active",
            "site_id",
            unique=True,
            sqlite_where=text("active"),
            postgresql_where=text("active"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    key_hash: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(4))
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    max_uses: Mapped[int | None] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    deactivated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class AgentApiKey(Base):
    """A zero-touch agent's API key (``cak_<id>_<secret>``): the secret's SHA-256, never the secret."""

    __tablename__ = "agent_api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[int | None] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class Event(Base):
    """The outbox: one row per event worth telling the world (a machine discovered, approved, downloading…),
    written by ``audit.record`` in the transaction of the change itself, so an event exists exactly when its change
    does. The webhook dispatcher and the GitOps writer each take the rows still marked for them."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_webhooks_pending", "webhooks_pending", "id"),
        Index("ix_events_gitops_pending", "gitops_pending", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    event: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))
    device_id: Mapped[int | None] = mapped_column(Integer)  # not a foreign key: a deletion is an event too
    actor: Mapped[str] = mapped_column(String(64))
    actor_type: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    webhooks_pending: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    gitops_pending: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))


class Rule(Base):
    """An auto-approval rule (``kind: Rule``). ``matched`` counts the machines it decided, against ``max_count``;
    the row is locked while a rule decides, so two replicas never hand out one hostname or exceed the count."""

    __tablename__ = "rules"
    __table_args__ = (CheckConstraint("action IN ('approve', 'reject')", name="action"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    priority: Mapped[int] = mapped_column(Integer, default=100, server_default="100")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    match: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    action: Mapped[str] = mapped_column(String(16))
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # role, hostnamePattern, ipRange, labels…
    max_count: Mapped[int | None] = mapped_column(Integer)
    matched: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    revision: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    author: Mapped[str] = mapped_column(String(64))
    author_role: Mapped[str] = mapped_column(String(16))  # the role of whoever last wrote it
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Webhook(Base):
    """A webhook subscription: events (names or ``*``), a target URL, a signing secret (sealed), a body format."""

    __tablename__ = "webhooks"
    __table_args__ = (CheckConstraint("format IN ('json', 'slack')", name="format"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[str]] = mapped_column(JSON, default=list)
    secret_sealed: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(16), default="json", server_default="json")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(64), default="", server_default="")
    revision: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


class WebhookDelivery(Base):
    """One event for one subscription: made once (the unique pair), claimed by one replica at a time (a lease in
    ``claimed_until``), retried with backoff until delivered or 24 h old."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("webhook_id", "event_id", name="uq_webhook_deliveries_webhook_event"),
        CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="status"),
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    webhook_id: Mapped[int] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"), index=True)
    delivery_id: Mapped[str] = mapped_column(String(36), unique=True)  # X-Ktizo-Delivery
    status: Mapped[str] = mapped_column(String(16), default="pending", server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    claimed_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)


class GitopsState(Base):
    """One row: locked by the replica writing the GitOps repository (one writer at a time), with what was pushed."""

    __tablename__ = "gitops_state"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    head: Mapped[str | None] = mapped_column(String(64))  # the last commit written
    pushed: Mapped[str | None] = mapped_column(String(64))  # the last commit the remote accepted
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class AppliedObject(Base):
    """What ``ktizo apply`` manages: ``--prune`` deletes only objects an earlier apply made or took over, never a
    machine that merely knocked (kubectl's last-applied rule)."""

    __tablename__ = "applied_objects"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # the object's key (a MAC for a Device)
    applied_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    applied_by: Mapped[str] = mapped_column(String(64))
