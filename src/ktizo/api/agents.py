"""Linux hosts running ``ktizo-agent``: the enrollment door (seed 003: ``/api/v1/enroll``), Ktizo's agent CA
(``/api/v1/pki``), the agents' own mTLS door (``/api/v1/agent/…``, a client certificate required) and operators'
``/api/v1/agents``."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import urllib.parse
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ktizo.api.deps import Operator, ServicesDep, Viewer, client_ip
from ktizo.api.errors import ErrorOut, ValidationErrorOut, responses
from ktizo.api.schemas import DeviceOut
from ktizo.domain.bounds import as_utc
from ktizo.domain.devices import DeviceStatus
from ktizo.domain.errors import PermissionDenied
from ktizo.services.agents import Endpoint, EnrollRequest
from ktizo.services.authority import is_ip

router = APIRouter(tags=["agents"])
AgentRef = Annotated[str, Path(max_length=64, description="The agent's id or machine-id")]
PEM_MEDIA = "application/x-pem-file"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OsIn(_Strict):
    id: Annotated[str, Field(max_length=128)] = ""
    version: Annotated[str, Field(max_length=128)] = ""
    kernel: Annotated[str, Field(max_length=128)] = ""


class EnrollIn(_Strict):
    machine_id: Annotated[str, Field(max_length=64, examples=["4c4c4544004c4d10804bb4c04f4d3232"])]
    fqdn: Annotated[str | None, Field(max_length=253)] = None
    hostname: Annotated[str, Field(max_length=253, examples=["web-01"])]
    ip_addresses: Annotated[list[Annotated[str, Field(max_length=45)]], Field(max_length=32)] = []
    os: OsIn = OsIn()
    csr_pem: Annotated[str, Field(max_length=16 * 1024, description="A PKCS#10 CSR, PEM: P-256, Ed25519 or RSA")]


class EnrollOut(BaseModel):
    polling_token: str = Field(description="Poll GET /api/v1/enroll/status/{polling_token}; shown once")
    poll_interval_seconds: int


class PendingOut(BaseModel):
    status: str = "pending"
    poll_interval_seconds: int


class BundleOut(BaseModel):
    ca_crt: str
    server_crt: str
    chain: str
    not_after: str
    manager_addresses: list[str]
    mtls_url: str | None
    agent_api_key: str | None = Field(None, description="Zero-touch agents: their cak_ key, shown once")


class CheckinIn(_Strict):
    facts: dict[str, Any] = {}
    listen_port: Annotated[int | None, Field(ge=1, le=65535)] = None


class CheckinOut(BaseModel):
    status: str
    checkin_interval_seconds: int
    renew_after: str
    not_after: str


class RenewIn(_Strict):
    csr_pem: Annotated[str, Field(max_length=16 * 1024)]


class AgentApproveIn(_Strict):
    hostname: Annotated[str | None, Field(max_length=253)] = None
    notes: Annotated[str | None, Field(max_length=4096)] = None


class AgentNotesIn(_Strict):
    notes: Annotated[str | None, Field(max_length=4096)] = None


class CertificateOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    issued_at: dt.datetime
    issued_by: str
    reason: str
    revoked_at: dt.datetime | None


class AgentOut(DeviceOut):
    fqdn: str | None
    site_id: int | None = None
    key_version: int | None = None
    addresses: list[str]
    agent_address: str | None
    enrollment: str | None = Field(None, description="pending | approved (awaiting pickup) | None")
    certificates: list[CertificateOut] = []


class CaOut(BaseModel):
    fingerprint: str
    ca_pem: str


def endpoint(request: Request) -> Endpoint:
    """Where agents reach Ktizo, from the settings or from how this request reached it."""
    settings = request.app.state.settings
    addresses: list[str] = list(settings.manager_addresses)
    server = request.scope.get("server")
    if not addresses and server and is_ip(str(server[0])):
        addresses = [str(server[0])]
    mtls_url = settings.mtls_url
    if not mtls_url and settings.mtls_port:
        host = request.url.hostname or (str(server[0]) if server else "localhost")
        if settings.public_url:
            from urllib.parse import urlsplit

            host = urlsplit(settings.public_url).hostname or host
        host = f"[{host}]" if ":" in host else host
        mtls_url = f"https://{host}:{settings.mtls_port}"
    return Endpoint(mtls_url=mtls_url, manager_addresses=addresses)


PEM_BEGIN, PEM_END = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"


def client_certificate(request: Request) -> bytes | None:
    """The client's certificate (DER): from Ktizo's own TLS listener, or from a trusted proxy's ``Client-Cert``
    header (ClientAddressMiddleware drops the header from anyone else). The header is RFC 9440's byte sequence,
    ``:base64 DER:``, or one URL-encoded PEM certificate: nginx has no variable for RFC 9440's form, and its
    ``$ssl_client_escaped_cert`` is that (deploy/nginx/ktizo.conf)."""
    tls = request.scope.get("extensions", {}).get("tls") or {}
    der = tls.get("client_cert_der")
    if der:
        return bytes(der)
    header = request.headers.get("client-cert")
    if not header:
        return None
    text = header.strip()
    if len(text) > 2 and text[0] == ":" and text[-1] == ":":
        encoded = text[1:-1]
    elif text.startswith("-----BEGIN"):
        before, _, rest = urllib.parse.unquote(text).partition(PEM_BEGIN)
        encoded, end, after = rest.partition(PEM_END)
        if before or not end or after.strip():
            raise PermissionDenied("Client-Cert must hold one URL-encoded PEM certificate")
        encoded = "".join(encoded.split())
    else:
        raise PermissionDenied(
            "Client-Cert must be an RFC 9440 byte sequence (:base64 DER:) or a URL-encoded PEM certificate "
            "(nginx's $ssl_client_escaped_cert)"
        )
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise PermissionDenied("Client-Cert is not base64") from None


def agent_api_key(request: Request) -> str | None:
    """A zero-touch agent's ``cak_`` key, sent as ``Authorization: Bearer cak_…`` beside its certificate."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip().startswith("cak_") else None


# -- the enrollment door (no auth) -------------------------------------------------------------------


@router.post(
    "/api/v1/enroll",
    status_code=202,
    response_model=EnrollOut,
    responses={
        400: {"model": ValidationErrorOut, "description": "Malformed: unknown fields, sizes, addresses, the CSR"},
        **responses(409, 413, 429),
    },
)
def enroll(body: EnrollIn, request: Request, services: ServicesDep) -> EnrollOut:
    """A Linux host asks to enroll (``ktizo-agent enroll``). It waits as a pending agent until an operator
    approves it; poll the status with the token (stored only as its hash)."""
    token = services.agents.enroll(
        EnrollRequest(
            machine_id=body.machine_id,
            hostname=body.hostname,
            fqdn=body.fqdn,
            ip_addresses=body.ip_addresses,
            os=body.os.model_dump(),
            csr_pem=body.csr_pem,
        ),
        client_ip(request),
    )
    return EnrollOut(polling_token=token, poll_interval_seconds=services.agents.poll_seconds)


@router.get(
    "/api/v1/enroll/status/{token}",
    response_model=BundleOut,
    responses={
        202: {"model": PendingOut, "description": "Pending: ask again after poll_interval_seconds"},
        403: {"model": ErrorOut, "description": "Rejected"},
        404: {"model": ErrorOut, "description": "Unknown, expired, purged or already picked up (one answer for all)"},
    },
)
def enrollment_status(token: str, request: Request, services: ServicesDep) -> Any:
    """Pending (202), approved (200: the PKI bundle, handed out once), rejected (403) or unknown (404)."""
    answer = services.agents.poll(token, client_ip(request), endpoint(request))
    if answer.state == "approved" and answer.bundle is not None:
        return JSONResponse(answer.bundle.as_dict(), headers={"Cache-Control": "no-store"})
    if answer.state == "pending":
        return JSONResponse(
            {"status": "pending", "poll_interval_seconds": services.agents.poll_seconds},
            status_code=202,
            headers={"Retry-After": str(services.agents.poll_seconds)},
        )
    if answer.state == "rejected":
        return JSONResponse({"detail": "enrollment rejected by an operator"}, status_code=403)
    return JSONResponse(
        {"detail": "no such enrollment (unknown, expired, purged, or its certificate was picked up): enroll again"},
        status_code=404,
    )


# -- the agent CA (public) ---------------------------------------------------------------------------


@router.get("/api/v1/pki/ca.pem", response_class=Response, responses={200: {"content": {PEM_MEDIA: {}}}})
def ca_pem(services: ServicesDep) -> Response:
    """Ktizo's agent CA certificate. Pin its fingerprint (`ktizo pki fingerprint`) on the host, never trust it
    from the network alone."""
    return Response(services.authority.ca_pem(), media_type=PEM_MEDIA)


@router.get("/api/v1/pki/crl", response_class=Response, responses={200: {"content": {"application/pkix-crl": {}}}})
def crl_der(services: ServicesDep) -> Response:
    """The agent CA's revocation list (DER), freshly signed."""
    return Response(services.authority.crl_der(), media_type="application/pkix-crl")


@router.get("/api/v1/pki/crl.pem", response_class=Response, responses={200: {"content": {PEM_MEDIA: {}}}})
def crl_pem(services: ServicesDep) -> Response:
    return Response(services.authority.crl_pem(), media_type=PEM_MEDIA)


@router.get("/api/v1/pki/ca", response_model=CaOut, responses=responses(401, 403))
def ca_info(services: ServicesDep, _actor: Viewer) -> CaOut:
    return CaOut(fingerprint=services.authority.fingerprint(), ca_pem=services.authority.ca_pem())


# -- the agents' mTLS door ---------------------------------------------------------------------------


_MTLS_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ValidationErrorOut, "description": "Malformed"},
    **responses(403),
}


@router.post("/api/v1/agent/checkin", response_model=CheckinOut, responses=_MTLS_ERRORS)
def checkin(body: CheckinIn, request: Request, services: ServicesDep) -> CheckinOut:
    """An enrolled agent's heartbeat over mTLS: its facts, and the port its own listener is on."""
    out = services.agents.checkin(
        client_certificate(request), client_ip(request), body.facts, body.listen_port, agent_api_key(request)
    )
    return CheckinOut(**out)


@router.post("/api/v1/agent/renew", response_model=BundleOut, responses=_MTLS_ERRORS)
def renew(body: RenewIn, request: Request, services: ServicesDep) -> Any:
    """A new certificate for a new key, over mTLS with the current one."""
    bundle = services.agents.renew(
        client_certificate(request), client_ip(request), body.csr_pem, endpoint(request), agent_api_key(request)
    )
    return JSONResponse(bundle.as_dict(), headers={"Cache-Control": "no-store"})


# -- operators ---------------------------------------------------------------------------------------


def _out(services: Any, device: Any, actor: Any) -> AgentOut:
    base = DeviceOut.of(device, actor).model_dump()
    enrollment = services.agents.enrollment(device.id)
    return AgentOut(
        **base,
        fqdn=device.fqdn,
        addresses=list(device.addresses or []),
        agent_address=device.agent_address,
        site_id=device.site_id,
        key_version=device.key_version,
        enrollment=enrollment.status if enrollment is not None else None,
        certificates=[CertificateOut.model_validate(c) for c in services.agents.certificates(device.id)],
    )


@router.get("/api/v1/agents", response_model=list[AgentOut], responses=responses(401, 403, 404))
def list_agents(
    services: ServicesDep,
    actor: Viewer,
    status: DeviceStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    site: Annotated[str | None, Query(max_length=64, description="Only agents of this site (code or id)")] = None,
    key_version: Annotated[int | None, Query(ge=1, le=2**31 - 1, description="Enrolled with this key version")] = None,
    enrolled_after: Annotated[dt.datetime | None, Query(description="First seen after this moment")] = None,
) -> list[AgentOut]:
    """Agents; ``site``, ``key_version`` and ``enrolled_after`` answer "who enrolled with v3 after T"."""
    site_id = services.sites.get(site).id if site else None
    after = as_utc(enrolled_after, "enrolled_after") if enrolled_after is not None else None
    rows = services.agents.list(status, limit, site_id=site_id, key_version=key_version, enrolled_after=after)
    return [_out(services, d, actor) for d in rows]


@router.get("/api/v1/agents/{ref}", response_model=AgentOut, responses=responses(401, 403, 404))
def get_agent(ref: AgentRef, services: ServicesDep, actor: Viewer) -> AgentOut:
    return _out(services, services.agents.resolve(ref), actor)


@router.post("/api/v1/agents/{ref}/approve", response_model=AgentOut, responses=responses(401, 403, 404, 409))
def approve_agent(
    ref: AgentRef, services: ServicesDep, actor: Operator, body: Annotated[AgentApproveIn | None, Body()] = None
) -> AgentOut:
    """Approve: the certificate is issued from this record (hostname, its FQDN, the reported addresses) and
    waits for the host's next poll."""
    body = body or AgentApproveIn()
    device = services.agents.approve(actor, ref, hostname=body.hostname, notes=body.notes)
    return _out(services, device, actor)


@router.post("/api/v1/agents/{ref}/reject", response_model=AgentOut, responses=responses(401, 403, 404, 409))
def reject_agent(
    ref: AgentRef, services: ServicesDep, actor: Operator, body: Annotated[AgentNotesIn | None, Body()] = None
) -> AgentOut:
    device = services.agents.reject(actor, ref, (body or AgentNotesIn()).notes)
    return _out(services, device, actor)


@router.post("/api/v1/agents/{ref}/revoke", response_model=AgentOut, responses=responses(401, 403, 404, 409))
def revoke_agent(
    ref: AgentRef, services: ServicesDep, actor: Operator, body: Annotated[AgentNotesIn | None, Body()] = None
) -> AgentOut:
    """Revoke an approved agent: every certificate it holds is refused from now on and listed in the CRL."""
    device = services.agents.revoke(actor, ref, (body or AgentNotesIn()).notes)
    return _out(services, device, actor)


@router.post("/api/v1/agents/{ref}/purge", status_code=204, responses=responses(401, 403, 404))
def purge_agent(ref: AgentRef, services: ServicesDep, actor: Operator) -> Response:
    """Forget the agent (record, enrollment, token; certificates revoked); it may enroll again from scratch."""
    services.agents.purge(actor, ref)
    return Response(status_code=204)
