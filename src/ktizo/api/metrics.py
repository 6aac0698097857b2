"""``GET /metrics``: Prometheus's text format, outside ``/api/v1`` and the OpenAPI schema; no auth unless
``KTIZO_METRICS_TOKEN`` is set, absent when ``KTIZO_METRICS_ENABLED=false``. And the request latency histogram,
labelled by route template (``/api/v1/devices/{ref}``), never by the path a client sent."""

from __future__ import annotations

import hmac
from time import perf_counter

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ktizo import __version__
from ktizo.domain.errors import Unauthenticated
from ktizo.services import metrics as hook
from ktizo.services.prometheus import Metrics
from ktizo.services.registry import Services
from ktizo.settings import Settings

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics_page(request: Request) -> Response:
    token: str | None = request.app.state.settings.metrics_token
    if token:
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            raise Unauthenticated("metrics need Authorization: Bearer <KTIZO_METRICS_TOKEN>")
    metrics: Metrics = request.app.state.metrics
    body = await run_in_threadpool(metrics.render)  # the database part may wait for PostgreSQL
    return Response(body, media_type=CONTENT_TYPE_LATEST)


class RequestMetricsMiddleware:
    """Times each request (one ``perf_counter`` pair, one histogram observation). Innermost of the middleware, so
    that the router's ``scope["route"]`` is visible after the call; the commit, which happens as the response
    starts, is inside the time measured."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the server answers when the app raises before responding

        async def noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = perf_counter()
        try:
            await self.app(scope, receive, noting_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(scope["method"], template, status, perf_counter() - start)


def install(app: FastAPI, settings: Settings, services: Services) -> None:
    """Serve ``/metrics`` and time requests, unless metrics are off. Call before the other middleware is added."""
    if not settings.metrics_enabled:
        return
    metrics = Metrics(services.db, services.download, version=__version__, gitops=services.gitops is not None)
    hook.install(metrics)
    app.state.metrics = metrics
    app.include_router(router)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
