"""The UI's route class: domain errors become pages (not the API's JSON), and every page gets its headers."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse
from fastapi.routing import APIRoute

from ktizo.domain.errors import KtizoError
from ktizo.http.errors import status_of
from ktizo.web.session import CsrfRejected, LoginRequired, clear_session
from ktizo.web.templating import render

# No inline script or style anywhere in the UI, so the browser may refuse all of it: a value that slipped past
# escaping still could not run.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def is_htmx(request: Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def error_status(exc: KtizoError) -> tuple[int, str]:
    return status_of(exc)


def error_response(request: Request, code: int, title: str, message: str) -> Response:
    if is_htmx(request):
        # htmx leaves the page as it is and ktizo.js shows this text in a notice.
        return PlainTextResponse(message, status_code=code)
    user = getattr(request.state, "web_user", None)
    html = render("error.html", user=user, nav="", flash=None, path=request.url.path, title=title, message=message)
    return HTMLResponse(html, status_code=code)


def login_redirect(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.method != "GET" or not target.startswith("/ui"):
        target = "/ui/devices"
    url = "/ui/login?" + urllib.parse.urlencode({"next": target})
    if is_htmx(request):
        response: Response = Response(status_code=401, headers={"HX-Redirect": url})
    else:
        response = RedirectResponse(url, status_code=303)
    clear_session(response)
    return response


class WebRoute(APIRoute):
    """Catches what the UI's handlers and dependencies raise and answers as a browser expects."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                response = await handler(request)
            except LoginRequired:
                response = login_redirect(request)
            except CsrfRejected:
                response = error_response(
                    request,
                    403,
                    "Request refused",
                    "The form was missing its security token (CSRF). Reload the page and try again.",
                )
            except KtizoError as exc:
                code, title = error_status(exc)
                response = error_response(request, code, title, str(exc))
            for name, value in HEADERS.items():
                response.headers.setdefault(name, value)
            response.headers.setdefault("Cache-Control", "no-store")
            return response

        return route
