"""Ktizo's settings: one typed object read from ``KTIZO_*`` environment variables and CLI options.

Nothing reads settings at import time; ``app.create_app`` and the CLI build one and pass it on.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ktizo.pki.sealing import parse_keys


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KTIZO_", extra="ignore")

    data_dir: Path = Field(Path("ktizo-data"), description="Holds the SQLite database and templates/base/.")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL; default sqlite:///<data_dir>/ktizo.db. PostgreSQL: postgresql+psycopg://…",
    )
    host: str = "0.0.0.0"  # noqa: S104 - a provisioning server must be reachable from the machines it boots
    port: int = 8000
    talos_version: str = Field("v1.13", description="Talos version whose config format is served.")
    max_body_bytes: int = Field(64 * 1024, description="Largest request body accepted by most endpoints.")
    max_upload_bytes: int = Field(1024 * 1024, description="Largest base config upload.")
    max_apply_bytes: int = Field(
        64 * 1024 * 1024, description="Largest body of POST /api/v1/apply (100,000 Device documents are ~20 MiB)."
    )
    last_seen_interval: float = Field(
        15.0,
        description="Seconds between last_seen writes for a polling device (saves writes in a boot storm).",
    )
    render_cache_bytes: int = Field(256 * 1024 * 1024, description="Memory for rendered configs.")
    secret_key: str | None = Field(
        None, description="Seals the cluster secrets and base configs in the database (`ktizo secrets generate-key`)."
    )
    secret_key_file: Path | None = Field(None, description="A file holding the secret key(s), one per line.")
    public_url: str | None = Field(
        None,
        description="How machines reach Ktizo, e.g. http://10.0.0.1:8000; used in iPXE scripts and talos.config "
        "(default: the URL the request came in on).",
    )
    long_poll_seconds: float = Field(
        60.0, description="How long a pending device's config request is held open waiting for approval (0: off)."
    )
    oauth_enabled: bool = Field(False, description="Boot Talos with the OAuth2 device flow (console codes).")
    oauth_client_id: str = "ktizo"
    discovery_timeout_hours: float = Field(24.0, description="Never-approved discovered devices expire after this.")
    discovery_subnets: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Only DHCP leases in these CIDRs register devices (empty: all)."
    )
    new_devices_per_minute: int = Field(
        120,
        ge=0,
        description="How many unknown machines one source address may register per minute through the "
        "unauthenticated doors (config download, register, iPXE, device flow), and how many console codes it may "
        "ask for; more get 429 and retry (0: no limit).",
    )
    require_lease_ip: bool = Field(
        False, description="A config download must come from the MAC's current DHCP lease IP (second factor)."
    )
    assets_base_url: str = Field(
        "https://factory.talos.dev/image/376567988ad370138ad8b2698212367b8edcb69b5fd68c80be1f2ec7d603b4ba",
        description="Talos image factory URL (schematic) to fetch vmlinuz/initramfs from.",
    )
    pxe_interface: str | None = Field(None, description="Interface dnsmasq listens on for PXE.")
    dhcp_mode: str = Field("proxy", description="proxy (next to an existing DHCP server) or full (with a range).")
    dhcp_range: str | None = Field(None, description="For full DHCP: START,END[,LEASE], e.g. 10.0.0.100,10.0.0.200,12h")
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="CIDRs of reverse proxies whose X-Forwarded-For / Forwarded headers name the client: the address "
        "used by the throttles, the new-machine budget, the lease check and the audit. Empty: trust no header.",
    )
    audit_retention_days: int = Field(
        400, ge=0, description="Audit rows (and refusal counters) older than this are deleted by a job (0: kept)."
    )
    event_retention_days: int = Field(
        7, ge=0, description="Events handed on to webhooks and GitOps (and their delivery log) are kept this long."
    )
    long_poll_max_held: int = Field(
        0, ge=0, description="Config requests held open at once in all (0: half the connection limit)."
    )
    long_poll_per_address: int = Field(
        16, ge=0, description="Config requests held open at once from one client address; more are answered at once."
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Processes serving requests on one host, sharing the listening sockets (`ktizo serve --workers`).",
    )
    run_jobs: bool = Field(
        True,
        description="Run the background jobs (expiry, webhooks, GitOps, audit retention) in this process. With "
        "--workers, only the first worker runs them; replicas may all run them (each job is claimed in the database).",
    )
    max_connections: int = Field(
        0,
        ge=0,
        description="Connections served at once; more get 503 (0: from the process's file limit, at most 10000).",
    )
    keep_alive_seconds: float = Field(5.0, gt=0, description="An idle kept-alive connection is closed after this.")
    header_timeout_seconds: float = Field(
        5.0, gt=0, description="A connection whose request headers have not all arrived after this is closed."
    )
    login_concurrency: int = Field(
        4, ge=1, description="Password checks (Argon2id, 64 MiB each) run at once; more sign-ins wait their turn."
    )
    mtls_port: int = Field(
        8443,
        ge=0,
        le=65535,
        description="Ktizo's own mTLS listener for agents (check-in, renewal), on the --host address, with a "
        "certificate from the agent CA; it asks every client for a certificate (0: off).",
    )
    agent_cert_days: float = Field(
        30.0, gt=0, le=3650, description="Lifetime of an agent's certificate; agents renew at about 2/3 of it."
    )
    enrollment_ttl_hours: float = Field(
        168.0,
        gt=0,
        description="A pending enrollment (and an approved one whose certificate is never picked up) expires after "
        "this: its polling token dies, the host must enroll again.",
    )
    enroll_poll_seconds: int = Field(
        60, ge=1, le=3600, description="How often a pending agent is told to ask again (poll_interval_seconds)."
    )
    agent_checkin_seconds: int = Field(
        300, ge=5, le=86400, description="How often an enrolled agent checks in over mTLS."
    )
    mtls_names: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra DNS names or IP addresses for the mTLS listener's certificate (the public URL's host, "
        "the --host address and this machine's addresses are always in it).",
    )
    enroll_requests_per_minute: int = Field(
        60, ge=0, description="Enrollment requests one address may make per minute, all enrollment doors (0: no limit)."
    )
    enroll_failures_before_lockout: int = Field(
        5, ge=1, description="Refused site keys from one address for one site before that pair is locked out."
    )
    enroll_lockout_minutes: float = Field(15.0, gt=0, description="How long a (site, address) pair stays locked out.")
    mtls_url: str | None = Field(
        None,
        description="The URL agents use for Ktizo's mTLS door when it is not https://<public host>:<mtls port> "
        "(behind a TLS-terminating proxy that forwards Client-Cert).",
    )
    manager_addresses: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Addresses agents whitelist for Ktizo's probes (default: the address the agent reached Ktizo at).",
    )
    webhook_deny: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="CIDRs webhook targets may not resolve into (e.g. 169.254.0.0/16 for cloud metadata); loopback "
        "and private targets are allowed unless listed here.",
    )
    gitops_repo: Path | None = Field(
        None,
        description="A local git repository (made with `git init` if missing or empty) that every change to a machine "
        "is committed to, as a Tinkerbell Hardware manifest and a Ktizo Device document (see docs/gitops.md).",
    )
    gitops_remote: str | None = Field(
        None, description="Where the GitOps repository is pushed: any URL git accepts, a local path included."
    )
    gitops_branch: str = Field("main", description="The GitOps repository's branch.")
    gitops_namespace: str = Field("tink-system", description="The namespace of the Hardware manifests.")
    gitops_include_patches: bool = Field(
        False, description="Write device patches into the Device documents (patches can hold secrets: off)."
    )
    gitops_interval_seconds: float = Field(5.0, gt=0, description="How often pending changes are committed and pushed.")
    gitops_timeout_seconds: float = Field(30.0, gt=0, description="A git command (a push) taking longer fails.")
    log_level: str = "info"
    access_log: bool = Field(
        False, description="Log every HTTP request (a boot storm makes thousands; the audit log has what matters)."
    )
    metrics_enabled: bool = Field(True, description="Serve Prometheus metrics at /metrics (counts only, no MACs).")
    metrics_token: str | None = Field(
        None, description="When set, /metrics requires Authorization: Bearer <this token> (default: no auth)."
    )

    @field_validator("discovery_subnets", "trusted_proxies", "webhook_deny", mode="before")
    @classmethod
    def _cidr_list(cls, value: Any) -> Any:
        """A JSON list, or CIDRs separated by commas (what a shell user writes); each must be a network."""
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else [p.strip() for p in text.split(",") if p.strip()]
        if isinstance(value, list):
            for item in value:
                ipaddress.ip_network(str(item), strict=False)  # ValueError: pydantic names the setting
        return value

    @field_validator("mtls_names", "manager_addresses", mode="before")
    @classmethod
    def _name_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else [p.strip() for p in text.split(",") if p.strip()]
        return value

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    def secret_keys(self) -> list[str]:
        """The sealing keys, newest first (the first seals, all open: how a key is rotated)."""
        text = self.secret_key or ""
        if self.secret_key_file is not None:
            text = self.secret_key_file.read_text() + "," + text
        return parse_keys(text)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'ktizo.db'}"

    @property
    def base_templates_dir(self) -> Path:
        return self.data_dir / "templates" / "base"

    @property
    def assets_dir(self) -> Path:
        return self.data_dir / "assets"

    @property
    def pxe_dir(self) -> Path:
        """dnsmasq's state: its config, lease file, TFTP root and the DHCP event token."""
        return self.data_dir / "pxe"
