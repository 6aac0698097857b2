"""Settings in, services out: what every Ktizo process (server, CLI command, test) runs on. No web framework here,
so a CLI command does not pay for importing one."""

from __future__ import annotations

import datetime as dt

from ktizo.db import Database
from ktizo.pki.sealing import Sealer
from ktizo.services.agents import AgentService
from ktizo.services.audit import AuditService
from ktizo.services.authority import AuthorityService
from ktizo.services.boot import BootService
from ktizo.services.bulk import BulkService
from ktizo.services.cluster import ClusterService
from ktizo.services.console_codes import ConsoleCodeService
from ktizo.services.device_flow import DeviceFlowService
from ktizo.services.devices import DeviceService
from ktizo.services.dhcp import DhcpService
from ktizo.services.download import ConfigDownload
from ktizo.services.first_contact import FirstContact
from ktizo.services.gitops import GitopsService
from ktizo.services.groups import GroupService
from ktizo.services.housekeeping import Housekeeping
from ktizo.services.ipxe import IpxeService
from ktizo.services.preview import PreviewService
from ktizo.services.registry import Services
from ktizo.services.render import ConfigSource, RenderCache, Renderer
from ktizo.services.rules import RuleEngine
from ktizo.services.schema import SchemaService
from ktizo.services.sites import SiteService
from ktizo.services.users import UserService
from ktizo.services.watch import ApprovalWatcher
from ktizo.services.webhooks import WebhookService
from ktizo.services.zero_touch import ZeroTouch
from ktizo.settings import Settings
from ktizo.talos import parse_talos_version


def held_limits(settings: Settings, max_connections: int) -> tuple[int, int]:
    """How many config requests may be held open (long poll) in all and from one address: at most half of the
    connections the server serves, so the other half stays free for everything else (health checks, approved
    downloads, operators)."""
    total = settings.long_poll_max_held or max(1, max_connections // 2)
    return min(total, max(1, max_connections // 2)), settings.long_poll_per_address


def build_services(settings: Settings, db: Database | None = None, *, max_connections: int = 10_000) -> Services:
    db = db or Database(settings.effective_database_url)
    sealer = Sealer(settings.secret_keys())
    talos_version = parse_talos_version(settings.talos_version)
    source = ConfigSource(db, sealer, settings.base_templates_dir, talos_version)
    renderer = Renderer(source, RenderCache(settings.render_cache_bytes))
    watcher = ApprovalWatcher(db)
    first_contact = FirstContact(
        new_per_minute=settings.new_devices_per_minute, touch_interval=settings.last_seen_interval
    )
    devices = DeviceService(db, source, watcher, first_contact=first_contact)
    device_flow = DeviceFlowService(
        db,
        first_contact,
        enabled=settings.oauth_enabled,
        client_id=settings.oauth_client_id,
        requests_per_minute=settings.new_devices_per_minute,
    )
    boot = BootService(
        db,
        renderer,
        first_contact,
        require_lease_ip=settings.require_lease_ip,
        access_check=device_flow.check_access_token if settings.oauth_enabled else None,
    )
    max_held, per_address = held_limits(settings, max_connections)
    authority = AuthorityService(db, sealer)
    agents = AgentService(
        db,
        devices,
        authority,
        first_contact,
        cert_days=settings.agent_cert_days,
        enrollment_ttl=dt.timedelta(hours=settings.enrollment_ttl_hours),
        poll_seconds=settings.enroll_poll_seconds,
        checkin_seconds=settings.agent_checkin_seconds,
        work_dir=settings.data_dir if settings.data_dir.is_dir() else None,
    )
    sites = SiteService(db, concurrency=settings.login_concurrency)
    zero_touch = ZeroTouch(
        db,
        sites,
        agents,
        devices,
        first_contact,
        requests_per_minute=settings.enroll_requests_per_minute,
        failures_before_lockout=settings.enroll_failures_before_lockout,
        lockout=dt.timedelta(minutes=settings.enroll_lockout_minutes),
        online_window=dt.timedelta(seconds=3 * settings.agent_checkin_seconds),
    )
    rules = RuleEngine(db, devices)
    first_contact.decider = lambda s, device, knock: rules.decide(s, device, knock) is not None
    return Services(
        db=db,
        source=source,
        renderer=renderer,
        first_contact=first_contact,
        devices=devices,
        bulk=BulkService(db, devices),
        boot=boot,
        download=ConfigDownload(
            db,
            boot,
            watcher,
            long_poll_seconds=settings.long_poll_seconds,
            max_held=max_held,
            max_held_per_address=per_address,
        ),
        ipxe=IpxeService(
            db,
            first_contact,
            source,
            assets_dir=settings.assets_dir,
            oauth_enabled=settings.oauth_enabled,
            oauth_client_id=settings.oauth_client_id,
            boot=boot,
        ),
        dhcp=DhcpService(db, first_contact, discovery_subnets=settings.discovery_subnets),
        device_flow=device_flow,
        console_codes=ConsoleCodeService(db, devices),
        housekeeping=Housekeeping(
            db,
            discovery_timeout=dt.timedelta(hours=settings.discovery_timeout_hours),
            audit_retention=dt.timedelta(days=settings.audit_retention_days),
            event_retention=dt.timedelta(days=settings.event_retention_days),
            gitops=settings.gitops_repo is not None,
        ),
        watcher=watcher,
        cluster=ClusterService(db, sealer, source, settings.base_templates_dir, talos_version),
        groups=GroupService(db, source),
        preview=PreviewService(db, renderer),
        users=UserService(db, concurrency=settings.login_concurrency),
        audit=AuditService(db),
        schema=SchemaService(db),
        authority=authority,
        agents=agents,
        sites=sites,
        zero_touch=zero_touch,
        webhooks=WebhookService(db, sealer, deny=settings.webhook_deny),
        rules=rules,
        gitops=GitopsService(
            db,
            source,
            settings.gitops_repo.expanduser().resolve(),
            settings.gitops_remote,
            branch=settings.gitops_branch,
            namespace=settings.gitops_namespace,
            discovery_timeout=dt.timedelta(hours=settings.discovery_timeout_hours),
            include_patches=settings.gitops_include_patches,
            timeout=settings.gitops_timeout_seconds,
            interval=settings.gitops_interval_seconds,
        )
        if settings.gitops_repo is not None
        else None,
    )
