"""The doors booting machines knock at, without credentials: register and config download.

Talos treats every non-200 answer as "retry later", so refusals are plain text it can log usefully."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from ktizo.api.deps import ServicesDep, client_ip
from ktizo.api.errors import ErrorOut, error_body, status_for
from ktizo.api.schemas import MacIn
from ktizo.domain.devices import DeviceStatus
from ktizo.domain.errors import KtizoError, ValidationFailed
from ktizo.domain.identity import (
    is_placeholder,
    normalize_hostname,
    normalize_mac,
    normalize_serial,
    normalize_uuid,
)
from ktizo.http.errors import retry_after
from ktizo.services.boot import Claim
from ktizo.services.registry import Services

router = APIRouter(prefix="/api/v1", tags=["boot"])

YAML = "application/yaml"
_YAML_200 = {"content": {YAML: {}}, "description": "The device's Talos configuration"}


def _text_error(description: str) -> dict[str, object]:
    return {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": description}


def _optional(value: str | None, normalize: Callable[[str, str], str], field: str) -> str | None:
    if value is None or is_placeholder(value):
        return None
    return normalize(value, field)


def _lenient_hostname(value: str | None) -> str | None:
    # A hostname from DHCP is only a hint shown to the operator; a bad one is dropped, not refused.
    try:
        return _optional(value, normalize_hostname, "hostname")
    except ValidationFailed:
        return None


def talos_claim(
    mac: str | None,
    uuid: str | None,
    serial: str | None,
    hostname: str | None,
    source_ip: str | None,
    *,
    authorization: str | None,
) -> Claim:
    """The claim of a request in Talos's query form, each value normalised; raises ``ValidationFailed``."""
    return Claim(
        mac=_optional(mac, normalize_mac, "mac"),
        uuid=_optional(uuid, normalize_uuid, "uuid"),
        serial=_optional(serial, normalize_serial, "serial"),
        hostname=_lenient_hostname(hostname),
        source_ip=source_ip,
        authorization=authorization,
    )


def text_refusal(exc: KtizoError) -> tuple[int, dict[str, str], str]:
    """The plain-text refusal Talos logs: status, headers (Retry-After, when it has one), body."""
    status = status_for(exc)
    return 400 if status == 422 else status, retry_after(exc), str(exc) + "\n"


@router.get(
    "/config/download",
    response_class=Response,
    responses={
        200: _YAML_200,
        400: _text_error("The request names no machine, or names it in a malformed way"),
        403: _text_error(
            "Device not approved. Current status: pending (or rejected); or its identity is not proven (the same "
            "answer whichever factor did not match)"
        ),
        429: _text_error("Too many new machines from this address in the last minute; retry after Retry-After"),
        503: _text_error("No base configuration for the device's role yet"),
    },
)
async def download_config_get(
    request: Request,
    services: ServicesDep,
    mac: Annotated[str | None, Query(max_length=64, description="`${mac}` as Talos substitutes it")] = None,
    uuid: Annotated[str | None, Query(max_length=64, description="`${uuid}`: SMBIOS UUID")] = None,
    serial: Annotated[str | None, Query(max_length=256, description="`${serial}`: SMBIOS serial")] = None,
    hostname: Annotated[str | None, Query(max_length=256, description="`${hostname}` (from DHCP)")] = None,
) -> Response:
    """What real Talos calls: `talos.config=http://ktizo:8000/api/v1/config/download?mac=${mac}&uuid=${uuid}&serial=${serial}`.

    Unknown machines are registered as pending. Until approved the answer is 403 (Talos retries with backoff);
    a pending machine's request is held open until it is approved (``KTIZO_LONG_POLL_SECONDS``). Once approved
    the answer is the role's base config customized for the device."""
    started = time.perf_counter()

    def refused(exc: KtizoError) -> Response:
        status, headers, body = text_refusal(exc)
        headers |= timing(started)
        return PlainTextResponse(body, status_code=status, headers=headers)

    try:
        claim = talos_claim(
            mac, uuid, serial, hostname, client_ip(request), authorization=request.headers.get("authorization")
        )
    except KtizoError as exc:
        return refused(exc)
    return await _download(request, services, claim, refused, lambda: timing(started))


@router.post(
    "/config/download",
    response_class=Response,
    responses={
        200: _YAML_200,
        403: {"model": ErrorOut, "description": "Device not approved, or its identity not proven"},
        429: {"model": ErrorOut, "description": "Too many new machines from this address; retry later"},
        503: {"model": ErrorOut, "description": "No base configuration for the role yet"},
    },
)
async def download_config_post(body: MacIn, request: Request, services: ServicesDep) -> Response:
    """The seed's form: `{"mac_address": "00:11:22:33:44:55"}`. Same rules as the GET, long poll included."""

    def refused(exc: KtizoError) -> Response:
        return JSONResponse(error_body(exc), status_code=status_for(exc), headers=retry_after(exc))

    claim = Claim(mac=body.mac_address, source_ip=client_ip(request))
    return await _download(request, services, claim, refused, dict)


async def _download(
    request: Request,
    services: Services,
    claim: Claim,
    refused: Callable[[KtizoError], Response],
    headers: Callable[[], dict[str, str]],
) -> Response:
    """The one config-download use case behind both forms; this adapter adds only the answer's shape and the
    client's hang-up (which ends a long poll at once and means the config was never delivered)."""
    gone = asyncio.Event()
    listener = asyncio.create_task(until_disconnect(request.receive, gone))
    try:
        answer = await services.download.request(claim, gone)
        body = answer.result()
    except KtizoError as exc:
        listener.cancel()
        return refused(exc)
    return _Delivering(body, headers(), gone, listener, lambda: services.download.delivered(answer, gone))


async def until_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


class _Delivering(Response):
    """A config response that records its delivery after it was handed to a connection that was still open.

    Whether the client got the bytes nobody can know short of an answer from it; a client that had hung up
    before the response went out (a held request abandoned, a scanner) is what this tells apart."""

    def __init__(
        self,
        content: bytes,
        headers: dict[str, str],
        gone: asyncio.Event,
        listener: asyncio.Task[None],
        delivered: Callable[[], Awaitable[None]],
    ) -> None:
        super().__init__(content, media_type=YAML, headers=headers)
        self._gone, self._listener, self._delivered = gone, listener, delivered

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(0)  # a hang-up the server has already seen reaches ``gone`` first
        # After the response completes the server reports every connection as gone: decide before sending.
        open_before = not self._gone.is_set()
        self._listener.cancel()
        if open_before:
            await super().__call__(scope, receive, send)
            await self._delivered()


def timing(started: float) -> dict[str, str]:
    # The boot path's own cost, for benchmarks and operators' load balancers (RFC: W3C Server-Timing).
    return {"Server-Timing": f"app;dur={(time.perf_counter() - started) * 1e3:.3f}"}


class RegisterOut(BaseModel):
    """All an unauthenticated caller learns: the MAC it named and the machine's state."""

    mac_address: str
    status: DeviceStatus


@router.post(
    "/devices/register",
    response_model=RegisterOut,
    responses={
        200: {"model": RegisterOut, "description": "Already known; nothing changed but last_seen"},
        201: {"model": RegisterOut, "description": "Registered as pending"},
        429: {"model": ErrorOut, "description": "Too many new machines from this address; retry later"},
    },
    status_code=201,
)
def register_device(body: MacIn, request: Request, response: Response, services: ServicesDep) -> RegisterOut:
    """Explicit registration by MAC (the seed's optional first step). The device waits as pending."""
    device, created = services.devices.register(body.mac_address, client_ip(request))
    if not created:
        response.status_code = 200
    return RegisterOut(mac_address=body.mac_address, status=DeviceStatus(device.status))
