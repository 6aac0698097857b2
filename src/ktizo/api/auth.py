"""Logging in over the API: a username and password buy a bearer token that lasts a working day."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ktizo.api.deps import ServicesDep, Viewer, client_ip
from ktizo.api.errors import responses
from ktizo.api.schemas import LoginIn, MeOut, TokenOut
from ktizo.domain.clock import now as utcnow
from ktizo.services.users import SESSION_TTL

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])


@router.post("/login", response_model=TokenOut, responses=responses(401, 429))
def login(body: LoginIn, request: Request, services: ServicesDep) -> TokenOut:
    principal = services.users.authenticate(body.username, body.password, client_ip(request))
    actor = principal.actor(client_ip(request))
    token = services.users.create_token(actor, principal.username, name="login", ttl=SESSION_TTL)
    return TokenOut(access_token=token, expires_at=utcnow() + SESSION_TTL)


@router.get("/me", response_model=MeOut, responses=responses(401))
def me(actor: Viewer) -> MeOut:
    assert actor.role is not None
    return MeOut(username=actor.name, role=actor.role)
