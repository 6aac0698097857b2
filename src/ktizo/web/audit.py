"""The audit log page: filters by device, actor, action and time range, newest first, paged."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Request, Response

from ktizo.domain.bounds import as_utc
from ktizo.domain.errors import KtizoError, ValidationFailed
from ktizo.services.audit import ACTIONS, AuditQuery
from ktizo.web.routing import WebRoute
from ktizo.web.session import CurrentUser, services_of
from ktizo.web.templating import page

router = APIRouter(route_class=WebRoute, include_in_schema=False)

PER_PAGE = 50
# Actions recorded by services beyond the core list in services.audit (cluster, secrets, users).
MORE_ACTIONS = (
    "cluster_update",
    "cluster_generate",
    "secrets_import",
    "secrets_export",
    "secrets_reseal",
    "talosconfig",
    "config_reveal",
    "user_disable",
    "user_enable",
    "user_role",
    "password_reset",
)


def _time(value: str, errors: dict[str, str], name: str) -> dt.datetime | None:
    if not value:
        return None
    try:
        return as_utc(dt.datetime.fromisoformat(value.replace("Z", "+00:00")), name)
    except ValueError:
        errors[name] = "use a date and time such as 2026-11-22 14:00"
    except ValidationFailed as exc:
        errors[name] = exc.message
    return None


@router.get("/ui/audit")
def audit_log(request: Request, user: CurrentUser) -> Response:
    services = services_of(request)
    qp = request.query_params
    values = {name: (qp.get(name) or "").strip()[:100] for name in ("device", "actor", "action", "since", "until")}
    errors: dict[str, str] = {}
    device = None
    device_id = None
    if values["device"].isdecimal() and len(values["device"]) < 10:
        device_id = int(values["device"])  # a deleted device keeps its history: no lookup needed
    elif values["device"]:
        try:
            device = services.devices.resolve(values["device"])
            device_id = device.id
        except KtizoError as exc:
            errors["device"] = exc.message
    try:
        page_no = max(1, min(int(qp.get("page", "1")), 100_000))
    except ValueError:
        page_no = 1
    query = AuditQuery(
        device_id=device_id,
        actor=values["actor"] or None,
        action=values["action"] or None,
        since=_time(values["since"], errors, "since"),
        until=_time(values["until"], errors, "until"),
        limit=PER_PAGE,
        offset=(page_no - 1) * PER_PAGE,
    )
    events: list[Any]
    if errors:
        events, total = [], 0
    else:
        events, total = services.audit.list(query)
    return page(
        request,
        "audit.html",
        user,
        nav="audit",
        status_code=422 if errors else 200,
        events=events,
        total=total,
        values=values,
        errors=errors,
        page_no=page_no,
        pages=max(1, -(-total // PER_PAGE)),
        per_page=PER_PAGE,
        actions=sorted({*ACTIONS, *MORE_ACTIONS, "approve", "reject"}),
        device=device,
    )
