"""The admin web UI at /ui: server-rendered pages (Jinja2 + vendored htmx) over the same services as the API."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.responses import Response

# device_forms first: it registers the {id} path convertor the routes of the others compile with.
from ktizo.web import device_forms  # noqa: F401  isort: skip
from ktizo.web import (
    agents,
    audit,
    auth,
    bulk,
    cluster,
    codes,
    collisions,
    device_detail,
    devices,
    routing,
    rules,
    sites,
    users,
    webhooks,
)

STATIC = Path(__file__).parent / "static"


def mount(app: FastAPI) -> None:
    """Add the UI's routes and its static files (htmx, CSS, JS; nothing from a CDN) to ``app``."""
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
    for module in (auth, bulk, devices, device_detail, agents, sites, collisions, codes, cluster, audit, users):
        app.include_router(module.router)
    app.include_router(webhooks.router)
    app.include_router(rules.router)

    async def page_or_json(request: Request, exc: Exception) -> Response:
        # A mistyped UI address is a page in the UI's look, not the API's JSON.
        assert isinstance(exc, HTTPException)
        if request.url.path.startswith("/ui") and exc.status_code in (404, 405):
            title = "Not found" if exc.status_code == 404 else "Not allowed here"
            message = (
                "There is no such page in Ktizo's UI." if exc.status_code == 404 else "That page does not take this."
            )
            response = routing.error_response(request, exc.status_code, title, message + " Start again from Devices.")
            for name, value in routing.HEADERS.items():
                response.headers.setdefault(name, value)
            return response
        return await http_exception_handler(request, exc)

    app.add_exception_handler(HTTPException, page_or_json)
