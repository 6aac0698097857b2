"""Webhooks in the UI: the list (with each one's deliveries by status), creating one (admins; its secret shown once,
in the answer to the POST), a webhook's page with its delivery log (status, attempts, the receiver's last answer,
the next attempt), a test send and deleting it. Operators read; viewers do not (targets and the log are the
operators' business)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from ktizo.domain.errors import KtizoError, NotFound
from ktizo.domain.users import UserRole
from ktizo.services.events import NAMES
from ktizo.services.webhooks import STATUSES, shown_url
from ktizo.web.forms import Errors, note_error, text
from ktizo.web.routing import WebRoute
from ktizo.web.session import CheckedForm, CurrentUser, WebUser, services_of
from ktizo.web.templating import page, set_flash

router = APIRouter(route_class=WebRoute, include_in_schema=False)

FIELDS = ("name", "url", "events", "format", "secret")
FORMATS = (("json", "json: the event as JSON"), ("slack", 'slack: {"text": one line}'))
LOG_SHOWN = 200


def _done(url: str, message: str) -> Response:
    response = RedirectResponse(url, status_code=303)
    set_flash(response, message)
    return response


def _url_for(user: WebUser, url: str) -> str:
    return url if user.is_admin else shown_url(url)


def webhooks_page(request: Request, user: WebUser, *, status_code: int = 200, **extra: Any) -> Response:
    user.actor.require(UserRole.OPERATOR)
    services = services_of(request)
    counts = services.webhooks.counts()
    rows = [
        {"hook": h, "url": _url_for(user, h.url), "counts": {s: counts.get(h.name, {}).get(s, 0) for s in STATUSES}}
        for h in services.webhooks.list()
    ]
    context: dict[str, Any] = {
        "rows": rows,
        "formats": FORMATS,
        "event_names": sorted(NAMES),
        "create_values": {"name": "", "url": "", "events": "*", "format": "json"},
        "create_errors": {},
        "create_open": False,
        "secret": None,
    }
    context.update(extra)
    response = page(request, "webhooks/list.html", user, nav="webhooks", status_code=status_code, **context)
    response.headers["Cache-Control"] = "no-store"  # the one-time secret must not come back from a cache
    return response


@router.get("/ui/webhooks")
def webhooks(request: Request, user: CurrentUser) -> Response:
    return webhooks_page(request, user)


@router.post("/ui/webhooks")
def webhook_create(request: Request, user: CurrentUser, form: CheckedForm) -> Response:
    user.actor.require(UserRole.ADMIN)
    values = {
        "name": text(form, "name", 63),
        "url": text(form, "url", 2048),
        "events": text(form, "events", 2000),
        "format": text(form, "format", 16) or "json",
    }
    secret_given = text(form, "secret", 256)
    names = [n.strip() for n in values["events"].replace(",", " ").split() if n.strip()]
    errors: Errors = {}
    made = None
    try:
        made = services_of(request).webhooks.create(
            user.actor, values["name"], values["url"], names, format=values["format"], secret=secret_given or None
        )
    except KtizoError as exc:
        note_error(errors, exc, FIELDS)
    if made is None:
        return webhooks_page(
            request, user, status_code=422, create_values=values, create_errors=errors, create_open=True
        )
    hook, secret = made
    return webhooks_page(request, user, secret={"name": hook.name, "value": secret, "given": bool(secret_given)})


def find(request: Request, name: str) -> Any:
    return services_of(request).webhooks.get(name)


@router.get("/ui/webhooks/{name}")
def webhook_detail(request: Request, name: str, user: CurrentUser) -> Response:
    user.actor.require(UserRole.OPERATOR)
    services = services_of(request)
    hook = find(request, name)
    wanted = (request.query_params.get("status") or "").strip()[:16]
    status = wanted if wanted in STATUSES else None
    log = services.webhooks.deliveries(hook.name, status=status, limit=LOG_SHOWN)
    counts = services.webhooks.counts().get(hook.name, {})
    return page(
        request,
        "webhooks/detail.html",
        user,
        nav="webhooks",
        hook=hook,
        url=_url_for(user, hook.url),
        log=log,
        status=status,
        statuses=STATUSES,
        counts={s: counts.get(s, 0) for s in STATUSES},
        shown=LOG_SHOWN,
    )


@router.post("/ui/webhooks/{name}/test")
def webhook_test(request: Request, name: str, user: CurrentUser, form: CheckedForm) -> Response:
    user.actor.require(UserRole.ADMIN)
    hook = find(request, name)
    result = services_of(request).webhooks.test(hook.name)
    if result.ok:
        message = f"Test sent to {hook.name}: the receiver answered HTTP {result.status}."
    else:
        message = f"Test to {hook.name} not delivered: {result.error}"
    return _done(f"/ui/webhooks/{hook.name}", message)


@router.post("/ui/webhooks/{name}/delete")
def webhook_delete(request: Request, name: str, user: CurrentUser, form: CheckedForm) -> Response:
    user.actor.require(UserRole.ADMIN)
    try:
        services_of(request).webhooks.delete(user.actor, name)
    except NotFound:
        return RedirectResponse("/ui/webhooks", status_code=303)  # deleted already (a second click, another tab)
    return _done("/ui/webhooks", f"Deleted webhook {name.strip().lower()[:63]} and its delivery log.")
