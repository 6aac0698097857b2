"""Device Management: the list with its tabs, search, sorting, paging and polling, and approve/reject in place
(the detail page is ``device_detail``; what both share, ``device_forms``)."""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.datastructures import QueryParams

from ktizo.domain.bounds import as_utc
from ktizo.domain.clock import now as utcnow
from ktizo.domain.devices import DeviceStatus
from ktizo.domain.errors import KtizoError, ValidationFailed
from ktizo.services.devices import DeviceQuery
from ktizo.services.records import Device
from ktizo.services.registry import Services
from ktizo.web.device_detail import detail_response
from ktizo.web.device_forms import (
    APPROVE_FIELDS,
    ROLE_OPTIONS,
    after_change,
    approve_changes,
    approved_message,
    arch,
    hardware,
    host_facts,
    network_hint,
    reported,
)
from ktizo.web.forms import Errors, note_error, text, too_long
from ktizo.web.routing import WebRoute, is_htmx
from ktizo.web.session import CheckedForm, CurrentUser, WebUser, services_of
from ktizo.web.templating import fragment, page

router = APIRouter(route_class=WebRoute, include_in_schema=False)

STATUSES = ("pending", "approved", "rejected", "all")
# UI sort keys -> DeviceQuery.order. "First seen" sorts by id: ids are handed out at first contact, so the
# order is the same, and the primary key is indexed where first_seen is not (it keeps 100k-row pages fast).
SORTS = {
    "seen": "id",
    "last_seen": "last_seen",
    "hostname": "hostname",
    "mac": "mac_address",
    "ip": "ip_address",
    "status": "status",
}
PER_PAGE = (25, 50, 100, 200)
_side = ThreadPoolExecutor(max_workers=8, thread_name_prefix="ktizo-ui")  # threads start on first use


@dataclass(frozen=True)
class ListParams:
    status: str = "pending"
    q: str = ""
    sort: str = "seen"
    desc: bool = True
    page: int = 1
    per: int = 50

    @classmethod
    def from_query(cls, qp: QueryParams) -> ListParams:
        status = qp.get("status", "pending")
        sort = qp.get("sort", "seen")
        try:
            page_no = max(1, min(int(qp.get("page", "1")), 1_000_000))
        except ValueError:
            page_no = 1
        try:
            per = int(qp.get("per", "50"))
        except ValueError:
            per = 50
        return cls(
            status=status if status in STATUSES else "pending",
            q=(qp.get("q") or "").strip()[:100],
            sort=sort if sort in SORTS else "seen",
            desc=qp.get("dir", "desc" if sort in ("seen", "last_seen") else "asc") == "desc",
            page=page_no,
            per=per if per in PER_PAGE else 50,
        )

    @property
    def status_filter(self) -> DeviceStatus | None:
        return None if self.status == "all" else DeviceStatus(self.status)

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per

    @property
    def newest_first(self) -> bool:
        return self.sort == "seen" and self.desc and self.page == 1

    def query(self) -> DeviceQuery:
        return DeviceQuery(
            status=self.status_filter,
            search=self.q or None,
            limit=self.per,
            offset=self.offset,
            order=SORTS[self.sort],
            descending=self.desc,
        )

    def args(self, **changes: Any) -> dict[str, Any]:
        """The query string's values (defaults left out), with ``changes`` applied."""
        values: dict[str, Any] = {
            "status": self.status,
            "q": self.q,
            "sort": self.sort,
            "dir": "desc" if self.desc else "asc",
            "page": self.page,
            "per": self.per,
        }
        values.update(changes)
        if values["page"] == 1:
            values.pop("page")
        if values["per"] == 50:
            values.pop("per")
        return values

    def sort_args(self, key: str) -> dict[str, Any]:
        """Clicking a column header: sort by it, or flip the direction if it already is the sort."""
        if key == self.sort:
            return self.args(dir="asc" if self.desc else "desc", page=1)
        return self.args(sort=key, dir="desc" if key in ("seen", "last_seen") else "asc", page=1)


def row_context(user: WebUser, **extra: Any) -> dict[str, Any]:
    """What the device-row macros read, handed to them as one ``ctx`` (imported macros see no page context)."""
    context: dict[str, Any] = {
        "user": user,
        "selected": frozenset(),
        "editor": False,
        "values": {},
        "errors": {},
        "message": None,
        "is_new": False,
        "ip_placeholder": "",
        "ip_hint": "",
        "role_options": ROLE_OPTIONS,
        "hardware": hardware,
        "arch": arch,
        "reported": reported,
        "host_facts": host_facts,
        **extra,
    }
    context["ctx"] = context
    return context


def tab_counts(services: Services) -> dict[str, int]:
    counts = services.devices.counts()
    counts["all"] = sum(counts.values())
    return counts


def counts_and_page(services: Services, query: DeviceQuery) -> tuple[dict[str, int], tuple[list[Device], int]]:
    """The tab counts and one page of devices. Over the network (PostgreSQL) they are two round trips of tens
    of milliseconds each at 100k devices, so they run side by side; SQLite answers in-process either way."""
    if services.db.nonblocking_reads:
        return tab_counts(services), services.devices.list(query)
    counting = _side.submit(tab_counts, services)
    listed = services.devices.list(query)
    return counting.result(), listed


def _list_context(services: Services, user: WebUser, params: ListParams) -> dict[str, Any]:
    since = utcnow()
    counts, (devices, total) = counts_and_page(services, params.query())
    return row_context(
        user,
        devices=devices,
        total=total,
        counts=counts,
        params=params,
        since=since,
        pages=max(1, -(-total // params.per)),
        statuses=STATUSES,
        per_page=PER_PAGE,
        bulk_values={},
        bulk_errors={},
    )


def list_response(
    request: Request, user: WebUser, params: ListParams, *, status_code: int = 200, **extra: Any
) -> HTMLResponse:
    services = services_of(request)
    context = _list_context(services, user, params)
    context.update(extra, base_url=str(request.base_url).rstrip("/"))
    if request.headers.get("HX-Target") == "device-list":
        return fragment("devices/_list.html", status_code=status_code, **context)
    fields = {k: v for k, v in context.items() if k != "user"}
    fields["collisions"] = len(services.zero_touch.collisions())  # the attention line above the list
    return page(request, "devices/list.html", user, nav="devices", status_code=status_code, **fields)


@router.get("/ui")
@router.get("/ui/")
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/devices", status_code=303)


@router.get("/ui/devices")
def device_list(request: Request, user: CurrentUser) -> HTMLResponse:
    return list_response(request, user, ListParams.from_query(request.query_params))


@router.get("/ui/devices/poll")
def device_poll(request: Request, user: CurrentUser) -> HTMLResponse:
    """New devices since the page was drawn, as rows to insert at the top (or a banner when the page shows
    another sort or page), plus fresh tab counts. Never touches rows already on the page, so an open approve
    form and what is typed in it survive."""
    services = services_of(request)
    params = ListParams.from_query(request.query_params)
    try:
        # In UTC straight away: it goes back to the page as the next watermark (templating.stamp).
        since = as_utc(dt.datetime.fromisoformat(request.query_params.get("since", "").replace("Z", "+00:00")), "since")
    except (ValueError, ValidationFailed):
        # The page's own watermark, mangled or out of range: start from now rather than fail every poll after.
        since = utcnow()
    counts, (rows, total) = counts_and_page(services, replace(params, page=1, per=50, sort="seen", desc=True).query())
    new = [d for d in rows if d.first_seen > since]
    insert = params.newest_first
    if insert and new:
        since = max(d.first_seen for d in new)
    return fragment(
        "devices/_poll.html",
        **row_context(
            user,
            new=new if insert else [],
            waiting=0 if insert else len(new),
            total=total,
            counts=counts,
            since=since,
            params=params,
            is_new=True,
        ),
    )


def _device_row(request: Request, user: WebUser, device: Device, *, status_code: int = 200, **extra: Any) -> Response:
    services = services_of(request)
    if extra.get("editor"):
        extra["ip_placeholder"], extra["ip_hint"] = network_hint(services)
    counts = tab_counts(services) if extra.pop("with_counts", False) else None
    return fragment(
        "devices/_row_response.html", status_code=status_code, **row_context(user, d=device, counts=counts, **extra)
    )


@router.get("/ui/devices/{device_id:id}/row")
def device_row(request: Request, device_id: int, user: CurrentUser) -> Response:
    device = services_of(request).devices.get(device_id)
    editor = request.query_params.get("editor") == "1" and user.can_operate
    values = {"hostname": device.hostname or "", "ip_address": device.ip_address or "", "role": device.role}
    values["notes"] = device.notes or ""
    return _device_row(request, user, device, editor=editor, values=values)


@router.post("/ui/devices/{device_id:id}/approve")
def device_approve(request: Request, device_id: int, user: CurrentUser, form: CheckedForm) -> Response:
    services = services_of(request)
    errors: Errors = {}
    changes, values = approve_changes(form, errors)
    if not errors:
        try:
            device = services.devices.approve(user.actor, device_id, changes)
        except KtizoError as exc:
            note_error(errors, exc, APPROVE_FIELDS)
        else:
            message = approved_message(device, services.devices.warnings(device))
            if is_htmx(request):
                return _device_row(request, user, device, message=message, with_counts=True)
            return after_change(request, device_id, message)
    device = services.devices.get(device_id)
    if is_htmx(request):
        return _device_row(request, user, device, status_code=422, editor=True, values=values, errors=errors)
    return detail_response(request, user, device, status_code=422, approve_values=values, approve_errors=errors)


@router.post("/ui/devices/{device_id:id}/reject")
def device_reject(request: Request, device_id: int, user: CurrentUser, form: CheckedForm) -> Response:
    services = services_of(request)
    notes = text(form, "notes", 4096)
    errors: Errors = {}
    too_long(errors, "notes", notes, 4096)
    if not errors:
        try:
            before = services.devices.get(device_id).status
            device = services.devices.reject(user.actor, device_id, notes or None)
        except KtizoError as exc:
            note_error(errors, exc, ("notes",))
        else:
            verb = "Revoked" if before == DeviceStatus.APPROVED.value else "Rejected"
            message = f"{verb}: it gets nothing from Ktizo until someone approves it again."
            if is_htmx(request):
                return _device_row(request, user, device, message=message, with_counts=True)
            return after_change(request, device_id, message)
    device = services.devices.get(device_id)
    values = {name: text(form, name, 4096) for name in APPROVE_FIELDS}
    if is_htmx(request):
        return _device_row(request, user, device, status_code=422, editor=True, values=values, errors=errors)
    return detail_response(request, user, device, status_code=422, approve_values=values, approve_errors=errors)
