"""The audit trail, read-only."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query

from ktizo.api.deps import ServicesDep, Viewer
from ktizo.api.errors import responses
from ktizo.api.schemas import AuditOut, AuditPage
from ktizo.domain.errors import ValidationFailed
from ktizo.services.audit import AuditQuery

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])


@router.get("", response_model=AuditPage, responses=responses(401, 403))
def list_audit(
    services: ServicesDep,
    _actor: Viewer,
    device_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    actor: Annotated[str | None, Query(max_length=64)] = None,
    action: Annotated[str | None, Query(max_length=32)] = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> AuditPage:
    """Newest first. Times are ISO 8601; a time without a zone is taken as UTC."""
    since, until = (_utc(t) for t in (since, until))
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


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:  # 0001-01-01T00:00+00:01 is before the year 1 in UTC
        raise ValidationFailed("that time is out of range", "since") from None
