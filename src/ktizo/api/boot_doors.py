"""Talos's config download answered beneath FastAPI: in a boot storm every machine comes through here, and
FastAPI's routing, dependency injection and parameter validation cost two thirds of what one core can serve.

Only a request that FastAPI's route would take as it is comes this way: ``GET /api/v1/config/download`` whose
query names each of ``mac``, ``uuid``, ``serial`` and ``hostname`` at most once, within the route's length limits.
Anything else (a longer value, a repeated or unknown parameter) goes on to the route, which gives FastAPI's own
answer. Both use the same use case (``services.download``), the same claim and the same refusals, so what a
machine gets does not depend on which of the two answered it."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import unquote_plus

from starlette.types import ASGIApp, Receive, Scope, Send

from ktizo.api.talos import YAML, talos_claim, text_refusal, timing, until_disconnect
from ktizo.domain.errors import KtizoError
from ktizo.services.prometheus import Metrics
from ktizo.services.registry import Services

DOWNLOAD = "/api/v1/config/download"
ROUTE = DOWNLOAD  # the route template the latency histogram files these requests under
# The route's own limits (``Query(max_length=…)``): a value over one is FastAPI's to refuse, in FastAPI's words.
LIMITS = {"mac": 64, "uuid": 64, "serial": 256, "hostname": 256}
_YAML_TYPE = YAML.encode()
_TEXT_TYPE = b"text/plain; charset=utf-8"


class BootDoors:
    """ASGI middleware: answers the config downloads it can, hands every other request to ``app``."""

    def __init__(self, app: ASGIApp, services: Services, metrics: Metrics | None = None) -> None:
        self.app = app
        self.services = services
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == DOWNLOAD and scope["method"] == "GET":
            query = _query(scope["query_string"])
            if query is not None:
                started = time.perf_counter()
                status = 500
                try:
                    status = await self._download(scope, receive, send, query, started)
                finally:
                    if self.metrics is not None:
                        self.metrics.observe_request("GET", ROUTE, status, time.perf_counter() - started)
                return
        await self.app(scope, receive, send)

    async def _download(self, scope: Scope, receive: Receive, send: Send, query: dict[str, str], started: float) -> int:
        client = scope.get("client")
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        try:
            claim = talos_claim(
                query.get("mac"),
                query.get("uuid"),
                query.get("serial"),
                query.get("hostname"),
                client[0] if client else None,
                authorization=authorization,
            )
        except KtizoError as exc:
            return await _refuse(send, exc, started)
        download = self.services.download
        gone = asyncio.Event()
        listening: list[asyncio.Task[None]] = []

        def listen() -> None:
            # Hang-ups matter to a held request and to a config about to be recorded as delivered; a refusal
            # answered at once needs no task watching for them (a pending machine's poll, the storm's usual case).
            if not listening:
                listening.append(asyncio.create_task(until_disconnect(receive, gone)))

        try:
            answer = await download.request(claim, gone, on_hold=listen)
            body = answer.result()
        except KtizoError as exc:
            for task in listening:
                task.cancel()
            return await _refuse(send, exc, started)
        listen()
        await asyncio.sleep(0)  # a hang-up the server has already seen reaches ``gone`` first
        open_before = not gone.is_set()  # after the response, the server reports every connection as gone
        listening[0].cancel()
        if not open_before:
            return 200
        headers = [
            (b"content-length", str(len(body)).encode()),
            (b"content-type", _YAML_TYPE),
            *((k.lower().encode(), v.encode()) for k, v in timing(started).items()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        await download.delivered(answer, gone)
        return 200


def _query(raw: bytes) -> dict[str, str] | None:
    """The download's parameters, or None when the request is not one this door answers (see the module)."""
    query: dict[str, str] = {}
    # parse_qsl's rules (``&`` only, empty parts skipped, blank values kept, UTF-8 percent-decoding), without
    # its cost for the values that need no decoding at all (a UUID, a serial).
    for part in raw.decode("latin-1").split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        if "%" in key or "+" in key:
            key = unquote_plus(key)
        if "%" in value or "+" in value:
            value = unquote_plus(value)
        limit = LIMITS.get(key)
        if limit is None or len(value) > limit or key in query:
            return None
        query[key] = value
    return query


async def _refuse(send: Send, exc: KtizoError, started: float) -> int:
    status, extra, text = text_refusal(exc, started)
    body = text.encode()
    headers = [
        *((k.lower().encode(), v.encode("latin-1")) for k, v in extra.items()),
        (b"content-length", str(len(body)).encode()),
        (b"content-type", _TEXT_TYPE),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return status
