"""Device groups: config templates per group of devices (issue: "Config Templates per device group")."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, ConfigDict, Field

from ktizo.api.deps import Admin, Operator, ServicesDep, Viewer
from ktizo.api.errors import ValidationErrorOut, responses
from ktizo.domain.bounds import MAX_ID
from ktizo.domain.users import UserRole
from ktizo.services.context import Actor
from ktizo.services.records import DeviceGroup
from ktizo.talos import redact_patch

router = APIRouter(prefix="/api/v1/groups", tags=["groups"])
GroupRef = Annotated[str, Path(max_length=63, description="Group id or name")]
_422: dict[int | str, dict[str, Any]] = {
    422: {"model": ValidationErrorOut, "description": "Invalid input (a patch that breaks a config included)"}
}


class GroupOut(BaseModel):
    id: int
    name: str
    priority: int
    selector: dict[str, str]
    patch: str | None
    gateway: str | None
    nameservers: list[str]
    description: str
    revision: int
    members: list[int]
    created_at: dt.datetime
    updated_at: dt.datetime


class GroupIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=63)] | None = None
    priority: Annotated[int, Field(ge=-10000, le=10000)] | None = None
    selector: dict[Annotated[str, Field(max_length=128)], Annotated[str, Field(max_length=63)]] | None = Field(
        None, description="Devices whose labels include all of these belong to the group"
    )
    patch: Annotated[str, Field(max_length=256 * 1024)] | None = Field(
        None, description="A Talos strategic-merge patch (YAML), checked against the base configs when saved"
    )
    gateway: Annotated[str, Field(max_length=45)] | None = None
    nameservers: Annotated[list[Annotated[str, Field(max_length=45)]], Field(max_length=8)] | None = None
    description: Annotated[str, Field(max_length=4096)] | None = None


class MembersIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    add: Annotated[list[Annotated[int, Field(ge=1, le=MAX_ID)]], Field(max_length=10000)] = []
    remove: Annotated[list[Annotated[int, Field(ge=1, le=MAX_ID)]], Field(max_length=10000)] = []


def _out(group: DeviceGroup, members: list[int], actor: Actor) -> GroupOut:
    """The group as ``actor`` may see it: its patch (which may hold secrets) redacted below admin."""
    return GroupOut(
        id=group.id,
        name=group.name,
        priority=group.priority,
        selector=group.selector,
        patch=group.patch if actor.role is UserRole.ADMIN else redact_patch(group.patch),
        gateway=group.gateway,
        nameservers=group.nameservers,
        description=group.description,
        revision=group.revision,
        members=members,
        created_at=group.created_at,
        updated_at=group.updated_at,
    )


@router.get("", response_model=list[GroupOut], responses=responses(401, 403))
def list_groups(services: ServicesDep, actor: Viewer) -> list[GroupOut]:
    """Groups in the order their patches apply (priority, then id): the last one wins."""
    return [_out(g, m, actor) for g, m in services.groups.all()]


@router.post("", status_code=201, response_model=GroupOut, responses={**responses(401, 403, 409), **_422})
def create_group(body: GroupIn, services: ServicesDep, actor: Admin) -> GroupOut:
    group = services.groups.create(actor, {k: getattr(body, k) for k in body.model_fields_set})
    return _out(*services.groups.get(group.id), actor)


@router.get("/{ref}", response_model=GroupOut, responses=responses(401, 403, 404))
def get_group(ref: GroupRef, services: ServicesDep, actor: Viewer) -> GroupOut:
    return _out(*services.groups.get(ref), actor)


@router.put("/{ref}", response_model=GroupOut, responses={**responses(401, 403, 404, 409), **_422})
def update_group(ref: GroupRef, body: GroupIn, services: ServicesDep, actor: Admin) -> GroupOut:
    group = services.groups.update(actor, ref, {k: getattr(body, k) for k in body.model_fields_set})
    return _out(*services.groups.get(group.id), actor)


@router.delete("/{ref}", status_code=204, responses=responses(401, 403, 404))
def delete_group(ref: GroupRef, services: ServicesDep, actor: Admin) -> Response:
    services.groups.delete(actor, ref)
    return Response(status_code=204)


@router.post("/{ref}/members", response_model=GroupOut, responses=responses(401, 403, 404))
def set_members(ref: GroupRef, body: MembersIn, services: ServicesDep, actor: Operator) -> GroupOut:
    """Add or remove explicit members (device ids)."""
    services.groups.set_members(actor, ref, body.add, body.remove)
    return _out(*services.groups.get(ref), actor)
