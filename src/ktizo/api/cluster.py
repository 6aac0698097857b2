"""Cluster configuration: settings, generation, the secrets bundle, base configs and talosconfig."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ktizo.api.deps import Admin, ServicesDep, Viewer
from ktizo.api.errors import ValidationErrorOut, responses
from ktizo.domain.devices import Role

router = APIRouter(prefix="/api/v1/cluster", tags=["cluster"])
YAML = "application/yaml"
_YAML_BODY = {"requestBody": {"required": True, "content": {YAML: {"schema": {"type": "string"}}}}}
_422: dict[int | str, dict[str, Any]] = {
    422: {"model": ValidationErrorOut, "description": "Invalid input; the field is named"}
}


class BaseConfigStatus(BaseModel):
    present: bool
    source: str | None
    sha256: str | None
    updated_at: dt.datetime | None
    path: str


class ClusterOut(BaseModel):
    cluster_name: str | None
    endpoint: str | None
    talos_version: str
    kubernetes_version: str | None
    install_disk: str | None
    install_image: str | None
    pod_subnets: list[str]
    service_subnets: list[str]
    dns_domain: str
    cert_sans: list[str]
    gateway: str | None
    nameservers: list[str]
    revision: int
    updated_at: dt.datetime | None
    updated_by: str | None
    secrets_present: bool
    secrets_sealed: bool = Field(description="The secrets bundle and base configs are encrypted at rest")
    bases: dict[str, BaseConfigStatus]


class ClusterIn(BaseModel):
    """Only the fields present change."""

    model_config = ConfigDict(extra="forbid")

    cluster_name: Annotated[str, Field(max_length=63)] | None = None
    endpoint: Annotated[str, Field(max_length=255, examples=["https://cluster.example:6443"])] | None = None
    talos_version: Annotated[str, Field(max_length=16, examples=["v1.13"])] | None = None
    kubernetes_version: Annotated[str, Field(max_length=32, examples=["1.33.0"])] | None = None
    install_disk: Annotated[str, Field(max_length=255)] | None = None
    install_image: Annotated[str, Field(max_length=255)] | None = None
    pod_subnets: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=2)] | None = None
    service_subnets: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=2)] | None = None
    dns_domain: Annotated[str, Field(max_length=253)] | None = None
    cert_sans: Annotated[list[Annotated[str, Field(max_length=253)]], Field(max_length=64)] | None = None
    gateway: Annotated[str, Field(max_length=45)] | None = None
    nameservers: Annotated[list[Annotated[str, Field(max_length=45)]], Field(max_length=8)] | None = None


class GenerateOut(BaseModel):
    bytes: dict[str, int]
    secrets_rotated: bool


def _out(services: Any) -> ClusterOut:
    return ClusterOut(**asdict(services.cluster.settings()))


@router.get("", response_model=ClusterOut, responses=responses(401, 403))
def get_cluster(services: ServicesDep, _actor: Viewer) -> ClusterOut:
    """Cluster settings, and whether secrets and base configs are in place."""
    return _out(services)


@router.put("", response_model=ClusterOut, responses={**responses(401, 403, 413), **_422})
def put_cluster(body: ClusterIn, services: ServicesDep, actor: Admin) -> ClusterOut:
    """Change cluster settings (checked with the same rules as generation). Generate again to apply them to
    the base configs; gateway and nameservers apply to the next render at once."""
    changes = {k: getattr(body, k) for k in body.model_fields_set}
    services.cluster.update(actor, changes)
    return _out(services)


@router.post("/generate", response_model=GenerateOut, responses={**responses(401, 403, 409), **_422})
def generate(
    services: ServicesDep,
    actor: Admin,
    rotate_secrets: Annotated[bool, Query(description="Replace the secrets bundle: a new cluster identity")] = False,
) -> GenerateOut:
    """Create controlplane and worker base configs from the settings and the cluster's secrets bundle (made on
    first use, kept afterwards unless `rotate_secrets`)."""
    sizes = services.cluster.generate(actor, rotate_secrets=rotate_secrets)
    return GenerateOut(bytes=sizes, secrets_rotated=rotate_secrets)


@router.post(
    "/secrets",
    status_code=204,
    responses={**responses(401, 403, 409, 413), **_422},
    openapi_extra=_YAML_BODY,
)
async def import_secrets(
    request: Request,
    services: ServicesDep,
    actor: Admin,
    replace: Annotated[bool, Query(description="Replace an existing bundle (a new cluster identity)")] = False,
) -> Response:
    """Adopt an existing cluster: a `talosctl gen secrets` bundle (YAML body)."""
    data = await request.body()
    await run_in_threadpool(lambda: services.cluster.import_secrets(actor, data, replace=replace))
    return Response(status_code=204)


@router.get(
    "/secrets",
    response_class=Response,
    responses={200: {"content": {YAML: {}}, "description": "talosctl gen secrets format"}, **responses(401, 403, 409)},
)
def export_secrets(services: ServicesDep, actor: Admin) -> Response:
    """Export the secrets bundle (admin only, audited)."""
    return Response(services.cluster.export_secrets(actor), media_type=YAML)


@router.get(
    "/talosconfig",
    response_class=Response,
    responses={200: {"content": {YAML: {}}, "description": "A talosconfig"}, **responses(401, 403, 409)},
)
def talosconfig(services: ServicesDep, actor: Admin) -> Response:
    """A talosconfig with a fresh admin client certificate (one year) and the approved control planes as
    endpoints (admin only, audited)."""
    return Response(
        services.cluster.talosconfig(actor),
        media_type=YAML,
        headers={"Content-Disposition": 'attachment; filename="talosconfig"'},
    )


@router.get("/base", response_model=dict[str, BaseConfigStatus], responses=responses(401, 403))
def base_status(services: ServicesDep, _actor: Viewer) -> dict[str, BaseConfigStatus]:
    """Which base configs are in place, and where they came from."""
    return {k: BaseConfigStatus(**v) for k, v in services.cluster.base_status().items()}


@router.get(
    "/base/{role}",
    response_class=Response,
    responses={200: {"content": {YAML: {}}, "description": "The base config"}, **responses(401, 403, 409)},
)
def get_base(role: Role, services: ServicesDep, _actor: Admin) -> Response:
    """The base config as stored (admin only: a controlplane config carries the cluster's CA keys)."""
    return Response(services.cluster.get_base(role), media_type=YAML)


@router.put(
    "/base/{role}",
    response_model=BaseConfigStatus,
    responses={**responses(401, 403, 413), **_422},
    openapi_extra=_YAML_BODY,
)
async def put_base(role: Role, request: Request, services: ServicesDep, actor: Admin) -> BaseConfigStatus:
    """Upload a base config (YAML body). It is validated against Talos's schema before it replaces the old one."""
    data = await request.body()
    await run_in_threadpool(services.cluster.put_base, actor, role, data)
    return BaseConfigStatus(**services.cluster.base_status()[role.value])
