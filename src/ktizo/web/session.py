"""Who is at the keyboard: the session cookie, the CSRF token derived from it, and the login-form token.

The session is an ordinary Ktizo bearer token (``UserService.create_token``, 12 hours) kept in an HttpOnly,
SameSite=Lax cookie, so logging out revokes it and an admin can end a session from the Users page. The CSRF
token is HMAC-SHA256(session token, "csrf"): nothing to store, different for every session, and useless to
anyone who cannot read the cookie."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from starlette.datastructures import FormData
from starlette.responses import Response

from ktizo.domain.errors import Unauthenticated
from ktizo.domain.users import UserRole
from ktizo.services.context import Actor
from ktizo.services.registry import Services
from ktizo.services.users import SESSION_TTL, Principal

SESSION_COOKIE = "ktizo_session"
LOGIN_COOKIE = "ktizo_login"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
COOKIE_PATH = "/ui"


class LoginRequired(Exception):
    """No session, or one that expired or was revoked: the browser goes to the login page."""


class CsrfRejected(Exception):
    """A state-changing request without the session's CSRF token: refused with 403."""


@dataclass(frozen=True)
class WebUser:
    principal: Principal
    token: str
    actor: Actor

    @property
    def name(self) -> str:
        return self.principal.username

    @property
    def role(self) -> UserRole:
        return self.principal.role

    @property
    def csrf(self) -> str:
        return csrf_token(self.token)

    @property
    def can_operate(self) -> bool:
        return self.role.rank >= UserRole.OPERATOR.rank

    @property
    def is_admin(self) -> bool:
        return self.role is UserRole.ADMIN


def csrf_token(session_token: str) -> str:
    return hmac.new(session_token.encode(), b"csrf", hashlib.sha256).hexdigest()


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


def current_user(request: Request) -> WebUser:
    """The signed-in user, or ``LoginRequired``. Every UI route but the login page depends on it."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise LoginRequired
    try:
        principal = services_of(request).users.resolve_token(token)
    except Unauthenticated:
        raise LoginRequired from None
    user = WebUser(principal, token, principal.actor(client_ip(request)))
    request.state.web_user = user  # error pages render the navigation for this user
    return user


CurrentUser = Annotated[WebUser, Depends(current_user)]


async def read_form(request: Request) -> FormData:
    return await request.form(max_files=2, max_fields=2000)


async def checked_form(request: Request, user: CurrentUser) -> FormData:
    """The posted form, after checking its CSRF token (hidden field, or the header htmx sends)."""
    form = await read_form(request)
    sent = request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)
    if not isinstance(sent, str) or not hmac.compare_digest(sent.encode(), user.csrf.encode()):
        raise CsrfRejected
    return form


CheckedForm = Annotated[FormData, Depends(checked_form)]


def served_over_https(request: Request) -> bool:
    """Whether the browser reaches Ktizo over TLS: the request's own scheme, or the public URL's (behind a
    TLS-terminating proxy the request arrives as plain HTTP). Cookies are then ``Secure``: never sent in clear."""
    public_url: str | None = getattr(request.app.state, "settings", None) and request.app.state.settings.public_url
    return request.url.scheme == "https" or bool(public_url and public_url.lower().startswith("https://"))


def set_session(request: Request, response: Response, token: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(SESSION_TTL.total_seconds()),
        path=COOKIE_PATH,
        httponly=True,
        samesite="lax",
        secure=served_over_https(request),
    )


def clear_session(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH, httponly=True, samesite="lax")


def new_login_nonce() -> str:
    return secrets.token_urlsafe(24)


def set_login_nonce(request: Request, response: Response, nonce: str) -> None:
    # Double-submit token for the login form, which has no session yet: stops a page elsewhere from signing
    # the browser into an attacker's account.
    response.set_cookie(
        LOGIN_COOKIE,
        nonce,
        max_age=3600,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=served_over_https(request),
    )


def login_nonce_ok(request: Request, sent: object) -> bool:
    expected = request.cookies.get(LOGIN_COOKIE)
    return bool(expected) and isinstance(sent, str) and hmac.compare_digest(sent.encode(), str(expected).encode())
