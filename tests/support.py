"""Helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

from ktizo.domain.users import UserRole
from ktizo.services.context import Actor
from ktizo.services.registry import Services

FIXTURES = Path(__file__).parent / "fixtures"
TALOS_FIXTURES = FIXTURES / "talos"


def make_token(services: Services, username: str, role: UserRole) -> str:
    services.users.create(Actor.system(), username, role, None)
    return services.users.create_token(Actor.system(), username, name="test")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# What Talos sends: Go's default headers, nothing of its own (shared/research/talos.md §1.4).
TALOS_HEADERS = {"User-Agent": "Go-http-client/1.1", "Accept-Encoding": "gzip", "Connection": "close"}


def talos_url(**values: str) -> str:
    """The config URL exactly as Talos rebuilds it: url.Values.Encode(), i.e. keys sorted, values escaped."""
    return "/api/v1/config/download?" + urlencode(sorted(values.items()))
