"""The doors booting machines knock at, without credentials: register and config download.

Talos treats every non-200 answer as "retry later", so refusals are plain text it can log usefully."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from ktizo.api.deps import ServicesDep, client_ip
from ktizo.api.errors import ErrorOut, error_body, status_for
from ktizo.api.schemas import DeviceOut, MacIn
from ktizo.domain.devices import DeviceStatus
from ktizo.domain.errors import KtizoError, TooManyAttempts, ValidationFailed
from ktizo.domain.identity import (
    is_placeholder,
    normalize_hostname,
    normalize_mac,
    normalize_serial,
    normalize_uuid,
)
from ktizo.services.boot import Answer, Claim, NotApproved
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


@router.get(
    "/config/download",
    response_class=Response,
    responses={
        200: _YAML_200,
        400: _text_error("The request names no machine, or names it in a malformed way"),
        403: _text_error("Device not approved. Current status: pending (or rejected), or an identity mismatch"),
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
    once approved it is the role's base config customized for the device."""
    started = time.perf_counter()
    try:
        claim = Claim(
            mac=_optional(mac, normalize_mac, "mac"),
            uuid=_optional(uuid, normalize_uuid, "uuid"),
            serial=_optional(serial, normalize_serial, "serial"),
            hostname=_lenient_hostname(hostname),
            source_ip=client_ip(request),
            authorization=request.headers.get("authorization"),
        )
        # Every machine of a boot storm comes through here. Where reads never block (SQLite in WAL mode) the
        # answer is decided on the event loop; the writes it implies are group-committed by the database's writer.
        if services.db.nonblocking_reads:
            answer = services.boot.answer(claim)
        else:
            answer = await run_in_threadpool(services.boot.answer, claim)
        if answer.followup is not None:
            await asyncio.wrap_future(services.db.submit(answer.followup))
        answer = await _hold_until_decided(request, services, claim, answer)
        body = answer.result()
    except KtizoError as exc:
        status = status_for(exc)
        return PlainTextResponse(
            str(exc) + "\n", status_code=400 if status == 422 else status, headers=_timing(started) | _retry(exc)
        )
    return Response(body, media_type=YAML, headers=_timing(started))


async def _hold_until_decided(request: Request, services: Services, claim: Claim, answer: Answer) -> Answer:
    """Long poll: hold a pending device's request open (KTIZO_LONG_POLL_SECONDS, well inside Talos's 3-minute
    attempt timeout) and answer the moment it is approved, so Talos's exponential backoff never delays a
    machine an operator has just approved."""
    timeout: float = request.app.state.settings.long_poll_seconds
    if timeout <= 0 or not isinstance(answer.error, NotApproved) or answer.error.status is not DeviceStatus.PENDING:
        return answer
    if answer.device_id is None:  # first contact: the row exists now, look again for its id
        answer = await run_in_threadpool(services.boot.answer, claim)
        if answer.device_id is None:
            return answer
    if not await services.watcher.wait(answer.device_id, timeout):
        return answer
    decided = await run_in_threadpool(services.boot.answer, claim)
    if decided.followup is not None:
        await asyncio.wrap_future(services.db.submit(decided.followup))
    return decided


def _retry(exc: KtizoError) -> dict[str, str]:
    return {"Retry-After": str(exc.retry_after)} if isinstance(exc, TooManyAttempts) else {}


def _timing(started: float) -> dict[str, str]:
    # The boot path's own cost, for benchmarks and operators' load balancers (RFC: W3C Server-Timing).
    return {"Server-Timing": f"app;dur={(time.perf_counter() - started) * 1e3:.3f}"}


@router.post(
    "/config/download",
    response_class=Response,
    responses={
        200: _YAML_200,
        403: {"model": ErrorOut, "description": "Device not approved"},
        429: {"model": ErrorOut, "description": "Too many new machines from this address; retry later"},
        503: {"model": ErrorOut, "description": "No base configuration for the role yet"},
    },
)
def download_config_post(body: MacIn, request: Request, services: ServicesDep) -> Response:
    """The seed's form: `{"mac_address": "00:11:22:33:44:55"}`. Same rules as the GET."""
    try:
        config = services.boot.fetch_config(Claim(mac=body.mac_address, source_ip=client_ip(request)))
    except KtizoError as exc:
        return JSONResponse(error_body(exc), status_code=status_for(exc), headers=_retry(exc))
    return Response(config, media_type=YAML)


@router.post(
    "/devices/register",
    response_model=DeviceOut,
    responses={
        200: {"model": DeviceOut, "description": "Already known; nothing changed but last_seen"},
        201: {"model": DeviceOut, "description": "Registered as pending"},
        429: {"model": ErrorOut, "description": "Too many new machines from this address; retry later"},
    },
    status_code=201,
)
def register_device(body: MacIn, request: Request, response: Response, services: ServicesDep) -> DeviceOut:
    """Explicit registration by MAC (the seed's optional first step). The device waits as pending."""
    device, created = services.devices.register(body.mac_address, client_ip(request))
    if not created:
        response.status_code = 200
    return DeviceOut.model_validate(device)
