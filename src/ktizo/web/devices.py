"""Device Management: the list with its tabs, search, sorting, paging and polling; approve/reject in place;
the detail page with history, config preview, edit, delete, revoke and unbind.

Approve by console code (issue #5 item 7) belongs here too, once the OAuth device flow of issue #4 exists:
a field for the code a Talos console shows, the machine it belongs to, and the same approve form. See the
marked place in ``templates/devices/list.html``."""

from __future__ import annotations

import datetime as dt
import ipaddress
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.convertors import Convertor, register_url_convertor
from starlette.datastructures import QueryParams

from ktizo.domain.bounds import as_utc
from ktizo.domain.clock import now as utcnow
from ktizo.domain.devices import DeviceStatus, Role
from ktizo.domain.errors import KtizoError, NotFound, ValidationFailed
from ktizo.domain.identity import normalize_hostname, normalize_interface_address
from ktizo.services.audit import AuditQuery
from ktizo.services.devices import UNSET, DeviceChanges, DeviceQuery
from ktizo.services.groups import normalize_labels
from ktizo.services.records import Device
from ktizo.services.registry import Services
from ktizo.web.forms import Errors, note_error, parse, text, too_long
from ktizo.web.routing import WebRoute, is_htmx
from ktizo.web.session import CheckedForm, CurrentUser, WebUser, services_of
from ktizo.web.templating import fragment, page, set_flash


class IdConvertor(Convertor[int]):
    """``{name:id}`` in a UI path: a row id, digits as for ``{name:int}``, but at most 100 of them.

    Starlette's ``int`` calls ``int()`` while matching routes, before any sign-in check, and ``int()`` refuses
    more than 4300 digits with ValueError: a 500 for anyone. An id has at most 10 digits (the services answer
    "not found" for any number beyond the id range); a longer path matches no route and is a plain 404."""

    regex = "[0-9]{1,100}"

    def convert(self, value: str) -> int:
        return int(value)

    def to_string(self, value: int) -> str:
        return str(value)


register_url_convertor("id", IdConvertor())  # before the routes below (and in web.users) compile their paths

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
ROLE_OPTIONS = [("worker", "worker"), ("controlplane", "controlplane")]
APPROVE_FIELDS = ("hostname", "ip_address", "role", "notes")
EDIT_FIELDS = (*APPROVE_FIELDS, "install_disk", "labels")
HARDWARE_FACTS = ("manufacturer", "vendor", "product", "model")
ARCH_FACTS = ("arch", "architecture", "platform")


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


def hardware(device: Device) -> str:
    facts = device.facts or {}
    parts = [str(facts[k]) for k in HARDWARE_FACTS if facts.get(k)]
    return " ".join(dict.fromkeys(parts))  # manufacturer and vendor are often the same string


def arch(device: Device) -> str:
    facts = device.facts or {}
    return next((str(facts[k]) for k in ARCH_FACTS if facts.get(k)), "")


def network_hint(services: Services) -> tuple[str, str]:
    """(placeholder, hint) for the IP address field: the network the cluster's machines live in, as far as
    the gateway and the addresses already handed out tell."""
    gateway_text = services.cluster.settings().gateway
    gateway = ipaddress.ip_address(gateway_text) if gateway_text else None
    network = None
    recent, _ = services.devices.list(DeviceQuery(status=DeviceStatus.APPROVED, limit=25, order="id", descending=True))
    for device in recent:
        if not device.ip_address:
            continue
        try:
            candidate = ipaddress.ip_interface(device.ip_address).network
        except ValueError:
            continue
        if gateway is None or gateway in candidate:
            network = candidate
            break
    if network is None and gateway is not None and gateway.version == 4:
        network = ipaddress.ip_network(f"{gateway}/24", strict=False)
        guessed = True
    else:
        guessed = False
    if network is None:
        return "10.0.5.100/24", "CIDR form, e.g. 10.0.5.100/24. Leave empty to keep DHCP."
    if network.version == 4:
        placeholder = ".".join(str(network.network_address).split(".")[:3]) + f".x/{network.prefixlen}"
    else:
        placeholder = f"{network.network_address}x/{network.prefixlen}"
    parts = [f"CIDR form, e.g. {placeholder}."]
    parts.append(f"{'Probably n' if guessed else 'N'}etwork {network}")
    parts[-1] += f", gateway {gateway}." if gateway else "."
    return placeholder, " ".join(parts)


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


def _approve_changes(form: Any, errors: Errors) -> tuple[DeviceChanges, dict[str, str]]:
    values = {name: text(form, name, 4096 if name == "notes" else 255) for name in APPROVE_FIELDS}
    changes = DeviceChanges()
    if values["hostname"]:
        changes.hostname = parse(errors, "hostname", values["hostname"], normalize_hostname)
    if values["ip_address"]:
        changes.ip_address = parse(errors, "ip_address", values["ip_address"], normalize_interface_address)
    if values["role"]:
        if values["role"] in Role.__members__.values():
            changes.role = Role(values["role"]).value
        else:
            errors["role"] = "choose controlplane or worker"
    too_long(errors, "notes", values["notes"], 4096)
    changes.notes = values["notes"]
    return changes, values


def _after_change(request: Request, device_id: int, message: str) -> Response:
    """Post/redirect/get back to the device's page, with the outcome as a one-time notice."""
    response = RedirectResponse(f"/ui/devices/{device_id}", status_code=303)
    set_flash(response, message)
    return response


def _approved_message(device: Device, warnings: list[str]) -> str:
    parts = [device.hostname or "(Talos picks the hostname)", device.ip_address or "DHCP", device.role or device.kind]
    message = "Approved as " + " · ".join(parts) + ". It gets its config on its next request."
    return message + "".join(f" Warning: {w}." for w in warnings)


@router.post("/ui/devices/{device_id:id}/approve")
def device_approve(request: Request, device_id: int, user: CurrentUser, form: CheckedForm) -> Response:
    services = services_of(request)
    errors: Errors = {}
    changes, values = _approve_changes(form, errors)
    if not errors:
        try:
            device = services.devices.approve(user.actor, device_id, changes)
        except KtizoError as exc:
            note_error(errors, exc, APPROVE_FIELDS)
        else:
            message = _approved_message(device, services.devices.warnings(device))
            if is_htmx(request):
                return _device_row(request, user, device, message=message, with_counts=True)
            return _after_change(request, device_id, message)
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
            return _after_change(request, device_id, message)
    device = services.devices.get(device_id)
    values = {name: text(form, name, 4096) for name in APPROVE_FIELDS}
    if is_htmx(request):
        return _device_row(request, user, device, status_code=422, editor=True, values=values, errors=errors)
    return detail_response(request, user, device, status_code=422, approve_values=values, approve_errors=errors)


# -- the detail page -----------------------------------------------------------------------------------------


def detail_response(
    request: Request, user: WebUser, device: Device, *, status_code: int = 200, **extra: Any
) -> Response:
    services = services_of(request)
    history, history_total = services.audit.list(AuditQuery(device_id=device.id, limit=50))
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
            return _after_change(request, device_id, f"Saved ({changed} changed).{warnings}")
    return detail_response(
        request, user, device, status_code=422, edit_values=values, edit_errors=errors, edit_open=True
    )


@router.post("/ui/devices/{device_id:id}/unbind")
def device_unbind(request: Request, device_id: int, user: CurrentUser, form: CheckedForm) -> Response:
    services_of(request).devices.unbind(user.actor, device_id)
    return _after_change(
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
