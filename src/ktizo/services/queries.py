"""The plain values the services take and give (changes, queries, audit entries), apart from the services
themselves so that what only names them (the CLI, at start-up) imports nothing heavy."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from ktizo.domain.devices import DeviceStatus

UNSET: Any = object()


@dataclass
class DeviceChanges:
    """Fields an operator may set. ``UNSET`` means "leave as is"; ``None`` clears an optional field.

    The service validates and normalises every value (the API and CLI parse with the same normalisers first, to
    answer in their own words, but nothing depends on it)."""

    mac_address: Any = UNSET
    hostname: Any = UNSET
    ip_address: Any = UNSET
    role: Any = UNSET
    notes: Any = UNSET
    uuid: Any = UNSET
    serial: Any = UNSET
    labels: Any = UNSET
    patch: Any = UNSET
    install_disk: Any = UNSET
    extra_nics: Any = UNSET

    def items(self) -> list[tuple[str, Any]]:
        return [(k, v) for k, v in vars(self).items() if v is not UNSET]


@dataclass(frozen=True)
class DeviceQuery:
    status: DeviceStatus | None = None
    search: str | None = None
    limit: int = 1000
    offset: int = 0
    order: str = "id"
    descending: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditQuery:
    device_id: int | None = None
    actor: str | None = None
    action: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    limit: int = 100
    offset: int = 0


@dataclass(frozen=True)
class AuditEntry:
    """An audit row as it is shown: ``count`` is how many times a counted refusal happened in its minute (1 for
    everything else), and patch texts that rows written before release 0005 still hold are shown as a summary."""

    id: int
    at: dt.datetime
    actor: str
    actor_type: str
    action: str
    device_id: int | None
    device_mac: str | None
    source_ip: str | None
    details: dict[str, Any]
    count: int
