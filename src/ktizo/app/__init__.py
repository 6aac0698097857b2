"""Wiring: the one place that turns settings into a database, services, an ASGI app and a running server.

The CLI imports this package on every command, so the heavy parts (FastAPI, uvicorn) load only when asked for."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ktizo.db import Database
    from ktizo.services.registry import Services
    from ktizo.settings import Settings


def build_services(settings: Settings, db: Database | None = None) -> Services:
    from ktizo.app.wiring import build_services as build

    return build(settings, db)


def create_app(settings: Settings, services: Services | None = None) -> FastAPI:
    from ktizo.app.asgi import create_app as create

    return create(settings, services)
