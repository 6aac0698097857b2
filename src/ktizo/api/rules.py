"""Auto-approval rules (``/api/v1/rules``) and declarative state (``POST /api/v1/apply``, ``GET /api/v1/export``)."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from ktizo.api.deps import Admin, Operator, ServicesDep, Viewer
from ktizo.api.errors import ErrorOut, ValidationErrorOut, responses
from ktizo.domain.errors import ValidationFailed
from ktizo.services.declarative import KINDS, dump, parse
from ktizo.services.rules import spec_of

router = APIRouter(tags=["policy"])
RuleName = Annotated[str, Path(max_length=63, description="The rule's name")]


class RuleOut(BaseModel):
    name: str
    revision: int
    matched: int = Field(description="Machines this rule decided (counted against maxCount)")
    author: str
    updated_at: dt.datetime
    spec: dict[str, Any] = Field(description="The rule's document spec: priority, enabled, match, action, …")


class RuleWritten(RuleOut):
    result: str = Field(description="created | configured | unchanged")


class OutcomeOut(BaseModel):
    device_id: int
    action: str
    hostname: str | None = None
    ip_address: str | None = None
    role: str | None = None
    labels: dict[str, str] | None = None
    error: str | None = Field(None, description="Why the rule would not act on this machine")


class DryRunOut(BaseModel):
    rule: str
    revision: int
    enabled: bool
    passed_over: int = Field(description="Pending machines the rule does not match")
    machines: list[OutcomeOut]


class ChangeOut(BaseModel):
    kind: str
    name: str = Field(description="The object's key: a Device's MAC or machine-id, the name of anything else")
    title: str | None = None
    result: str = Field(description="created | configured | unchanged | deleted")
    diff: list[str] = Field(description="`~ field: old -> new`, `+ field: new`, `- field: old`")


class ApplyOut(BaseModel):
    dry_run: bool
    counts: dict[str, int]
    changes: list[ChangeOut]
    notes: list[str]


def _rule(rule: Any) -> dict[str, Any]:
    return {
        "name": rule.name,
        "revision": rule.revision,
        "matched": rule.matched,
        "author": rule.author,
        "updated_at": rule.updated_at,
        "spec": spec_of(rule),
    }


@router.get("/api/v1/rules", response_model=list[RuleOut], responses=responses(401, 403))
def list_rules(services: ServicesDep, _: Viewer) -> Any:
    """Every rule, in the order they are tried (priority, then name)."""
    return [_rule(r) for r in services.rules.list()]


@router.get("/api/v1/rules/{name}", response_model=RuleOut, responses=responses(401, 403, 404))
def get_rule(name: RuleName, services: ServicesDep, _: Viewer) -> Any:
    return _rule(services.rules.get(name))


@router.put(
    "/api/v1/rules/{name}",
    response_model=RuleWritten,
    responses={422: {"model": ValidationErrorOut, "description": "Invalid spec"}, **responses(401, 403)},
)
def put_rule(
    name: RuleName,
    services: ServicesDep,
    actor: Operator,
    spec: Annotated[dict[str, Any], Body(description="The rule's spec, as in a `kind: Rule` document")],
) -> Any:
    """Create or change a rule. Operators write rules for workers and agents; one approving control planes needs an
    admin."""
    rule, result = services.rules.apply(actor, name, spec)
    return {**_rule(rule), "result": result}


@router.delete("/api/v1/rules/{name}", status_code=204, responses=responses(401, 403, 404))
def delete_rule(name: RuleName, services: ServicesDep, actor: Operator) -> Response:
    services.rules.delete(actor, name)
    return Response(status_code=204)


@router.post("/api/v1/rules/{name}/dry-run", response_model=DryRunOut, responses=responses(401, 403, 404))
def dry_run(name: RuleName, services: ServicesDep, _: Viewer) -> Any:
    """Which pending machines the rule would take now and what each would get. Changes nothing."""
    rule, outcomes, passed = services.rules.dry_run(name)
    return {
        "rule": rule.name,
        "revision": rule.revision,
        "enabled": rule.enabled,
        "passed_over": passed,
        "machines": [{k: v for k, v in o.__dict__.items() if k in OutcomeOut.model_fields} for o in outcomes],
    }


@router.post(
    "/api/v1/apply",
    response_model=ApplyOut,
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "YAML documents (apiVersion ktizo.dev/v1), as `ktizo apply -f` reads them",
            "content": {"application/yaml": {"schema": {"type": "string"}}},
        }
    },
    responses={
        422: {"model": ValidationErrorOut, "description": "A document is invalid: the message names it and the field"},
        **responses(401, 403, 409, 413),
    },
)
async def apply(
    request: Request,
    services: ServicesDep,
    actor: Admin,
    dry_run: Annotated[bool, Query(description="Show the diff; change nothing")] = False,
    prune: Annotated[bool, Query(description="Delete managed objects of the applied kinds not named")] = False,
) -> Any:
    """`ktizo apply` over HTTP: every document applied in one transaction, or none; the answer is the diff."""
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationFailed("the body is not UTF-8 text", "body") from None
    docs = parse(text, "body")
    if not docs:
        raise ValidationFailed("the body holds no documents", "body")
    report = await _in_thread(services, actor, docs, dry_run, prune)
    return {
        "dry_run": report.dry_run,
        "counts": report.counts(),
        "changes": [c.__dict__ for c in report.changes],
        "notes": report.notes,
    }


async def _in_thread(services: Any, actor: Any, docs: Any, dry_run: bool, prune: bool) -> Any:
    # Off the event loop (a big apply takes seconds); the thread carries this request's context, so the apply
    # joins the edge's one transaction.
    return await asyncio.to_thread(services.declarative.apply, actor, docs, dry_run=dry_run, prune=prune)


@router.get(
    "/api/v1/export",
    response_class=Response,
    responses={
        200: {"content": {"application/yaml": {"schema": {"type": "string"}}}, "description": "YAML documents"},
        400: {"model": ErrorOut, "description": "Unknown kind"},
        **responses(401, 403),
    },
)
def export(
    services: ServicesDep,
    _: Admin,
    kind: Annotated[list[str] | None, Query(description=f"Only these kinds: {', '.join(KINDS)}")] = None,
) -> Response:
    """`ktizo export`: every object as a document (webhook secrets left out; applying it back keeps them)."""
    wanted = None
    if kind:
        by_lower = {k.lower(): k for k in KINDS}
        unknown = [k for k in kind if k.lower() not in by_lower]
        if unknown:
            raise ValidationFailed(f"unknown kind {unknown[0][:40]!r}: one of {', '.join(KINDS)}", "kind")
        wanted = [by_lower[k.lower()] for k in kind]
    return Response(dump(services.declarative.export(wanted)), media_type="application/yaml")
