"""The device detail page: a machine's facts and history, the config it would receive, edit (revision-checked),
unbind and delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from ktizo.domain.clock import now as utcnow
from ktizo.domain.errors import KtizoError, NotFound
from ktizo.domain.identity import normalize_hostname, normalize_interface_address
from ktizo.services.audit import AuditQuery
from ktizo.services.devices import UNSET, DeviceChanges
from ktizo.services.groups import normalize_labels
from ktizo.services.records import Device
from ktizo.web.device_forms import (
    EDIT_FIELDS,
    ROLE_OPTIONS,
    after_change,
    arch,
    hardware,
    host_facts,
    is_agent,
    network_hint,
    reported,
)
from ktizo.web.forms import Errors, note_error, parse, text, too_long
from ktizo.web.routing import WebRoute
from ktizo.web.session import CheckedForm, CurrentUser, WebUser, services_of
from ktizo.web.templating import page, set_flash

router = APIRouter(route_class=WebRoute, include_in_schema=False)


def detail_response(
    request: Request, user: WebUser, device: Device, *, status_code: int = 200, **extra: Any
) -> Response:
    services = services_of(request)
    history, history_total = services.audit.list(AuditQuery(device_id=device.id, limit=50))
    if is_agent(device):
        return _agent_response(request, user, device, history, history_total, status_code=status_code, **extra)
    config = config_error = None
    if user.can_operate:
        try:
            config = services.preview.config(user.actor, device.id)
        except KtizoError as exc:  # no base config yet, cluster not set up: say so where the preview would be
            config_error = str(exc)
    placeholder, hint = network_hint(services)
    context: dict[str, Any] = {
        "d": device,
        "history": history,
        "history_total": history_total,
        "config": config,
        "config_error": config_error,
        "ip_placeholder": placeholder,
        "ip_hint": hint,
        "role_options": ROLE_OPTIONS,
        "hardware": hardware,
        "arch": arch,
        "approve_values": {
            "hostname": device.hostname or "",
            "ip_address": device.ip_address or "",
            "role": device.role,
            "notes": device.notes or "",
        },
        "approve_errors": {},
        "edit_values": _edit_values(device),
        "edit_errors": {},
    }
    context.update(extra)
    return page(request, "devices/detail.html", user, nav="devices", status_code=status_code, **context)


def _agent_response(
    request: Request,
    user: WebUser,
    device: Device,
    history: list[Any],
    history_total: int,
    *,
    status_code: int,
    **extra: Any,
) -> Response:
    """An agent host's page: what it reported, what was approved, its enrollment and certificates, its last
    check-in's hardware; revoke and purge instead of a Talos machine's config preview, edit and delete."""
    services = services_of(request)
    site = None
    if device.site_id is not None:
        try:
            site = services.sites.get(device.site_id)
        except NotFound:  # deleted meanwhile: the agent stays, without a site
            site = None
    context: dict[str, Any] = {
        "d": device,
        "site": site,
        "history": history,
        "history_total": history_total,
        "reported": reported(device),
        "host": host_facts(device),
        "enrollment": services.agents.enrollment(device.id),
        "certificates": services.agents.certificates(device.id),
        "now": utcnow(),
        "approve_values": {"hostname": device.hostname or "", "notes": device.notes or ""},
        "approve_errors": {},
    }
    context.update(extra)
    return page(request, "devices/agent_detail.html", user, nav="devices", status_code=status_code, **context)


def _edit_values(device: Device) -> dict[str, Any]:
    return {
        "hostname": device.hostname or "",
        "ip_address": device.ip_address or "",
        "role": device.role,
        "notes": device.notes or "",
        "install_disk": device.install_disk or "",
        "labels": "\n".join(f"{k}={v}" for k, v in sorted((device.labels or {}).items())),
        "revision": str(device.revision),
    }


@router.get("/ui/devices/{device_id:id}")
def device_detail(request: Request, device_id: int, user: CurrentUser) -> Response:
    return detail_response(request, user, services_of(request).devices.get(device_id))


def _labels(value: str, errors: Errors) -> dict[str, str] | None:
    labels: dict[str, str] = {}
    for line in value.replace(",", "\n").splitlines():
        line = line.strip()
        if not line:
            continue
        key, sep, val = line.partition("=")
        if not sep:
            errors["labels"] = f"{line[:40]!r}: write labels as key=value, one per line"
            return None
        labels[key.strip()] = val.strip()
    try:
        return normalize_labels(labels)
    except KtizoError as exc:
        errors["labels"] = exc.message
        return None


@router.post("/ui/devices/{device_id:id}/edit")
def device_edit(request: Request, device_id: int, user: CurrentUser, form: CheckedForm) -> Response:
    services = services_of(request)
    device = services.devices.get(device_id)
    values = {name: text(form, name, 4096) for name in EDIT_FIELDS}
    revision_text = text(form, "revision", 12)
    # The revision the operator's form was drawn from: a change someone made since is not silently reverted.
    seen_revision = int(revision_text) if revision_text.isdecimal() else None
    values["revision"] = revision_text
    errors: Errors = {}
    changes = DeviceChanges()
    wanted: dict[str, Any] = {
        "hostname": parse(errors, "hostname", values["hostname"], normalize_hostname) if values["hostname"] else None,
        "ip_address": (
            parse(errors, "ip_address", values["ip_address"], normalize_interface_address)
            if values["ip_address"]
            else None
        ),
        "notes": values["notes"],
        "install_disk": values["install_disk"] or None,
        "labels": _labels(values["labels"], errors),
    }
    if values["role"] in ("controlplane", "worker"):
        wanted["role"] = values["role"]
    else:
        errors["role"] = "choose controlplane or worker"
    too_long(errors, "notes", values["notes"], 4096)
    if not errors:
        for name, value in wanted.items():
            current = getattr(device, name)
            if (current or None) != (value or None):
                setattr(changes, name, value if name != "labels" else (value or {}))
        if changes.notes is not UNSET and changes.notes is None:
            changes.notes = ""
        try:
            updated = services.devices.update(user.actor, device_id, changes, expected_revision=seen_revision)
        except KtizoError as exc:
            note_error(errors, exc, EDIT_FIELDS)
            if getattr(exc, "field", None) == "revision":
                device = services.devices.get(device_id)
                values = {**_edit_values(device), "revision": str(device.revision)}  # what it is now
        else:
            changed = ", ".join(name.replace("_", " ") for name, _ in changes.items()) or "nothing"
            warnings = "".join(f" Warning: {w}." for w in services.devices.warnings(updated))
            return after_change(request, device_id, f"Saved ({changed} changed).{warnings}")
    return detail_response(
        request, user, device, status_code=422, edit_values=values, edit_errors=errors, edit_open=True
    )


@router.post("/ui/devices/{device_id:id}/unbind")
def device_unbind(request: Request, device_id: int, user: CurrentUser, form: CheckedForm) -> Response:
    services_of(request).devices.unbind(user.actor, device_id)
    return after_change(
        request, device_id, "Identity binding cleared: the next request binds the UUID and serial it reports."
    )


@router.post("/ui/devices/{device_id:id}/delete")
def device_delete(request: Request, device_id: int, user: CurrentUser, form: CheckedForm) -> Response:
    services = services_of(request)
    try:
        device = services.devices.get(device_id)
    except NotFound:
        return RedirectResponse("/ui/devices", status_code=303)
    services.devices.delete(user.actor, device_id)
    response = RedirectResponse(f"/ui/devices?status={device.status}", status_code=303)
    name = device.hostname or device.mac_address or f"device {device_id}"
    set_flash(response, f"Deleted {name}. Its history stays in the audit log; if it boots again it waits as pending.")
    return response
