"""The ASGI app: the API, the UI and the boot doors over one set of services, with what every request gets on its
way in (the client's real address, a body limit, one transaction) and its way out (that transaction committed just
before the response starts, or rolled back)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ktizo import __version__
from ktizo.api import BodyLimitMiddleware, build_router, install_error_handlers
from ktizo.api.boot_doors import BootDoors
from ktizo.api.docs import install_docs
from ktizo.api.errors import ErrorOut
from ktizo.api.metrics import install as install_metrics
from ktizo.app.wiring import build_services
from ktizo.domain.addresses import Network, client_address, is_trusted, parse_networks
from ktizo.domain.errors import Conflict
from ktizo.jobs.runner import JobRunner, default_jobs
from ktizo.services.registry import Services
from ktizo.services.transactions import begin_transaction, end_transaction
from ktizo.settings import Settings
from ktizo.web import mount as mount_web

log = logging.getLogger("ktizo")

DESCRIPTION = """\
Every new machine knocks at Ktizo's door and waits as **pending** until an operator approves it.

* Talos fetches `GET /api/v1/config/download?mac=${mac}&uuid=${uuid}&serial=${serial}` (no credentials).
* Operators authenticate with `Authorization: Bearer <token>` (`ktizo tokens create USER`, or
  `POST /api/v1/auth/login`). Roles: viewer reads, operator approves/rejects/edits workers, admin does everything
  (control planes, users, tokens, cluster secrets).
"""


CLIENT_CERT = b"client-cert"


class ClientAddressMiddleware:
    """Puts the real client's address in ``scope["client"]`` when the peer is a trusted proxy, and drops a
    ``Client-Cert`` header (RFC 9440) from every other peer
    (``KTIZO_TRUSTED_PROXIES``), so everything after it (throttles, budget, lease check, audit) sees the client."""

    def __init__(self, app: ASGIApp, trusted: tuple[Network, ...]) -> None:
        self.app = app
        self.trusted = trusted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(seen_from_client(scope, self.trusted), receive, send)


def seen_from_client(scope: Scope, trusted: tuple[Network, ...]) -> Scope:
    """``scope`` as ``ClientAddressMiddleware`` hands it on."""
    if scope["type"] == "http" and any(k == CLIENT_CERT for k, _v in scope["headers"]):
        # RFC 9440: only a trusted TLS-terminating proxy may tell Ktizo which certificate its client showed.
        peer = scope["client"][0] if scope.get("client") else None
        if peer is None or not is_trusted(peer, trusted):
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != CLIENT_CERT]}
    if trusted and scope["type"] == "http" and scope.get("client"):
        headers = {k: v for k, v in scope["headers"] if k in (b"forwarded", b"x-forwarded-for")}
        peer, _port = scope["client"]
        real = client_address(
            peer,
            headers[b"forwarded"].decode("latin-1") if b"forwarded" in headers else None,
            headers[b"x-forwarded-for"].decode("latin-1") if b"x-forwarded-for" in headers else None,
            trusted,
        )
        if real != peer:
            scope = {**scope, "client": (real, 0)}
    return scope


class KtizoApp(FastAPI):
    """FastAPI, with the boot storm's config downloads and iPXE scripts answered in front of it: FastAPI's own
    entry (telemetry, its error and body-limit middleware) and the middleware stack cost a boot door as much as its
    own work. A request ``boot_doors`` does not take goes through FastAPI untouched (its client address resolved
    there, once)."""

    boot_doors: BootDoors | None = None
    trusted: tuple[Network, ...] = ()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        doors = self.boot_doors
        if (
            doors is not None
            and doors.takes(scope)
            and await doors.answer(seen_from_client(scope, self.trusted), receive, send)
        ):
            return
        await super().__call__(scope, receive, send)


class TransactionMiddleware:
    """One transaction per request: the use cases' writes join it, and it commits as the response starts (a
    status below 400, or a refusal whose record must stand) or rolls back. A commit that fails on a constraint
    answers 409 instead of the response the handler made."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tx, token = begin_transaction()
        replaced = False

        async def finish_then_send(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return
            if message["type"] == "http.response.start" and not tx.closed:
                try:
                    if not tx.pending:
                        tx.close()  # nothing written, nothing waiting: no thread hop (the boot path's usual case)
                    elif message["status"] < 400 or tx.keep_on_refusal:
                        await asyncio.to_thread(tx.commit)
                    else:
                        await asyncio.to_thread(tx.rollback)
                except Conflict as exc:
                    replaced = True
                    await _send_conflict(send, scope, exc)
                    return
            await send(message)

        try:
            await self.app(scope, receive, finish_then_send)
        finally:
            if not tx.closed:
                if tx.pending:
                    await asyncio.to_thread(tx.rollback)
                else:
                    tx.close()
            end_transaction(token)


async def _send_conflict(send: Send, scope: Scope, exc: Conflict) -> None:
    if scope["path"].startswith("/ui"):
        body, kind = exc.message.encode(), b"text/plain; charset=utf-8"
    else:
        body, kind = json.dumps({"detail": exc.message}).encode(), b"application/json"
    headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 409, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings, services: Services | None = None) -> FastAPI:
    """Build the ASGI app. The database must already be migrated (``ktizo serve`` does that first)."""
    services = services or build_services(settings)
    runner = JobRunner(default_jobs(services))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.run_jobs:
            runner.start()
        try:
            yield
        finally:
            await runner.stop()
            services.watcher.close()

    app = KtizoApp(
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
    install_metrics(app, settings, services)  # /metrics, and request latency (innermost middleware)
    # Added innermost first: the client's address is fixed before anything else reads it, the transaction is
    # closest to the handlers.
    app.add_middleware(TransactionMiddleware)
    app.add_middleware(
        BodyLimitMiddleware,
        default_limit=settings.max_body_bytes,
        # Base configs and group patches (inline manifests) are legitimately larger than other requests.
        prefix_limits={
            "/api/v1/cluster/base/": settings.max_upload_bytes,
            "/api/v1/groups": settings.max_upload_bytes,
            "/api/v1/apply": settings.max_apply_bytes,
            "/ui/cluster/base": settings.max_upload_bytes,
        },
    )
    trusted = parse_networks(settings.trusted_proxies)
    app.add_middleware(ClientAddressMiddleware, trusted=trusted)
    metrics = getattr(app.state, "metrics", None)
    app.boot_doors, app.trusted = BootDoors(services, metrics, public_url=settings.public_url), trusted

    mount_web(app)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui")

    return app
