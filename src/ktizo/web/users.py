"""Users and API tokens, for admins: create, disable, reset a password, change a role, create and revoke
tokens. A new password or token is shown once, in the answer to the POST that made it, and never again."""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from ktizo.domain.clock import now as utcnow
from ktizo.domain.errors import KtizoError, PermissionDenied
from ktizo.domain.users import UserRole
from ktizo.web import devices as _devices  # noqa: F401 - registers the {name:id} path convertor used below
from ktizo.web.forms import Errors, note_error, text
from ktizo.web.routing import WebRoute
from ktizo.web.session import CheckedForm, CurrentUser, WebUser, services_of
from ktizo.web.templating import page, set_flash

router = APIRouter(route_class=WebRoute, include_in_schema=False)

ROLES = [r.value for r in UserRole]


def _require_admin(user: WebUser) -> None:
    if not user.is_admin:
        raise PermissionDenied("the Users page needs the admin role")


def users_page(request: Request, user: WebUser, *, status_code: int = 200, **extra: Any) -> Response:
    _require_admin(user)
    services = services_of(request)
    tokens = services.users.list_tokens(user.actor)
    now = utcnow()
    context: dict[str, Any] = {
        "users": services.users.list(),
        "tokens": [t for t in tokens if t.active(now)],
        "inactive_tokens": len([t for t in tokens if not t.active(now)]),
        "roles": ROLES,
        "role_pairs": [(r, r) for r in ROLES],
        "secret": None,
        "create_values": {"username": "", "role": "operator"},
        "create_errors": {},
        "token_values": {"username": user.name, "name": "", "days": ""},
        "token_errors": {},
        "current_token_prefix": user.token[:10],
    }
    context.update(extra)
    response = page(request, "users.html", user, nav="users", status_code=status_code, **context)
    response.headers["Cache-Control"] = "no-store"  # a one-time secret must not come back from a cache
    return response


def _done(message: str) -> Response:
    response = RedirectResponse("/ui/users", status_code=303)
    set_flash(response, message)
    return response


@router.get("/ui/users")
def users(request: Request, user: CurrentUser) -> Response:
    return users_page(request, user)


@router.post("/ui/users")
def user_create(request: Request, user: CurrentUser, form: CheckedForm) -> Response:
    _require_admin(user)
    values = {"username": text(form, "username", 64), "role": text(form, "role", 16)}
    password = form.get("password")
    password = password if isinstance(password, str) and password else None
    errors: Errors = {}
    if values["role"] not in ROLES:
        errors["role"] = "choose viewer, operator or admin"
    # No password given: make one to hand over (shown once), as `ktizo serve` does for the first admin.
    generated = secrets.token_urlsafe(18) if password is None else None
    if not errors:
        try:
            services_of(request).users.create(
                user.actor, values["username"], UserRole(values["role"]), password or generated
            )
        except KtizoError as exc:
            note_error(errors, exc, ("username", "role", "password"))
    if errors:
        return users_page(request, user, status_code=422, create_values=values, create_errors=errors)
    name = values["username"].strip().lower()
    if generated is None:
        return _done(f"Created {name} ({values['role']}) with the password you chose.")
    return users_page(
        request, user, secret={"what": f"One-time password for {name}", "value": generated, "kind": "password"}
    )


@router.post("/ui/users/{username}/disable")
def user_disable(request: Request, username: str, user: CurrentUser, form: CheckedForm) -> Response:
    _require_admin(user)
    disabled = form.get("disabled") != "0"
    services_of(request).users.set_disabled(user.actor, username, disabled)
    return _done(f"{username} {'disabled: its password and tokens stop working now' if disabled else 'enabled'}.")


@router.post("/ui/users/{username}/role")
def user_role(request: Request, username: str, user: CurrentUser, form: CheckedForm) -> Response:
    _require_admin(user)
    role = text(form, "role", 16)
    if role not in ROLES:
        return users_page(request, user, status_code=422)
    services_of(request).users.set_role(user.actor, username, UserRole(role))
    return _done(f"{username} is now {role}.")


@router.post("/ui/users/{username}/password")
def user_password(request: Request, username: str, user: CurrentUser, form: CheckedForm) -> Response:
    _require_admin(user)
    password = services_of(request).users.reset_password(user.actor, username)
    return users_page(
        request, user, secret={"what": f"New password for {username}", "value": password, "kind": "password"}
    )


@router.post("/ui/tokens")
def token_create(request: Request, user: CurrentUser, form: CheckedForm) -> Response:
    _require_admin(user)
    values = {"username": text(form, "username", 64), "name": text(form, "name", 64), "days": text(form, "days", 6)}
    errors: Errors = {}
    ttl = None
    if values["days"]:
        if not values["days"].isdecimal() or not 1 <= int(values["days"]) <= 3650:
            errors["days"] = "a number of days from 1 to 3650, or empty for no expiry"
        else:
            ttl = dt.timedelta(days=int(values["days"]))
    token = None
    if not errors:
        try:
            token = services_of(request).users.create_token(
                user.actor, values["username"], name=values["name"] or "web", ttl=ttl
            )
        except KtizoError as exc:
            note_error(errors, exc, ("username", "name", "days"))
    if errors or token is None:
        return users_page(request, user, status_code=422, token_values=values, token_errors=errors)
    return users_page(
        request,
        user,
        secret={
            "what": f"API token for {values['username']} ({values['name'] or 'web'})",
            "value": token,
            "kind": "token",
        },
    )


@router.post("/ui/tokens/{token_id:id}/revoke")
def token_revoke(request: Request, token_id: int, user: CurrentUser, form: CheckedForm) -> Response:
    _require_admin(user)
    info = services_of(request).users.revoke_token_id(user.actor, token_id)
    return _done(f"Revoked token {info.prefix}… of {info.username}.")
