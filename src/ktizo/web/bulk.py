"""Bulk approve or reject from the device list: the form posts here, a preview lists every assignment, and
only the confirmation (carrying the preview's fingerprint) changes anything."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from starlette.datastructures import FormData

from ktizo.domain.devices import DeviceStatus, Role
from ktizo.domain.errors import KtizoError
from ktizo.services.bulk import MAX_DEVICES, BulkApproval
from ktizo.services.devices import DeviceQuery
from ktizo.web.devices import ListParams, list_response
from ktizo.web.forms import Errors, ints, note_error, text
from ktizo.web.routing import WebRoute
from ktizo.web.session import CheckedForm, CurrentUser, WebUser, services_of
from ktizo.web.templating import page, set_flash

router = APIRouter(route_class=WebRoute, include_in_schema=False)

BULK_FIELDS = ("hostname_pattern", "ip_range", "role", "notes", "devices")


def _values(form: FormData) -> dict[str, str]:
    return {
        "hostname_pattern": text(form, "hostname_pattern", 100),
        "ip_range": text(form, "ip_range", 100),
        "role": text(form, "role", 20),
        "notes": text(form, "notes", 4096),
        "status": text(form, "status", 20),
        "q": text(form, "q", 100),
    }


def _selected_ids(request: Request, form: FormData, values: dict[str, str]) -> list[int]:
    """The ticked devices, or every pending device matching the list's filter when that box was ticked."""
    if form.get("all_matching") == "1":
        rows, _ = services_of(request).devices.list(
            DeviceQuery(status=DeviceStatus.PENDING, search=values["q"] or None, limit=MAX_DEVICES + 1, order="id")
        )
        return [d.id for d in rows]
    return list(dict.fromkeys(ints(form.getlist("ids"), MAX_DEVICES + 1)))


def _request(ids: list[int], values: dict[str, str]) -> BulkApproval:
    role = values["role"]
    return BulkApproval(
        device_ids=tuple(ids),
        hostname_pattern=values["hostname_pattern"],
        ip_range=values["ip_range"] or None,
        role=Role(role) if role in ("controlplane", "worker") else None,
        notes=values["notes"] or None,
    )


def _back_to_list(
    request: Request, user: WebUser, values: dict[str, str], ids: list[int], errors: Errors, form: FormData
) -> Response:
    params = ListParams(status=values["status"] if values["status"] in ("pending", "all") else "pending", q=values["q"])
    return list_response(
        request,
        user,
        params,
        status_code=422,
        bulk_values=values | {"all_matching": form.get("all_matching") == "1"},
        bulk_errors=errors,
        bulk_open=True,
        selected=frozenset(ids),
    )


@router.post("/ui/devices/bulk")
def bulk_start(request: Request, user: CurrentUser, form: CheckedForm) -> Response:
    """Preview an approval, or ask to confirm a rejection."""
    values = _values(form)
    ids = _selected_ids(request, form, values)
    errors: Errors = {}
    if not ids:
        errors["devices"] = "Tick the devices to act on, or choose all pending devices matching the filter."
        return _back_to_list(request, user, values, ids, errors, form)
    services = services_of(request)
    if form.get("action") == "reject":
        devices = [services.devices.get(i) for i in ids[:MAX_DEVICES]]
        return page(request, "devices/bulk_reject.html", user, nav="devices", devices=devices, values=values, ids=ids)
    if not values["hostname_pattern"]:
        errors["hostname_pattern"] = "Give a pattern such as worker-{n:02d}."
        return _back_to_list(request, user, values, ids, errors, form)
    try:
        plan = services.bulk.preview(user.actor, _request(ids, values))
    except KtizoError as exc:
        note_error(errors, exc, BULK_FIELDS)
        if "devices" in errors:
            errors["_"] = errors.pop("devices")
        return _back_to_list(request, user, values, ids, errors, form)
    by_id = {d.id: d for d in (services.devices.get(a.device_id) for a in plan.assignments)}
    return page(
        request,
        "devices/bulk_preview.html",
        user,
        nav="devices",
        plan=plan,
        devices=by_id,
        values=values,
        ids=[a.device_id for a in plan.assignments],
    )


@router.post("/ui/devices/bulk/approve")
def bulk_approve(request: Request, user: CurrentUser, form: CheckedForm) -> Response:
    values = _values(form)
    ids = ints(form.getlist("ids"), MAX_DEVICES + 1)
    services = services_of(request)
    try:
        plan = services.bulk.approve(user.actor, _request(ids, values), expected=text(form, "fingerprint", 64))
    except KtizoError as exc:
        errors: Errors = {}
        note_error(errors, exc, BULK_FIELDS)
        if "devices" in errors:
            errors["_"] = errors.pop("devices")
        return _back_to_list(request, user, values, ids, errors, form)
    names = [a.hostname for a in plan.assignments]
    summary = ", ".join(names) if len(names) <= 6 else f"{names[0]} … {names[-1]}"
    response = RedirectResponse("/ui/devices?status=approved&sort=hostname&dir=asc", status_code=303)
    set_flash(response, f"Approved {len(names)} devices: {summary}.")
    return response


@router.post("/ui/devices/bulk/reject")
def bulk_reject(request: Request, user: CurrentUser, form: CheckedForm) -> Response:
    ids = ints(form.getlist("ids"), MAX_DEVICES + 1)
    notes = text(form, "notes", 4096) or None
    values: dict[str, Any] = _values(form)
    try:
        done = services_of(request).bulk.reject(user.actor, ids, notes)
    except KtizoError as exc:
        errors: Errors = {}
        note_error(errors, exc, BULK_FIELDS)
        if "devices" in errors:
            errors["_"] = errors.pop("devices")
        return _back_to_list(request, user, values, ids, errors, form)
    response = RedirectResponse("/ui/devices?status=rejected", status_code=303)
    set_flash(response, f"Rejected {len(done)} devices.")
    return response
