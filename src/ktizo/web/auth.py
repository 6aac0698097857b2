"""Signing in and out of the UI."""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool

from ktizo.domain.errors import NotFound, TooManyAttempts, Unauthenticated
from ktizo.domain.users import UserRole
from ktizo.services.context import Actor
from ktizo.services.users import SESSION_TTL
from ktizo.web.forms import text
from ktizo.web.routing import WebRoute
from ktizo.web.session import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    CheckedForm,
    CurrentUser,
    LoginRequired,
    clear_session,
    client_ip,
    current_user,
    login_nonce_ok,
    new_login_nonce,
    read_form,
    services_of,
    set_login_nonce,
    set_session,
)
from ktizo.web.templating import page

router = APIRouter(route_class=WebRoute, include_in_schema=False)


def _safe_next(value: str) -> str:
    # Only a path of this UI: never another host ("//evil", "/\evil") or a scheme.
    if value.startswith("/ui") and not value.startswith(("//", "/\\")) and "\\" not in value and "\n" not in value:
        return value
    return "/ui/devices"


def _login_page(request: Request, *, error: str = "", username: str = "", status_code: int = 200) -> Response:
    nonce = new_login_nonce()
    response = page(
        request,
        "login.html",
        None,
        status_code=status_code,
        error=error,
        username=username,
        nonce=nonce,
        next=_safe_next(request.query_params.get("next", "")),
    )
    set_login_nonce(request, response, nonce)
    return response


@router.get("/ui/login")
def login_form(request: Request) -> Response:
    if request.cookies.get(SESSION_COOKIE):
        try:
            current_user(request)
        except LoginRequired:
            pass
        else:
            return RedirectResponse(_safe_next(request.query_params.get("next", "")), status_code=303)
    return _login_page(request)


@router.post("/ui/login")
async def login(request: Request) -> Response:
    form = await read_form(request)
    username = text(form, "username", 64)
    password = form.get("password")
    if not login_nonce_ok(request, form.get("nonce")):
        return _login_page(
            request,
            error="The sign-in form expired or came from elsewhere. Please try again.",
            username=username,
            status_code=403,
        )
    if not isinstance(password, str) or not username or not password:
        return _login_page(request, error="Enter your username and password.", username=username, status_code=401)
    services = services_of(request)
    ip = client_ip(request)
    try:
        # Argon2 takes tens of milliseconds on purpose: keep it off the event loop.
        principal = await run_in_threadpool(services.users.authenticate, username, password[:1024], ip)
    except Unauthenticated:
        return _login_page(request, error="Wrong username or password.", username=username, status_code=401)
    except TooManyAttempts as exc:
        message = exc.message[0].upper() + exc.message[1:] + "."
        response = _login_page(request, error=message, username=username, status_code=429)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    actor = Actor.user(principal.username, principal.role, ip)
    token = await run_in_threadpool(
        lambda: services.users.create_token(actor, principal.username, name="web session", ttl=SESSION_TTL)
    )
    target = _safe_next(text(form, "next", 500))
    if principal.role is UserRole.VIEWER and target.startswith("/ui/users"):
        target = "/ui/devices"
    response = RedirectResponse(target, status_code=303)
    set_session(request, response, token)
    response.delete_cookie(LOGIN_COOKIE, path="/ui")
    return response


@router.post("/ui/logout")
def logout(request: Request, user: CurrentUser, form: CheckedForm) -> Response:
    with contextlib.suppress(NotFound):  # revoked meanwhile (from the Users page): signed out all the same
        services_of(request).users.revoke_token(user.actor, user.token)
    response = RedirectResponse("/ui/login", status_code=303)
    clear_session(response)
    return response
