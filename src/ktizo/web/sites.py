"""Zero-touch sites: the list, a site's page (policy and limits, its enrollment key and the key's history, the
installer one-liner, who enrolled with which key version), creating, editing and deleting a site, and rotating
its key. Site changes and keys are the admin's; everyone signed in reads.

A rotated key is shown once, in the answer to the POST that made it: never stored, never in a URL, a redirect or
a flash cookie. Every other page shows only its fingerprint."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from starlette.datastructures import FormData

from ktizo.domain.clock import now as utcnow
from ktizo.domain.devices import DeviceStatus
from ktizo.domain.errors import KtizoError, NotFound
from ktizo.domain.users import UserRole
from ktizo.services.registry import Services
from ktizo.web import device_forms as _device_forms  # noqa: F401 - registers the {name:id} path convertor
from ktizo.web.agents import INSTALL_FROM_INDEX, public_base, public_url
from ktizo.web.forms import Errors, note_error, text
from ktizo.web.routing import WebRoute
from ktizo.web.session import CheckedForm, CurrentUser, WebUser, services_of
from ktizo.web.templating import page, set_flash

router = APIRouter(route_class=WebRoute, include_in_schema=False)

POLICIES = (
    ("auto-approve", "auto-approve: a valid key is enough"),
    ("manual", "manual: an operator approves each agent"),
)
SITE_FIELDS = ("site_code", "name", "enrollment_policy", "max_pending", "max_agents")
ROTATE_FIELDS = ("expires_days", "max_uses")
KEY_FILE = "/root/ktizo.key"
LIMIT_MAX = 1_000_000
AGENTS_SHOWN = 500  # the site page's list of agents; the API (/api/v1/agents?site=) has them all
PENDING_COUNTED = 1000


def install_command(base: str, site_code: str, fingerprint: str) -> str:
    """What an admin pastes on a host: install the agent, enroll with the site's key read from a file (the
    placeholder path, never the key), pinning Ktizo's CA."""
    return (
        f"{INSTALL_FROM_INDEX} && ktizo-agent --enroll {base} --site {site_code} "
        f"--enrollment-key-file {KEY_FILE} --ca-fingerprint {fingerprint}"
    )


def _require_admin(user: WebUser) -> None:
    user.actor.require(UserRole.ADMIN)


def find_site(services: Services, code: str) -> Any:
    """The site with this code. ``services.sites.get`` reads digits as an id; a site may be called "42" too."""
    wanted = code.strip().lower()[:64]
    try:
        site = services.sites.get(wanted)
    except NotFound:
        site = None
    if site is not None and site.site_code == wanted:
        return site
    for candidate in services.sites.list():
        if candidate.site_code == wanted:
            return candidate
    raise NotFound(f"no site {wanted!r}: the Sites page lists them")


def _limit(errors: Errors, name: str, value: str, *, low: int = 0) -> int | None:
    """A limit typed in a form: empty is no limit."""
    if not value:
        return None
    if not value.isdecimal() or not low <= int(value) <= LIMIT_MAX:
        errors[name] = f"a number from {low} to {LIMIT_MAX:,}, or empty for no limit"
        return None
    return int(value)


def _site_values(form: FormData) -> dict[str, str]:
    return {
        "site_code": text(form, "site_code", 64),
        "name": text(form, "name", 200),
        "enrollment_policy": text(form, "enrollment_policy", 16),
        "max_pending": text(form, "max_pending", 8),
        "max_agents": text(form, "max_agents", 8),
    }


def _site_values_of(site: Any) -> dict[str, str]:
    return {
        "site_code": site.site_code,
        "name": site.name or "",
        "enrollment_policy": site.enrollment_policy,
        "max_pending": "" if site.max_pending is None else str(site.max_pending),
        "max_agents": "" if site.max_agents is None else str(site.max_agents),
    }


def _done(url: str, message: str) -> Response:
    response = RedirectResponse(url, status_code=303)
    set_flash(response, message)
    return response


# -- the list ----------------------------------------------------------------------------------------------


def sites_page(request: Request, user: WebUser, *, status_code: int = 200, **extra: Any) -> Response:
    services = services_of(request)
    pending: dict[int, int] = {}
    for agent in services.agents.list(DeviceStatus.PENDING, limit=PENDING_COUNTED):
        if agent.site_id is not None:
            pending[agent.site_id] = pending.get(agent.site_id, 0) + 1
    rows = []
    for site in services.sites.list():
        agents = sum(n for _version, n, _last in services.sites.enrollments_by_version(site.id))
        rows.append(
            {
                "site": site,
                "key": services.sites.active_key(site.id),
                "agents": agents,
                "pending": pending.get(site.id, 0),
            }
        )
    context: dict[str, Any] = {
        "rows": rows,
        "policies": POLICIES,
        "create_values": {"site_code": "", "name": "", "enrollment_policy": "auto-approve"},
        "create_errors": {},
        "create_open": False,
        "collisions": len(services.zero_touch.collisions()),
    }
    context.update(extra)
    return page(request, "sites/list.html", user, nav="sites", status_code=status_code, **context)


@router.get("/ui/sites")
def sites(request: Request, user: CurrentUser) -> Response:
    return sites_page(request, user)


@router.post("/ui/sites")
def site_create(request: Request, user: CurrentUser, form: CheckedForm) -> Response:
    _require_admin(user)
    values = _site_values(form)
    errors: Errors = {}
    max_pending = _limit(errors, "max_pending", values["max_pending"])
    max_agents = _limit(errors, "max_agents", values["max_agents"])
    site = None
    if not errors:
        try:
            site = services_of(request).sites.create(
                user.actor,
                values["site_code"],
                name=values["name"],
                policy=values["enrollment_policy"],
                max_pending=max_pending,
                max_agents=max_agents,
            )
        except KtizoError as exc:
            note_error(errors, exc, SITE_FIELDS)
    if site is None:
        return sites_page(request, user, status_code=422, create_values=values, create_errors=errors, create_open=True)
    return _done(
        f"/ui/sites/{site.site_code}",
        f"Created site {site.site_code}. Rotate its key to make the first one: its agents enroll with it.",
    )


# -- one site ----------------------------------------------------------------------------------------------


def _filters(request: Request, errors: Errors) -> tuple[dict[str, str], int | None, dt.datetime | None]:
    """``?version=N&after=YYYY-MM-DD``: who enrolled with key vN after a day (from its midnight, UTC)."""
    values = {
        "version": (request.query_params.get("version") or "").strip()[:8],
        "after": (request.query_params.get("after") or "").strip()[:10],
    }
    version = None
    if values["version"]:
        if values["version"].isdecimal() and 1 <= int(values["version"]) <= LIMIT_MAX:
            version = int(values["version"])
        else:
            errors["version"] = "a key version: 1, 2, 3…"
    after = None
    if values["after"]:
        try:
            day = dt.date.fromisoformat(values["after"])
        except ValueError:
            errors["after"] = "a day as YYYY-MM-DD"
        else:
            after = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    return values, version, after


def site_page(request: Request, user: WebUser, site: Any, *, status_code: int = 200, **extra: Any) -> Response:
    services = services_of(request)
    base = public_base(request)
    fingerprint = services.authority.fingerprint()
    filter_errors: Errors = {}
    filter_values, version, after = _filters(request, filter_errors)
    agents = services.agents.list(limit=AGENTS_SHOWN + 1, site_id=site.id, key_version=version, enrolled_after=after)
    context: dict[str, Any] = {
        "site": site,
        "key": services.sites.active_key(site.id),
        "keys": services.sites.keys(site.id),
        "by_version": services.sites.enrollments_by_version(site.id),
        "agents": agents[:AGENTS_SHOWN],
        "agents_more": len(agents) > AGENTS_SHOWN,
        "filter_values": filter_values,
        "filter_errors": filter_errors,
        "filtered": version is not None or after is not None,
        "base": base,
        "public_url": bool(public_url(request)),
        "fingerprint": fingerprint,
        "install_command": install_command(base, site.site_code, fingerprint),
        "key_file": KEY_FILE,
        "policies": POLICIES,
        "edit_values": _site_values_of(site),
        "edit_errors": {},
        "edit_open": False,
        "rotate_values": {"expires_days": "", "max_uses": ""},
        "rotate_errors": {},
        "secret": None,
        "now": utcnow(),
    }
    context.update(extra)
    response = page(request, "sites/detail.html", user, nav="sites", status_code=status_code, **context)
    response.headers["Cache-Control"] = "no-store"  # the one-time key must not come back from a cache
    return response


@router.get("/ui/sites/{code}")
def site_detail(request: Request, code: str, user: CurrentUser) -> Response:
    return site_page(request, user, find_site(services_of(request), code))


@router.post("/ui/sites/{code}/edit")
def site_edit(request: Request, code: str, user: CurrentUser, form: CheckedForm) -> Response:
    _require_admin(user)
    services = services_of(request)
    site = find_site(services, code)
    values = {**_site_values(form), "site_code": site.site_code}
    errors: Errors = {}
    max_pending = _limit(errors, "max_pending", values["max_pending"])
    max_agents = _limit(errors, "max_agents", values["max_agents"])
    if not errors:
        try:
            updated = services.sites.update(
                user.actor,
                site.id,
                name=values["name"],
                policy=values["enrollment_policy"],
                max_pending=max_pending,
                max_agents=max_agents,
            )
        except KtizoError as exc:
            note_error(errors, exc, SITE_FIELDS)
        else:
            return _done(f"/ui/sites/{updated.site_code}", f"Saved site {updated.site_code}.")
    return site_page(request, user, site, status_code=422, edit_values=values, edit_errors=errors, edit_open=True)


@router.post("/ui/sites/{code}/rotate")
def site_rotate(request: Request, code: str, user: CurrentUser, form: CheckedForm) -> Response:
    """A new key; the old one is refused from this moment. The key is in this answer and nowhere else."""
    _require_admin(user)
    services = services_of(request)
    site = find_site(services, code)
    values = {"expires_days": text(form, "expires_days", 6), "max_uses": text(form, "max_uses", 8)}
    errors: Errors = {}
    expires_at = None
    if values["expires_days"]:
        if not values["expires_days"].isdecimal() or not 1 <= int(values["expires_days"]) <= 3650:
            errors["expires_days"] = "a number of days from 1 to 3650, or empty for no expiry"
        else:
            expires_at = utcnow() + dt.timedelta(days=int(values["expires_days"]))
    max_uses = _limit(errors, "max_uses", values["max_uses"], low=1)
    if not errors:
        try:
            key, info = services.sites.rotate_key(user.actor, site.id, expires_at=expires_at, max_uses=max_uses)
        except KtizoError as exc:
            if getattr(exc, "field", None) == "expires_at":
                errors["expires_days"] = exc.message
            else:
                note_error(errors, exc, ROTATE_FIELDS)
        else:
            return site_page(request, user, site, secret={"value": key, "fingerprint": info.fingerprint})
    return site_page(request, user, site, status_code=422, rotate_values=values, rotate_errors=errors)


@router.post("/ui/sites/{code}/delete")
def site_delete(request: Request, code: str, user: CurrentUser, form: CheckedForm) -> Response:
    _require_admin(user)
    services = services_of(request)
    try:
        site = find_site(services, code)
    except NotFound:
        return RedirectResponse("/ui/sites", status_code=303)  # deleted already (a second click, another tab)
    agents = sum(n for _version, n, _last in services.sites.enrollments_by_version(site.id))
    services.sites.delete(user.actor, site.id)
    kept = f" Its {agents} agent{'s' if agents != 1 else ''} stay enrolled, without a site." if agents else ""
    return _done("/ui/sites", f"Deleted site {site.site_code} and its keys: they open nothing any more.{kept}")
