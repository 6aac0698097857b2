"""Assembles the API's routers."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from ktizo.api import (
    agents,
    assets,
    audit,
    auth,
    cluster,
    devices,
    errors,
    groups,
    health,
    netboot,
    rules,
    sites,
    talos,
    webhooks,
)


def build_router() -> APIRouter:
    router = APIRouter()
    router.include_router(health.router)
    router.include_router(talos.router)
    router.include_router(netboot.router)
    router.include_router(assets.router)
    router.include_router(devices.router)
    router.include_router(cluster.router)
    router.include_router(groups.router)
    router.include_router(audit.router)
    router.include_router(auth.router)
    router.include_router(agents.router)
    router.include_router(sites.router)
    router.include_router(rules.router)
    router.include_router(webhooks.router)
    return router


def install_error_handlers(app: FastAPI) -> None:
    errors.install(app)
