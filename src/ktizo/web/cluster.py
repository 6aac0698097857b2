"""Cluster Settings: the parameters, Generate (with what rotating secrets means), talosconfig, base configs."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ktizo.domain.devices import Role
from ktizo.domain.errors import KtizoError, PermissionDenied
from ktizo.services.cluster import SettingsView
from ktizo.talos.versions import SUPPORTED_TALOS_VERSIONS
from ktizo.web.forms import Errors, note_error, text
from ktizo.web.routing import WebRoute
from ktizo.web.session import CheckedForm, CurrentUser, WebUser, services_of
from ktizo.web.templating import page, set_flash

router = APIRouter(route_class=WebRoute, include_in_schema=False)

LIST_FIELDS = ("pod_subnets", "service_subnets", "cert_sans", "nameservers")
TEXT_FIELDS = (
    "cluster_name",
    "endpoint",
    "talos_version",
    "kubernetes_version",
    "install_disk",
    "install_image",
    "dns_domain",
    "gateway",
)
MAX_BASE_BYTES = 1024 * 1024


def _form_values(view: SettingsView) -> dict[str, str]:
    values = {name: getattr(view, name) or "" for name in TEXT_FIELDS}
    values.update({name: ", ".join(getattr(view, name)) for name in LIST_FIELDS})
    return values


def _split(value: str) -> list[str]:
    return [item for item in re.split(r"[\s,]+", value) if item]


def cluster_page(request: Request, user: WebUser, *, status_code: int = 200, **extra: Any) -> Response:
    view = services_of(request).cluster.settings()
    context: dict[str, Any] = {
        "view": view,
        "values": _form_values(view),
        "errors": {},
        "base_errors": {},
        "talos_versions": [(str(v), str(v)) for v in SUPPORTED_TALOS_VERSIONS],
        "roles": [r.value for r in Role],
    }
    context.update(extra)
    return page(request, "cluster.html", user, nav="cluster", status_code=status_code, **context)


@router.get("/ui/cluster")
def cluster_settings(request: Request, user: CurrentUser) -> Response:
    return cluster_page(request, user)


@router.post("/ui/cluster")
def cluster_save(request: Request, user: CurrentUser, form: CheckedForm) -> Response:
    services = services_of(request)
    view = services.cluster.settings()
    current = _form_values(view)
    values = {name: text(form, name, 1000) for name in (*TEXT_FIELDS, *LIST_FIELDS)}
    changes: dict[str, Any] = {}
    for name in TEXT_FIELDS:
        if values[name] != current[name]:
            changes[name] = values[name] or None
    for name in LIST_FIELDS:
        if _split(values[name]) != _split(current[name]):
            changes[name] = _split(values[name])
    errors: Errors = {}
    if changes:
        try:
            services.cluster.update(user.actor, changes)
        except KtizoError as exc:
            note_error(errors, exc, (*TEXT_FIELDS, *LIST_FIELDS))
            return cluster_page(request, user, status_code=422, values=values, errors=errors)
    response = RedirectResponse("/ui/cluster", status_code=303)
    names = ", ".join(n.replace("_", " ") for n in changes) or "nothing changed"
    set_flash(response, f"Cluster settings saved ({names}). Generate again to apply them to the base configs.")
    return response


@router.post("/ui/cluster/generate")
def cluster_generate(request: Request, user: CurrentUser, form: CheckedForm) -> Response:
    if not user.is_admin:
        raise PermissionDenied("generating the cluster configuration needs the admin role")
    services = services_of(request)
    rotate = form.get("rotate_secrets") == "1"
    if form.get("confirmed") != "1":
        return page(
            request,
            "cluster_generate.html",
            user,
            nav="cluster",
            view=services.cluster.settings(),
            rotate=rotate,
        )
    try:
        sizes = services.cluster.generate(user.actor, rotate_secrets=rotate)
    except KtizoError as exc:
        if isinstance(exc, PermissionDenied):
            raise
        return cluster_page(request, user, status_code=409, generate_error=str(exc))
    response = RedirectResponse("/ui/cluster", status_code=303)
    detail = ", ".join(f"{role} {size:,} bytes" for role, size in sizes.items())
    secrets = "new secrets: a new cluster identity" if rotate else "secrets kept"
    set_flash(response, f"Generated base configs ({detail}; {secrets}).")
    return response


@router.post("/ui/cluster/talosconfig")
def cluster_talosconfig(request: Request, user: CurrentUser, form: CheckedForm) -> Response:
    body = services_of(request).cluster.talosconfig(user.actor)
    return Response(
        body,
        media_type="application/yaml",
        headers={"Content-Disposition": 'attachment; filename="talosconfig"', "Cache-Control": "no-store"},
    )


@router.post("/ui/cluster/base")
async def cluster_base_upload(request: Request, user: CurrentUser, form: CheckedForm) -> Response:
    services = services_of(request)
    errors: Errors = {}
    role_text = text(form, "role", 20)
    upload = form.get("file")
    data = b""
    if role_text not in ("controlplane", "worker"):
        errors["role"] = "choose controlplane or worker"
    if not isinstance(upload, UploadFile) or not upload.filename:
        errors["file"] = "choose a YAML file"
    else:
        data = await upload.read(MAX_BASE_BYTES + 1)
        if len(data) > MAX_BASE_BYTES:
            errors["file"] = f"the file is over {MAX_BASE_BYTES:,} bytes"
        elif not data.strip():
            errors["file"] = "the file is empty"
    if not errors:
        try:
            await run_in_threadpool(services.cluster.put_base, user.actor, Role(role_text), data)
        except KtizoError as exc:
            note_error(errors, exc, ())
            errors["file"] = errors.pop("_")
    if errors:
        return await run_in_threadpool(
            lambda: cluster_page(request, user, status_code=422, base_errors=errors, base_role=role_text)
        )
    response = RedirectResponse("/ui/cluster#base-configs", status_code=303)
    set_flash(
        response, f"Uploaded the {role_text} base config ({len(data):,} bytes); it was checked against Talos's schema."
    )
    return response
