"""The bundle of services one Ktizo process uses; ``app.build_services`` fills it from the settings."""

from __future__ import annotations

from dataclasses import dataclass

from ktizo.db import Database
from ktizo.services.audit import AuditService
from ktizo.services.boot import BootService
from ktizo.services.bulk import BulkService
from ktizo.services.cluster import ClusterService
from ktizo.services.devices import DeviceService
from ktizo.services.groups import GroupService
from ktizo.services.netboot import NetbootService
from ktizo.services.preview import PreviewService
from ktizo.services.render import ConfigSource, Renderer
from ktizo.services.users import UserService
from ktizo.services.watch import ApprovalWatcher


@dataclass
class Services:
    db: Database
    source: ConfigSource
    renderer: Renderer
    devices: DeviceService
    bulk: BulkService
    boot: BootService
    netboot: NetbootService
    watcher: ApprovalWatcher
    cluster: ClusterService
    groups: GroupService
    preview: PreviewService
    users: UserService
    audit: AuditService
