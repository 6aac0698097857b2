"""Zero-touch sites (seed 004): ``POST /api/enroll`` (also ``/api/v1/enroll/site``), sites and their enrollment keys
(``/api/sites/{id}/enrollment-key`` as the seed spells it, and under ``/api/v1``), the collision gate."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ktizo.api.agents import BundleOut, EnrollIn, agent_api_key, client_certificate, endpoint
from ktizo.api.deps import Admin, Operator, ServicesDep, Viewer, client_ip
from ktizo.api.errors import ErrorOut, ValidationErrorOut, responses
from ktizo.api.schemas import DeviceOut
from ktizo.domain.bounds import as_utc
from ktizo.services.agents import EnrollRequest
from ktizo.services.zero_touch import SiteEnrollRequest

router = APIRouter(tags=["sites"])
SiteRef = Annotated[str, Path(max_length=64, description="The site's numeric id or its code")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SiteEnrollIn(EnrollIn):
    machine_id: Annotated[str | None, Field(max_length=64)] = None  # type: ignore[assignment]
    site_code: Annotated[str, Field(max_length=64, examples=["fra1"])]
    enrollment_key: Annotated[str, Field(max_length=128, description="The site's cek_ key")]
    machine_uid: Annotated[str, Field(max_length=64, description="SHA-256 of the machine-id and the CA pin")]
    agent_api_key: Annotated[str | None, Field(max_length=128, description="cak_: proof for reuse or site move")] = None


class ActiveOut(BundleOut):
    enrollment_state: str = "active"
    outcome: str = Field(description="new | reuse | site_move")
    agent_id: int
    agent_api_key: str = Field(description="cak_<id>_<secret>: shown once; send it with check-ins")


class PendingOut(BaseModel):
    enrollment_state: str = "pending"
    polling_token: str
    poll_interval_seconds: int


class SiteIn(_Strict):
    site_code: Annotated[str, Field(max_length=64, examples=["fra1"])]
    name: Annotated[str, Field(max_length=200)] = ""
    enrollment_policy: Annotated[str, Field(pattern="^(auto-approve|manual)$")] = "auto-approve"
    max_pending: Annotated[int | None, Field(ge=0, le=1_000_000)] = None
    max_agents: Annotated[int | None, Field(ge=0, le=1_000_000)] = None


class SiteUpdate(_Strict):
    name: Annotated[str | None, Field(max_length=200)] = None
    enrollment_policy: Annotated[str | None, Field(pattern="^(auto-approve|manual)$")] = None
    max_pending: Annotated[int | None, Field(ge=0, le=1_000_000)] = None
    max_agents: Annotated[int | None, Field(ge=0, le=1_000_000)] = None


class KeyOut(BaseModel):
    site_code: str
    version: int
    fingerprint: str = Field(description="vN (XXXX): the first 4 hex digits of the key's SHA-256")
    created_at: dt.datetime
    created_by: str
    expires_at: dt.datetime | None
    max_uses: int | None
    uses: int


class RotateIn(_Strict):
    expires_at: dt.datetime | None = None
    max_uses: Annotated[int | None, Field(ge=1, le=1_000_000)] = None


class RotatedOut(KeyOut):
    enrollment_key: str = Field(description="The new cek_ key: shown only in this answer")


class SiteOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    site_code: str
    name: str
    enrollment_policy: str
    max_pending: int | None
    max_agents: int | None
    created_at: dt.datetime
    active_key: KeyOut | None = None


class CollisionOut(BaseModel):
    id: int = Field(description="The waiting enrollment's id")
    device: DeviceOut = Field(description="The machine the claim collides with")
    claim: dict[str, Any]
    site_code: str | None
    created_at: dt.datetime
    expires_at: dt.datetime


class ResolveIn(_Strict):
    action: Annotated[str, Field(pattern="^(new|replace|reject)$")]
    hostname: Annotated[str | None, Field(max_length=253)] = None


def _key(info: Any) -> KeyOut:
    return KeyOut(**{name: getattr(info, name) for name in KeyOut.model_fields})


def _site(services: Any, site: Any) -> SiteOut:
    out = SiteOut.model_validate(site)
    key = services.sites.active_key(site.id)
    out.active_key = _key(key) if key is not None else None
    return out


# -- the zero-touch door (no operator auth: the site key is the credential) ---------------------------


@router.post(
    "/api/enroll",
    status_code=201,
    response_model=ActiveOut,
    responses={
        202: {"model": PendingOut, "description": "Pending: manual policy, or held at the collision gate"},
        400: {"model": ValidationErrorOut, "description": "Malformed"},
        401: {"model": ErrorOut, "description": "Unknown site or a wrong, rotated, expired or used-up key"},
        **responses(409, 413, 429),
    },
)
@router.post("/api/v1/enroll/site", status_code=201, response_model=ActiveOut, include_in_schema=False)
def enroll_site(body: SiteEnrollIn, request: Request, services: ServicesDep) -> Any:
    """A host enrolls with its site's key. New with an auto-approve site: active at once (certificate bundle and
    its cak_ key in this answer). Manual site, or another machine already holds this machine_uid: pending, polled
    at /api/v1/enroll/status/{token}; nothing is minted until an operator decides."""
    outcome = services.zero_touch.enroll(
        SiteEnrollRequest(
            site_code=body.site_code,
            enrollment_key=body.enrollment_key,
            machine_uid=body.machine_uid,
            identity=EnrollRequest(
                machine_id="",
                hostname=body.hostname,
                fqdn=body.fqdn,
                ip_addresses=body.ip_addresses,
                os=body.os.model_dump(),
                csr_pem=body.csr_pem,
            ),
            agent_api_key=body.agent_api_key or agent_api_key(request),
        ),
        client_ip(request),
        endpoint(request),
        client_certificate(request),
    )
    if outcome.state == "pending":
        return JSONResponse(
            {
                "enrollment_state": "pending",
                "polling_token": outcome.polling_token,
                "poll_interval_seconds": services.agents.poll_seconds,
            },
            status_code=202,
        )
    assert outcome.bundle is not None
    return JSONResponse(
        {
            "enrollment_state": "active",
            "outcome": outcome.outcome,
            "agent_id": outcome.agent_id,
            **outcome.bundle.as_dict(),
        },
        status_code=201,
        headers={"Cache-Control": "no-store"},
    )


# -- sites -------------------------------------------------------------------------------------------


@router.get("/api/v1/sites", response_model=list[SiteOut], responses=responses(401, 403))
def list_sites(services: ServicesDep, _actor: Viewer) -> list[SiteOut]:
    return [_site(services, site) for site in services.sites.list()]


@router.post("/api/v1/sites", status_code=201, response_model=SiteOut, responses=responses(401, 403, 409))
def create_site(body: SiteIn, services: ServicesDep, actor: Admin) -> SiteOut:
    """A site; make its first key with POST /api/v1/sites/{id}/enrollment-key/rotate."""
    site = services.sites.create(
        actor,
        body.site_code,
        name=body.name,
        policy=body.enrollment_policy,
        max_pending=body.max_pending,
        max_agents=body.max_agents,
    )
    return _site(services, site)


@router.get("/api/v1/sites/{ref}", response_model=SiteOut, responses=responses(401, 403, 404))
def get_site(ref: SiteRef, services: ServicesDep, _actor: Viewer) -> SiteOut:
    return _site(services, services.sites.get(ref))


@router.put("/api/v1/sites/{ref}", response_model=SiteOut, responses=responses(401, 403, 404))
def update_site(ref: SiteRef, body: SiteUpdate, services: ServicesDep, actor: Admin) -> SiteOut:
    """Change a site: only the fields sent; a limit sent as null is removed."""
    sent = body.model_fields_set
    site = services.sites.update(
        actor,
        ref,
        name=body.name,
        policy=body.enrollment_policy,
        max_pending=body.max_pending if "max_pending" in sent else False,
        max_agents=body.max_agents if "max_agents" in sent else False,
    )
    return _site(services, site)


@router.delete("/api/v1/sites/{ref}", status_code=204, responses=responses(401, 403, 404))
def delete_site(ref: SiteRef, services: ServicesDep, actor: Admin) -> Response:
    services.sites.delete(actor, ref)
    return Response(status_code=204)


def _rotate(ref: str, services: Any, actor: Any, body: RotateIn | None) -> RotatedOut:
    body = body or RotateIn()
    expires = as_utc(body.expires_at, "expires_at") if body.expires_at is not None else None
    key, info = services.sites.rotate_key(actor, ref, expires_at=expires, max_uses=body.max_uses)
    return RotatedOut(**_key(info).model_dump(), enrollment_key=key)


def _active(ref: str, services: Any) -> KeyOut:
    info = services.sites.active_key(ref)
    if info is None:
        from ktizo.domain.errors import NotFound

        raise NotFound("this site has no key yet: an admin makes one with `ktizo sites rotate-key CODE`")
    return _key(info)


_KEY_ERRORS = responses(401, 403, 404)


@router.post("/api/sites/{ref}/enrollment-key/rotate", response_model=RotatedOut, responses=_KEY_ERRORS)
def rotate_key(
    ref: SiteRef, services: ServicesDep, actor: Admin, body: Annotated[RotateIn | None, Body()] = None
) -> RotatedOut:
    """A new key for the site; the old one is refused from now on. The key is in this answer only."""
    return _rotate(ref, services, actor, body)


@router.post("/api/v1/sites/{ref}/enrollment-key/rotate", response_model=RotatedOut, responses=_KEY_ERRORS)
def rotate_key_v1(
    ref: SiteRef, services: ServicesDep, actor: Admin, body: Annotated[RotateIn | None, Body()] = None
) -> RotatedOut:
    return _rotate(ref, services, actor, body)


@router.get("/api/sites/{ref}/enrollment-key", response_model=KeyOut, responses=_KEY_ERRORS)
def active_key(ref: SiteRef, services: ServicesDep, _actor: Viewer) -> KeyOut:
    """The active key's version and fingerprint (never the key)."""
    return _active(ref, services)


@router.get("/api/v1/sites/{ref}/enrollment-key", response_model=KeyOut, responses=_KEY_ERRORS)
def active_key_v1(ref: SiteRef, services: ServicesDep, _actor: Viewer) -> KeyOut:
    return _active(ref, services)


# -- the collision gate ------------------------------------------------------------------------------


@router.get("/api/v1/collisions", response_model=list[CollisionOut], responses=responses(401, 403))
def list_collisions(services: ServicesDep, actor: Viewer) -> list[CollisionOut]:
    """Claims held at the collision gate: a machine_uid an agent already holds, without its proof."""
    return [
        CollisionOut(
            id=c.enrollment_id,
            device=DeviceOut.of(c.device, actor),
            claim=c.claim,
            site_code=c.site_code,
            created_at=c.created_at,
            expires_at=c.expires_at,
        )
        for c in services.zero_touch.collisions()
    ]


@router.post(
    "/api/v1/collisions/{enrollment_id}/resolve",
    response_model=DeviceOut,
    responses=responses(401, 403, 404, 409),
)
def resolve_collision(
    enrollment_id: Annotated[int, Path(ge=1, le=2**31 - 1)], body: ResolveIn, services: ServicesDep, actor: Operator
) -> DeviceOut:
    """``new``: approve the claimant as a machine of its own; ``replace``: it takes over the existing record (whose
    credentials are revoked); ``reject``: its poll gets 403."""
    device = services.zero_touch.resolve(actor, enrollment_id, body.action, body.hostname)
    return DeviceOut.of(device, actor)
