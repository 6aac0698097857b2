"""Wiring: the one place that turns settings into a database, services and an ASGI app."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import RedirectResponse

from ktizo import __version__
from ktizo.api import BodyLimitMiddleware, build_router, install_error_handlers
from ktizo.api.docs import install_docs
from ktizo.api.errors import ErrorOut
from ktizo.db import Database
from ktizo.jobs.runner import JobRunner, default_jobs
from ktizo.pki.sealing import Sealer
from ktizo.services.audit import AuditService
from ktizo.services.boot import BootService
from ktizo.services.bulk import BulkService
from ktizo.services.cluster import ClusterService
from ktizo.services.devices import DeviceService
from ktizo.services.groups import GroupService
from ktizo.services.netboot import NetbootService
from ktizo.services.preview import PreviewService
from ktizo.services.registry import Services
from ktizo.services.render import ConfigSource, RenderCache, Renderer
from ktizo.services.users import UserService
from ktizo.services.watch import ApprovalWatcher
from ktizo.settings import Settings
from ktizo.talos import parse_talos_version
from ktizo.web import mount as mount_web

log = logging.getLogger("ktizo")

DESCRIPTION = """\
Every new machine knocks at Ktizo's door and waits as **pending** until an operator approves it.

* Talos fetches `GET /api/v1/config/download?mac=${mac}&uuid=${uuid}&serial=${serial}` (no credentials).
* Operators authenticate with `Authorization: Bearer <token>` (`ktizo tokens create USER`, or
  `POST /api/v1/auth/login`). Roles: viewer reads, operator approves/rejects/edits, admin does everything.
"""


def build_services(settings: Settings, db: Database | None = None) -> Services:
    db = db or Database(settings.effective_database_url)
    sealer = Sealer(settings.secret_keys())
    talos_version = parse_talos_version(settings.talos_version)
    source = ConfigSource(db, sealer, settings.base_templates_dir, talos_version)
    renderer = Renderer(source, RenderCache(settings.render_cache_bytes))
    watcher = ApprovalWatcher(db)
    devices = DeviceService(db, source, watcher, new_per_minute=settings.new_devices_per_minute)
    netboot = NetbootService(
        db,
        devices,
        watcher,
        assets_dir=settings.assets_dir,
        talos_version=str(talos_version),
        oauth_enabled=settings.oauth_enabled,
        oauth_client_id=settings.oauth_client_id,
        discovery_subnets=settings.discovery_subnets,
    )
    return Services(
        db=db,
        source=source,
        renderer=renderer,
        devices=devices,
        bulk=BulkService(db, devices),
        boot=BootService(
            db,
            renderer,
            last_seen_interval=settings.last_seen_interval,
            require_lease_ip=settings.require_lease_ip,
            new_per_minute=settings.new_devices_per_minute,
            access_check=netboot.check_access_token if settings.oauth_enabled else None,
        ),
        netboot=netboot,
        watcher=watcher,
        cluster=ClusterService(db, sealer, source, settings.base_templates_dir, talos_version),
        groups=GroupService(db, source),
        preview=PreviewService(db, renderer),
        users=UserService(db),
        audit=AuditService(db),
    )


def create_app(settings: Settings, services: Services | None = None) -> FastAPI:
    """Build the ASGI app. The database must already be migrated (``ktizo serve`` does that first)."""
    services = services or build_services(settings)
    runner = JobRunner(default_jobs(services, settings.discovery_timeout_hours))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        runner.start()
        try:
            yield
        finally:
            await runner.stop()

    app = FastAPI(
        lifespan=lifespan,
        title="Ktizo",
        version=__version__,
        description=DESCRIPTION,
        docs_url=None,  # served from the package by install_docs: provisioning networks are often offline
        redoc_url=None,
        responses={
            400: {"model": ErrorOut, "description": "The request body could not be parsed"},
            413: {"model": ErrorOut, "description": "The request body is over the limit"},
        },
    )
    install_docs(app)
    app.state.services = services
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(build_router())
    app.add_middleware(
        BodyLimitMiddleware,
        default_limit=settings.max_body_bytes,
        # Base configs and group patches (inline manifests) are legitimately larger than other requests.
        prefix_limits={
            "/api/v1/cluster/base/": settings.max_upload_bytes,
            "/api/v1/groups": settings.max_upload_bytes,
            "/ui/cluster/base": settings.max_upload_bytes,
        },
    )

    mount_web(app)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui")

    return app
