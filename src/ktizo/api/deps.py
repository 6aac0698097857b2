"""FastAPI dependencies: the services of this process and the authenticated caller."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ktizo.domain.errors import Unauthenticated
from ktizo.domain.users import UserRole, require_role
from ktizo.services.context import Actor
from ktizo.services.registry import Services
from ktizo.services.users import Principal

_bearer = HTTPBearer(auto_error=False, description="An API token from `ktizo tokens create` or /api/v1/auth/login")


async def get_services(request: Request) -> Services:
    # async so FastAPI does not hop to the thread pool just to read an attribute (it shows in a boot storm)
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


def _principal(
    request: Request,
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None:
        raise Unauthenticated("authentication required: send Authorization: Bearer <token>")
    principal = services.users.resolve_token(credentials.credentials)
    request.state.principal = principal
    return principal


def require(role: UserRole) -> Callable[..., Actor]:
    """A dependency that yields the caller as an ``Actor`` if their role is at least ``role``."""

    def dependency(request: Request, principal: Annotated[Principal, Depends(_principal)]) -> Actor:
        require_role(principal.role, role)
        return principal.actor(client_ip(request))

    return dependency


Viewer = Annotated[Actor, Depends(require(UserRole.VIEWER))]
Operator = Annotated[Actor, Depends(require(UserRole.OPERATOR))]
Admin = Annotated[Actor, Depends(require(UserRole.ADMIN))]
