"""The audit trail, read-only."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import AfterValidator

from ktizo.api.deps import ServicesDep, Viewer
from ktizo.api.errors import responses
from ktizo.api.schemas import AuditOut, AuditPage
from ktizo.domain.bounds import MAX_ID, as_utc
from ktizo.domain.errors import ValidationFailed
from ktizo.services.audit import AuditQuery

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])


def _utc(value: dt.datetime) -> dt.datetime:
    try:
        return as_utc(value, "")
    except ValidationFailed as exc:
        # As a ValueError, FastAPI reports it like any other bad parameter: 422, located at query.since/until.
        raise ValueError(exc.message) from None


UTCTime = Annotated[dt.datetime, AfterValidator(_utc)]


@router.get("", response_model=AuditPage, responses=responses(401, 403))
def list_audit(
    services: ServicesDep,
    _actor: Viewer,
    device_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    actor: Annotated[str | None, Query(max_length=64)] = None,
    action: Annotated[str | None, Query(max_length=32)] = None,
    since: UTCTime | None = None,
    until: UTCTime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> AuditPage:
    """Newest first. Times are ISO 8601; a time without a zone is taken as UTC."""
    rows, total = services.audit.list(
        AuditQuery(
            device_id=device_id,
            actor=actor,
            action=action,
            since=since,
            until=until,
            limit=limit,
            offset=offset,
        )
    )
    return AuditPage(items=[AuditOut.model_validate(r) for r in rows], total=total, limit=limit, offset=offset)
