"""The boot storm's doors answered in front of FastAPI: Talos's config download and iPXE's per-machine script. In a
storm every machine comes through here, and FastAPI's routing, dependency injection and parameter validation cost
two thirds of what one core can serve.

Only a request that FastAPI's route would take as it is comes this way: ``GET /api/v1/config/download`` whose
query names each of ``mac``, ``uuid``, ``serial`` and ``hostname`` at most once, within the route's length limits,
and any ``GET /api/v1/boot/ipxe``. Anything else (a longer value, a repeated or unknown parameter) goes on to the
route, which gives FastAPI's own answer. Both use the same use case (``services.download``, ``api.netboot``'s
``machine_script``), the same claim and the same refusals, so what a machine gets does not depend on which of the
two answered it."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import unquote_plus

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from ktizo.api.netboot import machine_script, script_base
from ktizo.api.talos import YAML, talos_claim, text_refusal, until_disconnect
from ktizo.domain.errors import KtizoError
from ktizo.services.boot import Answer
from ktizo.services.prometheus import Metrics
from ktizo.services.registry import Services

DOWNLOAD = "/api/v1/config/download"
IPXE = "/api/v1/boot/ipxe"
# The route's own limits (``Query(max_length=…)``): a value over one is FastAPI's to refuse, in FastAPI's words.
LIMITS = {"mac": 64, "uuid": 64, "serial": 256, "hostname": 256}
_YAML_TYPE = YAML.encode()
_TEXT_TYPE = b"text/plain; charset=utf-8"
Payload = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, headers, body


class BootDoors:
    """The boot requests it can answer, in front of the app (``app.asgi.KtizoApp``): ``takes`` says which requests
    to offer, ``answer`` answers one or declines it (False: the app answers it)."""

    def __init__(self, services: Services, metrics: Metrics | None = None, *, public_url: str | None = None) -> None:
        self.services = services
        self.metrics = metrics
        self.public_url = public_url

    @staticmethod
    def takes(scope: Scope) -> bool:
        return bool(scope["type"] == "http" and scope["path"] in (DOWNLOAD, IPXE) and scope["method"] == "GET")

    async def answer(self, scope: Scope, receive: Receive, send: Send) -> bool:
        started = time.perf_counter()
        status: int | None = 500
        route = scope["path"]  # the route template the latency histogram files these requests under
        try:
            if route == IPXE:
                status = await self._ipxe(scope, send)
            else:
                status = await self._download(scope, receive, send, started)
        finally:
            if status is not None and self.metrics is not None:
                self.metrics.observe_request("GET", route, status, time.perf_counter() - started)
        return status is not None

    async def _ipxe(self, scope: Scope, send: Send) -> int | None:
        client = scope.get("client")
        base = script_base(self.public_url, Request(scope))
        try:
            script = await machine_script(
                self.services, _pairs(scope["query_string"]), base, client[0] if client else None
            )
        except KtizoError:
            # The route answers with FastAPI's error handlers (an unsafe public URL, an identity another machine
            # holds); a knock is idempotent, so it is asked again there.
            return None
        body = script.encode()
        # As the route answers: no Server-Timing (only Talos's door has it).
        return await _send(
            send, (200, [(b"content-length", str(len(body)).encode()), (b"content-type", _TEXT_TYPE)], body)
        )

    async def _download(self, scope: Scope, receive: Receive, send: Send, started: float) -> int | None:
        """Answer the request and return the status; None when it is not one for this door (see the module)."""
        client = scope.get("client")
        source_ip = client[0] if client else None
        download = self.services.download
        # The same query from the same address is the same claim: its answer, while it holds, needs no decision.
        # (The Authorization header is not part of it: an answer that depends on a token is never remembered.)
        key = (scope["query_string"], source_ip)
        remembered = download.recall(key)
        if remembered is not None:
            return await self._answer(remembered.answer, remembered.payload, receive, send, started)
        query = _query(scope["query_string"])
        if query is None:
            return None
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        try:
            claim = talos_claim(
                query.get("mac"),
                query.get("uuid"),
                query.get("serial"),
                query.get("hostname"),
                source_ip,
                authorization=authorization,
            )
        except KtizoError as exc:
            return await _send(send, _refusal(exc), started)
        gone = asyncio.Event()
        listening: list[asyncio.Task[None]] = []

        def listen() -> None:
            # A held request must stop waiting when its client hangs up; one answered at once needs no task
            # watching for that (a pending machine's poll, the storm's usual case).
            if not listening:
                listening.append(asyncio.create_task(until_disconnect(receive, gone)))

        try:
            answer = await download.request(claim, gone, on_hold=listen)
        except KtizoError as exc:
            return await _send(send, _refusal(exc), started)
        finally:
            for task in listening:
                task.cancel()
        payload = _payload(answer)
        kept = download.remember(key, answer)
        if kept is not None:
            kept.payload = payload
        return await self._answer(answer, payload, receive, send, started, gone)

    async def _answer(
        self,
        answer: Answer,
        payload: Payload,
        receive: Receive,
        send: Send,
        started: float,
        gone: asyncio.Event | None = None,
    ) -> int:
        if answer.error is not None or answer.delivered is None:
            return await _send(send, payload, started)
        # A config is recorded as delivered only when handed to an open connection: watch for a hang-up the
        # server has already seen (it reaches ``gone`` first), then decide before sending, since after the
        # response the server reports every connection as gone.
        gone = gone or asyncio.Event()  # a remembered answer's request watched for nothing yet
        listener = asyncio.create_task(until_disconnect(receive, gone))
        await asyncio.sleep(0)
        open_before = not gone.is_set()
        listener.cancel()
        if not open_before:
            return 200
        await _send(send, payload, started)
        await self.services.download.delivered(answer, gone)
        return 200


def _payload(answer: Answer) -> Payload:
    """The response to ``answer``, all but its Server-Timing header."""
    if answer.error is not None:
        return _refusal(answer.error)
    body = answer.result()
    return 200, [(b"content-length", str(len(body)).encode()), (b"content-type", _YAML_TYPE)], body


def _refusal(exc: KtizoError) -> Payload:
    status, extra, text = text_refusal(exc)
    body = text.encode()
    headers = [
        *((k.lower().encode(), v.encode("latin-1")) for k, v in extra.items()),
        (b"content-length", str(len(body)).encode()),
        (b"content-type", _TEXT_TYPE),
    ]
    return status, headers, body


async def _send(send: Send, payload: Payload, started: float | None = None) -> int:
    """Send ``payload``; with ``started``, a Server-Timing header of the time since."""
    status, headers, body = payload
    if started is not None:
        timing = f"app;dur={(time.perf_counter() - started) * 1e3:.3f}".encode()
        headers = [*headers, (b"server-timing", timing)]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return status


def _query(raw: bytes) -> dict[str, str] | None:
    """The download's parameters, or None when the request is not one this door answers (see the module)."""
    query: dict[str, str] = {}
    for key, value in _pairs(raw):
        limit = LIMITS.get(key)
        if limit is None or len(value) > limit or key in query:
            return None
        query[key] = value
    return query


def _pairs(raw: bytes) -> list[tuple[str, str]]:
    """A query string's pairs by parse_qsl's rules (``&`` only, empty parts skipped, blank values kept, UTF-8
    percent-decoding), without its cost for the values that need no decoding at all (a UUID, a serial)."""
    pairs = []
    for part in raw.decode("latin-1").split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        if "%" in key or "+" in key:
            key = unquote_plus(key)
        if "%" in value or "+" in value:
            value = unquote_plus(value)
        pairs.append((key, value))
    return pairs
