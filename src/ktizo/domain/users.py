"""Who may do what: the three operator roles and their ordering."""

from __future__ import annotations

import enum
import re

from ktizo.domain.errors import PermissionDenied, ValidationFailed

_USERNAME = re.compile(r"[a-z][a-z0-9._-]{0,63}")


class UserRole(enum.StrEnum):
    VIEWER = "viewer"  # reads everything but secrets
    OPERATOR = "operator"  # approves, rejects and edits devices
    ADMIN = "admin"  # everything, including users, tokens and cluster secrets

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {UserRole.VIEWER: 0, UserRole.OPERATOR: 1, UserRole.ADMIN: 2}


def require_role(have: UserRole, need: UserRole) -> None:
    if have.rank < need.rank:
        raise PermissionDenied(f"this needs the {need.value} role; you are {have.value}")


def normalize_username(value: str) -> str:
    text = value.strip().lower()
    if not _USERNAME.fullmatch(text):
        raise ValidationFailed(
            "username must start with a letter and hold at most 64 letters, digits, '.', '_' or '-'",
            "username",
        )
    return text
