"""Liveness and readiness for load balancers and orchestrators."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ktizo.api.deps import ServicesDep
from ktizo.api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health, "description": "Not ready"}})
def readyz(services: ServicesDep) -> JSONResponse:
    """The database answers and its schema is at this release's migration head."""
    try:
        services.db.ping()
    except Exception as exc:  # any driver error means the same thing here: not ready
        return JSONResponse(Health(status="unavailable", database=type(exc).__name__).model_dump(), 503)
    schema = services.schema.state()
    if not schema.is_current:
        migrations = "behind: run `ktizo db upgrade`" if schema.known else "ahead: a newer Ktizo upgraded the database"
        body = Health(status="unavailable", database="ok", migrations=migrations)
        return JSONResponse(body.model_dump(), 503)
    return JSONResponse(Health(status="ready", database="ok", migrations="current").model_dump())
