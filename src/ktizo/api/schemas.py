"""Request and response bodies. Field names follow the seed contract (``mac_address``, ``ip_address``…)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ktizo.domain.devices import DeviceStatus, MachineKind, Role
from ktizo.domain.errors import ValidationFailed
from ktizo.domain.identity import (
    normalize_hostname,
    normalize_interface_address,
    normalize_mac,
    normalize_serial,
    normalize_uuid,
)
from ktizo.domain.users import UserRole
from ktizo.services.context import Actor
from ktizo.talos import redact_patch


def _pydantic(fn: Callable[[str], str]) -> Callable[[str], str]:
    """Run a domain normaliser as a pydantic validator (pydantic reports ValueError with the field's location)."""

    def validate(value: str) -> str:
        try:
            return fn(value)
        except ValidationFailed as exc:
            raise ValueError(exc.message) from None

    return validate


MacAddress = Annotated[
    str, Field(max_length=64, examples=["00:11:22:33:44:55"]), AfterValidator(_pydantic(normalize_mac))
]
Hostname = Annotated[str, Field(max_length=253, examples=["node-01"]), AfterValidator(_pydantic(normalize_hostname))]
InterfaceAddress = Annotated[
    str,
    Field(max_length=64, examples=["10.0.5.100/24"]),
    AfterValidator(_pydantic(normalize_interface_address)),
]
SmbiosUuid = Annotated[str, Field(max_length=64), AfterValidator(_pydantic(normalize_uuid))]
Serial = Annotated[str, Field(max_length=128), AfterValidator(_pydantic(normalize_serial))]
Notes = Annotated[str, Field(max_length=4096)]
Labels = dict[Annotated[str, Field(max_length=128)], Annotated[str, Field(max_length=63)]]
# A device's own patch travels in a device request (64 KiB body limit); large patches belong to groups.
PatchText = Annotated[str, Field(max_length=60 * 1024, description="A Talos strategic-merge patch (YAML)")]
InstallDisk = Annotated[str, Field(max_length=255, examples=["/dev/nvme0n1"])]


class NicIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mac: MacAddress
    addresses: Annotated[list[InterfaceAddress], Field(max_length=16)] = []
    gateway: Annotated[str, Field(max_length=45)] | None = None


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: MachineKind
    machine_id: str | None
    mac_address: str | None
    hostname: str | None
    ip_address: str | None
    role: Role | None  # None for agent hosts
    status: DeviceStatus
    notes: str
    first_seen: dt.datetime
    approved_at: dt.datetime | None
    last_config_download: dt.datetime | None
    uuid: str | None
    serial: str | None
    last_seen: dt.datetime | None
    last_ip: str | None
    source: str
    approved_by: str | None
    rejected_at: dt.datetime | None
    rejected_by: str | None
    facts: dict[str, Any]
    labels: dict[str, str]
    patch: str | None
    install_disk: str | None
    extra_nics: list[dict[str, Any]]
    lease_ip: str | None
    installed_at: dt.datetime | None
    revision: int
    warnings: list[str] = Field(
        default_factory=list, description="What stands in the way of the machine working as approved (set by changes)"
    )

    @classmethod
    def of(cls, device: Any, actor: Actor, warnings: list[str] | None = None) -> DeviceOut:
        """The device as ``actor`` may see it: a patch (it may hold secrets) redacted for everyone below admin."""
        out = cls.model_validate(device)
        if out.patch and actor.role is not UserRole.ADMIN:
            out.patch = redact_patch(out.patch)
        out.warnings = warnings or []
        return out


class DeviceCreate(_In):
    mac_address: MacAddress | None = None
    hostname: Hostname | None = None
    ip_address: InterfaceAddress | None = None
    role: Role = Role.WORKER
    notes: Notes = ""
    uuid: SmbiosUuid | None = None
    serial: Serial | None = None
    labels: Labels | None = None
    patch: PatchText | None = None
    install_disk: InstallDisk | None = None
    extra_nics: Annotated[list[NicIn], Field(max_length=16)] | None = None


class DeviceUpdate(_In):
    """Only the fields present are changed; ``null`` clears an optional one."""

    mac_address: MacAddress | None = None
    hostname: Hostname | None = None
    ip_address: InterfaceAddress | None = None
    role: Role | None = None
    notes: Notes | None = None
    uuid: SmbiosUuid | None = None
    serial: Serial | None = None
    labels: Labels | None = None
    patch: PatchText | None = None
    install_disk: InstallDisk | None = None
    extra_nics: Annotated[list[NicIn], Field(max_length=16)] | None = None


class ApproveIn(_In):
    hostname: Hostname | None = None
    ip_address: InterfaceAddress | None = None
    role: Role | None = Field(
        None,
        description="controlplane or worker; if omitted the device keeps its role "
        "(worker unless pre-registered otherwise)",
    )
    notes: Notes | None = None


class RejectIn(_In):
    notes: Notes | None = None


class MacIn(BaseModel):
    mac_address: MacAddress


class AuditOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: dt.datetime
    actor: str
    actor_type: str
    action: str
    device_id: int | None
    device_mac: str | None
    source_ip: str | None
    details: dict[str, Any]
    count: int = Field(1, description="How many times this refusal happened within its minute (repeats are counted)")


class AuditPage(BaseModel):
    items: list[AuditOut]
    total: int
    limit: int
    offset: int


class LoginIn(_In):
    username: Annotated[str, Field(min_length=1, max_length=64)]
    password: Annotated[str, Field(min_length=1, max_length=1024)]


class TokenOut(BaseModel):
    access_token: str
    token_type: str = "bearer"  # noqa: S105 - the OAuth token type name
    expires_at: dt.datetime | None


class MeOut(BaseModel):
    username: str
    role: UserRole


class Health(BaseModel):
    status: str
    database: str | None = None
    migrations: str | None = None
