"""Webhooks: ``/api/v1/webhooks`` (subscriptions: the admin's, since they hold a target and a secret), their
delivery log (operators read it), and a test send. The secret is in the answer to the POST that made it, only."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from ktizo.api.deps import Admin, Operator, ServicesDep
from ktizo.api.errors import responses
from ktizo.domain.users import UserRole
from ktizo.services.context import Actor
from ktizo.services.webhooks import SECRET_MAX, SECRET_MIN, URL_MAX, shown_url

router = APIRouter(tags=["webhooks"])
Name = Annotated[str, Path(max_length=63, description="The webhook's name")]
Events = Annotated[
    list[Annotated[str, Field(max_length=64)]],
    Field(min_length=1, max_length=64, description="Event names (device.approved, …) or *", examples=[["*"]]),
]
Format = Annotated[str, Field(pattern="^(json|slack)$", description='json (the event) or slack ({"text": …})')]
Secret = Annotated[str, Field(min_length=SECRET_MIN, max_length=SECRET_MAX, description="Signs every body")]
Url = Annotated[str, Field(max_length=URL_MAX, examples=["https://hooks.example.com/ktizo"])]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WebhookIn(_Strict):
    name: Annotated[str, Field(max_length=63, examples=["ops-chat"])]
    url: Url
    events: Events
    format: Format = "json"
    secret: Annotated[Secret | None, Field(description="At least 16 characters; made for you when left out")] = None
    enabled: bool = True


class WebhookUpdate(_Strict):
    url: Url | None = None
    events: Events | None = None
    format: Format | None = None
    secret: Secret | None = None
    enabled: bool | None = None


class WebhookOut(BaseModel):
    name: str
    url: str = Field(description="The target; for operators only its scheme, host and port")
    events: list[str]
    format: str
    enabled: bool
    created_at: dt.datetime
    created_by: str
    revision: int
    deliveries: dict[str, int] = Field(description="Deliveries by status: pending, delivered, failed")


class CreatedOut(WebhookOut):
    secret: str = Field(description="The signing secret: shown only in this answer")


class DeliveryOut(BaseModel):
    delivery_id: str = Field(description="X-Ktizo-Delivery: the same on every attempt")
    webhook: str
    event_id: int
    event: str
    status: str = Field(description="pending | delivered | failed")
    attempts: int
    created_at: dt.datetime
    next_attempt_at: dt.datetime
    delivered_at: dt.datetime | None
    last_status: int | None = Field(description="The receiver's last HTTP status (none: no answer)")
    last_error: str | None


class TestSentOut(BaseModel):
    ok: bool
    delivery_id: str
    status: int | None = Field(description="The receiver's HTTP status (none: no answer)")
    error: str | None


def _out(hook: Any, actor: Actor, counts: dict[str, dict[str, int]]) -> WebhookOut:
    return WebhookOut(
        name=hook.name,
        url=hook.url if actor.role is not None and actor.role.rank >= UserRole.ADMIN.rank else shown_url(hook.url),
        events=list(hook.events),
        format=hook.format,
        enabled=hook.enabled,
        created_at=hook.created_at,
        created_by=hook.created_by,
        revision=hook.revision,
        deliveries={status: counts.get(hook.name, {}).get(status, 0) for status in ("pending", "delivered", "failed")},
    )


@router.get("/api/v1/webhooks", response_model=list[WebhookOut], responses=responses(401, 403))
def list_webhooks(services: ServicesDep, actor: Operator) -> list[WebhookOut]:
    counts = services.webhooks.counts()
    return [_out(hook, actor, counts) for hook in services.webhooks.list()]


@router.post("/api/v1/webhooks", status_code=201, response_model=CreatedOut, responses=responses(401, 403, 409))
def create_webhook(body: WebhookIn, services: ServicesDep, actor: Admin, response: Response) -> CreatedOut:
    """A subscription. Without a secret one is made; either way it is in this answer and never again."""
    hook, secret = services.webhooks.create(
        actor, body.name, body.url, body.events, format=body.format, secret=body.secret, enabled=body.enabled
    )
    response.headers["Cache-Control"] = "no-store"
    return CreatedOut(**_out(hook, actor, {}).model_dump(), secret=secret)


@router.get("/api/v1/webhooks/{name}", response_model=WebhookOut, responses=responses(401, 403, 404))
def get_webhook(name: Name, services: ServicesDep, actor: Operator) -> WebhookOut:
    return _out(services.webhooks.get(name), actor, services.webhooks.counts())


@router.put("/api/v1/webhooks/{name}", response_model=WebhookOut, responses=responses(401, 403, 404))
def update_webhook(name: Name, body: WebhookUpdate, services: ServicesDep, actor: Admin) -> WebhookOut:
    """Change the fields sent; the others, and the secret unless sent, stay."""
    hook = services.webhooks.update(
        actor,
        name,
        url=body.url,
        event_names=body.events,
        format=body.format,
        secret=body.secret,
        enabled=body.enabled,
    )
    return _out(hook, actor, services.webhooks.counts())


@router.delete("/api/v1/webhooks/{name}", status_code=204, responses=responses(401, 403, 404))
def delete_webhook(name: Name, services: ServicesDep, actor: Admin) -> Response:
    """Delete the subscription and its delivery log; what was pending is not sent."""
    services.webhooks.delete(actor, name)
    return Response(status_code=204)


@router.post("/api/v1/webhooks/{name}/test", response_model=TestSentOut, responses=responses(401, 403, 404))
def send_test(name: Name, services: ServicesDep, _actor: Admin) -> TestSentOut:
    """Send a signed ``webhook.test`` event now (not queued, not retried) and say how the receiver answered."""
    result = services.webhooks.test(name)
    return TestSentOut(ok=result.ok, delivery_id=result.delivery_id, status=result.status, error=result.error)


@router.get("/api/v1/webhooks/{name}/deliveries", response_model=list[DeliveryOut], responses=responses(401, 403, 404))
def list_deliveries(
    name: Name,
    services: ServicesDep,
    _actor: Operator,
    status: Annotated[str | None, Query(pattern="^(pending|delivered|failed)$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[DeliveryOut]:
    """The delivery log, newest first."""
    return [
        DeliveryOut(**{field: getattr(d, field) for field in DeliveryOut.model_fields})
        for d in services.webhooks.deliveries(name, status=status, limit=limit)
    ]
