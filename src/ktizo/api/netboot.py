"""Network boot: iPXE scripts, DHCP events from dnsmasq, Talos's OAuth device flow, console-code approval."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ktizo.api.deps import Operator, ServicesDep, client_ip
from ktizo.api.errors import responses
from ktizo.api.schemas import ApproveIn, DeviceOut, MacAddress
from ktizo.domain.errors import ValidationFailed
from ktizo.domain.identity import normalize_ip
from ktizo.services.device_flow import OAuthError
from ktizo.services.devices import DeviceChanges
from ktizo.services.ipxe import parse_boot_facts
from ktizo.services.registry import Services

router = APIRouter(tags=["boot"])
IPXE = "text/plain"  # iPXE reads scripts by their #!ipxe line, whatever the type
_IPXE_200: dict[int | str, dict[str, Any]] = {
    200: {"content": {IPXE: {"schema": {"type": "string"}}}, "description": "An iPXE script"}
}
UserCode = Annotated[str, Path(max_length=16, description="The code on the machine's console, e.g. BCDF-GHJK")]


def base_url(request: Request) -> str:
    return script_base(request.app.state.settings.public_url, request)


def script_base(public_url: str | None, request: Request) -> str:
    """The URL scripts point back at: ``KTIZO_PUBLIC_URL``, else the one the request came in on (``api.boot_doors``
    asks in front of the app, where ``request.app`` is not set yet)."""
    return public_url.rstrip("/") if public_url else str(request.base_url).rstrip("/")


@router.get("/boot.ipxe", response_class=PlainTextResponse, responses=_IPXE_200)
def boot_ipxe(request: Request, services: ServicesDep) -> PlainTextResponse:
    """The static entry point DHCP hands to iPXE; it chains to the per-machine script with what iPXE knows."""
    return PlainTextResponse(services.ipxe.entry_script(base_url(request)))


@router.get("/api/v1/boot/ipxe", response_class=PlainTextResponse, responses=_IPXE_200)
async def machine_ipxe(request: Request, services: ServicesDep) -> PlainTextResponse:
    """The per-machine script: boot Talos (unknown, pending, approved and not installed), or leave the network
    boot (rejected: next boot device; installed: local disk). Facts iPXE reports are stored on the device."""
    return PlainTextResponse(
        await machine_script(services, request.query_params.items(), base_url(request), client_ip(request))
    )


async def machine_script(services: Services, pairs: Iterable[tuple[str, str]], base: str, ip: str | None) -> str:
    """The route's script for the query's ``pairs`` (a repeated name: its last value), also given by
    ``api.boot_doors``."""
    query = {k: v[:256] for k, v in pairs}
    try:
        facts = parse_boot_facts(query)
    except ValidationFailed as exc:
        # Never echo what the machine sent: a hostile value must not become a script line.
        what = exc.field or "a value"
        return f"#!ipxe\necho Ktizo could not read this machine's {what}; booting the next device.\nsleep 10\nexit 1\n"
    # A machine knocking again with nothing new is answered from one read, on the loop where reads never block.
    script = services.ipxe.quiet_script(facts, base, ip) if services.db.nonblocking_reads else None
    if script is None:  # most often a machine nobody knows yet: registered together with the others arriving
        script = await services.ipxe.new_machine_script(facts, base, ip)
    if script is None:
        script = await run_in_threadpool(services.ipxe.machine_script, facts, base, ip)
    return script


class DhcpEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Annotated[str, Field(pattern="^(add|old|del)$")]
    mac: MacAddress
    ip: Annotated[str, Field(max_length=45)]
    hostname: Annotated[str, Field(max_length=253)] | None = None


class DhcpResult(BaseModel):
    result: str


@router.post("/api/v1/dhcp/events", response_model=DhcpResult, responses=responses(401))
def dhcp_event(body: DhcpEvent, request: Request, services: ServicesDep) -> DhcpResult:
    """What dnsmasq's dhcp-script reports (through `ktizo pxe dhcp-event`), with the local hook's token."""
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    services.dhcp.check_token(token if scheme.lower() == "bearer" else None)
    ip = normalize_ip(body.ip, "ip")
    return DhcpResult(result=services.dhcp.event(body.action, body.mac, ip, body.hostname))


def _oauth_error(exc: OAuthError) -> JSONResponse:
    return JSONResponse(
        {"error": exc.error, "error_description": exc.message},
        status_code=exc.status,
        headers={"Cache-Control": "no-store"},
    )


class OAuthErrorOut(BaseModel):
    error: str
    error_description: str


class DeviceCodeOut(BaseModel):
    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str
    expires_in: int
    interval: int


class TokenGrant(BaseModel):
    access_token: str
    token_type: str
    expires_in: int


_FORM = {"requestBody": {"content": {"application/x-www-form-urlencoded": {"schema": {"type": "object"}}}}}


async def _form(request: Request) -> dict[str, str]:
    form = await request.form()
    return {k: str(v)[:256] for k, v in form.items() if isinstance(v, str)}


@router.post(
    "/device/code",
    response_model=DeviceCodeOut,
    responses={
        400: {"model": OAuthErrorOut},
        401: {"model": OAuthErrorOut},
        429: {"model": OAuthErrorOut, "description": "Too many new machines from this address; retry later"},
        503: {"model": OAuthErrorOut},
    },
    openapi_extra=_FORM,
)
async def device_code(request: Request, services: ServicesDep) -> JSONResponse:
    """RFC 8628 device authorization, as Talos calls it with `talos.config.oauth.client_id` (the path is the
    talos.config URL's with /device/code). The machine is registered as pending; its console shows the code."""
    form = await _form(request)
    try:
        out = await run_in_threadpool(services.device_flow.start, form, base_url(request), client_ip(request))
    except OAuthError as exc:
        return _oauth_error(exc)
    return JSONResponse(out, headers={"Cache-Control": "no-store"})


@router.post(
    "/token",
    response_model=TokenGrant,
    responses={400: {"model": OAuthErrorOut}, 401: {"model": OAuthErrorOut}, 503: {"model": OAuthErrorOut}},
    openapi_extra=_FORM,
)
async def token(request: Request, services: ServicesDep) -> JSONResponse:
    """RFC 8628 token polling: authorization_pending, slow_down, access_denied, expired_token, or a token that
    the config download then requires for this machine."""
    form = await _form(request)
    try:
        out = await run_in_threadpool(services.device_flow.poll, form)
    except OAuthError as exc:
        return _oauth_error(exc)
    return JSONResponse(out, headers={"Cache-Control": "no-store"})


@router.get("/api/v1/device-codes/{user_code}", response_model=DeviceOut, responses=responses(401, 403, 404))
def lookup_code(user_code: UserCode, services: ServicesDep, actor: Operator) -> DeviceOut:
    """Which machine shows this console code (wrong codes count towards a lockout)."""
    return DeviceOut.of(services.console_codes.lookup(actor, user_code), actor)


@router.post(
    "/api/v1/device-codes/{user_code}/approve",
    response_model=DeviceOut,
    responses=responses(401, 403, 404, 409),
)
def approve_code(
    user_code: UserCode, services: ServicesDep, actor: Operator, body: Annotated[ApproveIn | None, Body()] = None
) -> DeviceOut:
    """Approve the machine whose console shows this code, with the same fields as a device approval; Talos's
    next token poll (every few seconds) gets its token and downloads its config."""
    body = body or ApproveIn()
    values = {name: getattr(body, name) for name in body.model_fields_set}
    changes = DeviceChanges(**values)
    if changes.notes is None:
        changes.notes = ""
    device = services.console_codes.approve(actor, user_code, changes)
    return DeviceOut.of(device, actor, services.devices.warnings(device))


class InstalledIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    installed: bool


@router.post("/api/v1/devices/{device_id}/installed", response_model=DeviceOut, responses=responses(401, 403, 404))
def set_installed(
    device_id: Annotated[int, Path(ge=1, le=2**31 - 1)], body: InstalledIn, services: ServicesDep, actor: Operator
) -> DeviceOut:
    """Mark Talos installed (iPXE then boots the local disk) or not (the next netboot reinstalls)."""
    return DeviceOut.of(services.devices.set_installed(actor, device_id, body.installed), actor)
