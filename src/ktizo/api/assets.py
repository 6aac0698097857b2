"""Boot assets (Talos kernel and initramfs) served to iPXE: HEAD, Range, ETag, streamed from the data dir.

No authentication: iPXE has none, and the files are the public Talos release. The path is checked against a
closed set of names (version pattern, two architectures, two file names) before it touches the file system."""

from __future__ import annotations

import logging
import os
from email.utils import parsedate_to_datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, PlainTextResponse

from ktizo.api.deps import client_ip
from ktizo.domain.errors import NotFound, ValidationFailed
from ktizo.services.assets import AssetService

router = APIRouter(tags=["boot"])
log = logging.getLogger("ktizo.assets")

_BINARY = {"content": {"application/octet-stream": {}}, "description": "The file (or the requested range of it)"}


def _service(request: Request) -> AssetService:
    # Serving needs only the directory; the database is not touched on this path.
    settings = request.app.state.settings
    return AssetService(request.app.state.services.db, settings.assets_dir, settings.assets_base_url)


_PATH = "/assets/talos/{version}/{arch}/{name}"
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: _BINARY,
    206: _BINARY,
    304: {"description": "Not modified (If-None-Match / If-Modified-Since)"},
    404: {"content": {"text/plain": {}}, "description": "Not stored: `ktizo assets fetch --talos-version V`"},
    416: {"description": "Range not satisfiable"},
}


@router.head(_PATH, response_class=FileResponse, responses=_RESPONSES, operation_id="talos_asset_head")
@router.get(_PATH, response_class=FileResponse, responses=_RESPONSES, operation_id="talos_asset")
def talos_asset(version: str, arch: str, name: str, request: Request) -> Response:
    """`vmlinuz` or `initramfs.xz` of Talos `version` (v1.13.0) for `arch` (amd64, arm64), as iPXE's
    `kernel`/`initrd` lines fetch them. Supports HEAD, single and multiple byte ranges, ETag and Last-Modified."""
    try:
        path = _service(request).locate(version, arch, name)
    except ValidationFailed as exc:
        return PlainTextResponse(f"{exc.message}\n", status_code=404)
    except NotFound as exc:
        # Logged: the operator sees which release the machines want before anyone reads iPXE's console.
        log.warning("%s asked for a missing asset: %s", client_ip(request) or "?", exc.message)
        return PlainTextResponse(f"{exc.message}\n", status_code=404)
    stat = os.stat(path)
    response = FileResponse(path, media_type="application/octet-stream", stat_result=stat)
    if _not_modified(request, response):
        return Response(
            status_code=304,
            headers={k: v for k, v in response.headers.items() if k in ("etag", "last-modified", "accept-ranges")},
        )
    return response


def _not_modified(request: Request, response: FileResponse) -> bool:
    """RFC 9110 §13.1: If-None-Match wins over If-Modified-Since; Starlette's FileResponse does neither."""
    etag = response.headers["etag"]
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None:
        tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
        return "*" in tags or etag in tags
    since = request.headers.get("if-modified-since")
    if since is not None:
        try:
            return parsedate_to_datetime(response.headers["last-modified"]) <= parsedate_to_datetime(since)
        except (TypeError, ValueError, OverflowError):
            return False
    return False
