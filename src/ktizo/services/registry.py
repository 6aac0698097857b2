"""The bundle of services one Ktizo process uses; ``app.build_services`` fills it from the settings."""

from __future__ import annotations

from dataclasses import dataclass

from ktizo.db import Database
from ktizo.services.agents import AgentService
from ktizo.services.audit import AuditService
from ktizo.services.authority import AuthorityService
from ktizo.services.boot import BootService
from ktizo.services.bulk import BulkService
from ktizo.services.cluster import ClusterService
from ktizo.services.console_codes import ConsoleCodeService
from ktizo.services.declarative import Declarative
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
from ktizo.services.render import ConfigSource, Renderer
from ktizo.services.rules import RuleEngine
from ktizo.services.schema import SchemaService
from ktizo.services.sites import SiteService
from ktizo.services.users import UserService
from ktizo.services.watch import ApprovalWatcher
from ktizo.services.webhooks import WebhookService
from ktizo.services.zero_touch import ZeroTouch


@dataclass
class Services:
    db: Database
    source: ConfigSource
    renderer: Renderer
    first_contact: FirstContact
    devices: DeviceService
    bulk: BulkService
    boot: BootService
    download: ConfigDownload
    ipxe: IpxeService
    dhcp: DhcpService
    device_flow: DeviceFlowService
    console_codes: ConsoleCodeService
    housekeeping: Housekeeping
    watcher: ApprovalWatcher
    cluster: ClusterService
    groups: GroupService
    preview: PreviewService
    users: UserService
    audit: AuditService
    schema: SchemaService
    authority: AuthorityService
    agents: AgentService
    sites: SiteService
    zero_touch: ZeroTouch
    webhooks: WebhookService
    rules: RuleEngine
    gitops: GitopsService | None  # None: no KTIZO_GITOPS_REPO

    @property
    def declarative(self) -> Declarative:
        """``ktizo apply`` / ``export`` over the services above (it keeps no state of its own)."""
        return Declarative(self.db, self.devices, self.groups, self.rules, self.sites, self.webhooks)
