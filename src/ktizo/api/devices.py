"""Device management for operators: ``/api/v1/devices`` as the seed defines it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Query, Response

from ktizo.api.deps import Operator, ServicesDep, Viewer
from ktizo.api.errors import responses
from ktizo.api.schemas import ApproveIn, DeviceCreate, DeviceOut, DeviceUpdate, RejectIn
from ktizo.domain.bounds import MAX_ID
from ktizo.domain.devices import DeviceStatus
from ktizo.services.devices import UNSET, DeviceChanges, DeviceQuery

router = APIRouter(prefix="/api/v1/devices", tags=["devices"])
DeviceId = Annotated[int, Path(ge=1, le=MAX_ID, description="The device's id")]
_ERRORS = responses(401, 403, 404)


def _changes(model: DeviceCreate | DeviceUpdate | ApproveIn) -> DeviceChanges:
    values = {name: getattr(model, name) for name in model.model_fields_set}
    if values.get("extra_nics") is not None:
        values["extra_nics"] = [nic.model_dump(exclude_none=True) for nic in values["extra_nics"]]
    return DeviceChanges(**values)


@router.get("", response_model=list[DeviceOut], responses=responses(401, 403))
def list_devices(
    services: ServicesDep,
    actor: Viewer,
    response: Response,
    status: DeviceStatus | None = None,
    q: Annotated[str | None, Query(max_length=100, description="Search MAC, hostname, IP, serial, UUID")] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> list[DeviceOut]:
    """List devices, optionally by status. The total count is in the ``X-Total-Count`` header."""
    rows, total = services.devices.list(DeviceQuery(status=status, search=q, limit=limit, offset=offset))
    response.headers["X-Total-Count"] = str(total)
    return [DeviceOut.of(d, actor) for d in rows]


@router.post("", status_code=201, response_model=DeviceOut, responses=responses(401, 403, 409))
def create_device(body: DeviceCreate, services: ServicesDep, actor: Operator) -> DeviceOut:
    """Pre-register a device before it boots. It starts as pending; approve it now or when it appears."""
    changes = _changes(body)
    changes.role = body.role
    device = services.devices.create(actor, changes)
    return DeviceOut.of(device, actor, services.devices.warnings(device))


@router.get("/{device_id}", response_model=DeviceOut, responses=_ERRORS)
def get_device(device_id: DeviceId, services: ServicesDep, actor: Viewer) -> DeviceOut:
    return DeviceOut.of(services.devices.get(device_id), actor)


@router.put("/{device_id}", response_model=DeviceOut, responses=responses(401, 403, 404, 409))
def update_device(
    device_id: DeviceId,
    body: DeviceUpdate,
    services: ServicesDep,
    actor: Operator,
    expected_revision: Annotated[
        int | None,
        Query(ge=1, le=MAX_ID, description="Refuse (409) if the device's revision is no longer this one"),
    ] = None,
) -> DeviceOut:
    """Change a device's fields; only the fields present in the body are touched. Changing a controlplane machine
    (or making one) needs the admin role."""
    changes = _changes(body)
    if changes.role is None:
        changes.role = UNSET  # a device always has a role; null leaves it as it is
    if changes.notes is None:
        changes.notes = ""
    device = services.devices.update(actor, device_id, changes, expected_revision=expected_revision)
    return DeviceOut.of(device, actor, services.devices.warnings(device))


@router.delete("/{device_id}", status_code=204, responses=_ERRORS)
def delete_device(device_id: DeviceId, services: ServicesDep, actor: Operator) -> Response:
    services.devices.delete(actor, device_id)
    return Response(status_code=204)


@router.post("/{device_id}/approve", response_model=DeviceOut, responses=responses(401, 403, 404, 409))
def approve_device(
    device_id: DeviceId,
    services: ServicesDep,
    actor: Operator,
    body: Annotated[ApproveIn | None, Body()] = None,
) -> DeviceOut:
    """Approve a pending (or re-approve a rejected) device, setting hostname, static IP, role and notes.

    Operators approve workers; a controlplane machine (its config carries the cluster's CA keys) needs an admin."""
    body = body or ApproveIn()
    changes = _changes(body)
    if changes.notes is None:
        changes.notes = ""
    device = services.devices.approve(actor, device_id, changes)
    return DeviceOut.of(device, actor, services.devices.warnings(device))


@router.post("/{device_id}/reject", response_model=DeviceOut, responses=responses(401, 403, 404, 409))
def reject_device(
    device_id: DeviceId,
    services: ServicesDep,
    actor: Operator,
    body: Annotated[RejectIn | None, Body()] = None,
) -> DeviceOut:
    """Reject a pending device, or revoke an approved one: it gets nothing more from Ktizo."""
    notes = body.notes if body is not None else None
    return DeviceOut.of(services.devices.reject(actor, device_id, notes), actor)


@router.post("/{device_id}/unbind", response_model=DeviceOut, responses=_ERRORS)
def unbind_device(device_id: DeviceId, services: ServicesDep, actor: Operator) -> DeviceOut:
    """Forget the SMBIOS UUID and serial the device reported; the next request binds them afresh."""
    return DeviceOut.of(services.devices.unbind(actor, device_id), actor)


@router.get(
    "/{device_id}/config",
    response_class=Response,
    responses={
        200: {"content": {"application/yaml": {}}, "description": "The config the device would receive"},
        **responses(401, 403, 404, 503),
    },
)
def preview_config(
    device_id: DeviceId,
    services: ServicesDep,
    actor: Operator,
    reveal: Annotated[bool, Query(description="Show private keys and tokens (admin only, audited)")] = False,
) -> Response:
    """Exactly what the device would receive now, whatever its status, with secrets redacted unless revealed."""
    return Response(services.preview.config(actor, device_id, reveal=reveal), media_type="application/yaml")
