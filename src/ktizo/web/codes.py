"""Approve by console code: the operator types the code a Talos console shows (Talos's OAuth device flow),
sees which machine it belongs to, and approves it with hostname, IP and role. The machine's next token poll,
a few seconds later, gets its config."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from ktizo.domain.errors import KtizoError, NotFound, ValidationFailed
from ktizo.web.device_forms import APPROVE_FIELDS, approve_changes, network_hint
from ktizo.web.forms import Errors, note_error, text
from ktizo.web.routing import WebRoute
from ktizo.web.session import CheckedForm, CurrentUser, WebUser, services_of
from ktizo.web.templating import page

router = APIRouter(route_class=WebRoute, include_in_schema=False)

BLANK = {"hostname": "", "ip_address": "", "role": "worker", "notes": ""}


def _page(request: Request, user: WebUser, *, status_code: int = 200, **context: Any) -> Response:
    defaults: dict[str, Any] = {"code": "", "device": None, "errors": {}, "values": BLANK, "approved": None}
    return page(
        request,
        "device_codes.html",
        user,
        nav="codes",
        hint=network_hint(services_of(request)),
        status_code=status_code,
        **(defaults | context),
    )


@router.get("/ui/device-codes")
def device_codes(request: Request, user: CurrentUser) -> Response:
    """Talos prints this page's URL (and a QR code of it with ``?code=``) on the machine's console.

    Only fills the code in: a lookup that misses counts toward the operator's lockout, and a GET is what any
    other site can make a signed-in browser send (SameSite=Lax cookies go along on top-level navigations)."""
    return _page(request, user, code=request.query_params.get("code", "")[:16].strip())


@router.post("/ui/device-codes")
def look_up_code(request: Request, user: CurrentUser, form: CheckedForm) -> Response:
    services = services_of(request)
    code = text(form, "code", 16).strip()
    errors: Errors = {}
    device = None
    if code and user.can_operate:
        try:
            device = services.console_codes.lookup(user.actor, code)
        except (NotFound, ValidationFailed) as exc:
            errors["code"] = exc.message
    return _page(request, user, code=code, device=device, errors=errors, status_code=404 if errors else 200)


@router.post("/ui/device-codes/approve")
def approve_by_code(request: Request, user: CurrentUser, form: CheckedForm) -> Response:
    services = services_of(request)
    code = text(form, "code", 16).strip()
    errors: Errors = {}
    changes, values = approve_changes(form, errors)
    device = None
    code_refused = False
    if not errors:
        try:
            device = services.console_codes.approve(user.actor, code, changes)
        except NotFound as exc:
            # Expired or taken meanwhile: say so by the code field. It already counted as a miss, so the page is
            # drawn without looking the code up again (that would count a second one).
            code_refused = True
            errors["code"] = exc.message
        except KtizoError as exc:
            note_error(errors, exc, (*APPROVE_FIELDS, "code"))
    if device is not None and not errors:
        return _page(request, user, values={}, approved=device)
    try:
        device = services.console_codes.lookup(user.actor, code) if code and not code_refused else None
    except KtizoError:
        device = None
    return _page(request, user, code=code, device=device, errors=errors, values=values, status_code=422)
