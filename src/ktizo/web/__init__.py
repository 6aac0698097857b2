"""The admin web UI at /ui: server-rendered pages (Jinja2 + vendored htmx) over the same services as the API."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from ktizo.web import audit, auth, bulk, cluster, codes, devices, users

STATIC = Path(__file__).parent / "static"


def mount(app: FastAPI) -> None:
    """Add the UI's routes and its static files (htmx, CSS, JS; nothing from a CDN) to ``app``."""
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
    for module in (auth, bulk, devices, codes, cluster, audit, users):
        app.include_router(module.router)
