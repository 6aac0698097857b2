"""Who is acting, from where: every use case that changes something takes an ``Actor`` for the audit log."""

from __future__ import annotations

from dataclasses import dataclass

from ktizo.domain.errors import PermissionDenied
from ktizo.domain.users import UserRole, require_role


@dataclass(frozen=True)
class Actor:
    name: str  # username, "device", "system", "rule:<name>", "site:<code>"
    kind: str  # "user" | "device" | "system" | "rule" | "site"
    role: UserRole | None = None
    source_ip: str | None = None

    @classmethod
    def user(cls, name: str, role: UserRole, source_ip: str | None = None) -> Actor:
        return cls(name=name, kind="user", role=role, source_ip=source_ip)

    @classmethod
    def device(cls, source_ip: str | None) -> Actor:
        return cls(name="device", kind="device", source_ip=source_ip)

    @classmethod
    def system(cls, name: str = "system") -> Actor:
        return cls(name=name, kind="system", role=UserRole.ADMIN)

    @classmethod
    def rule(cls, name: str, role: UserRole) -> Actor:
        """An auto-approval rule deciding: it acts with the role of whoever last wrote it."""
        return cls(name=f"rule:{name}", kind="rule", role=role)

    @classmethod
    def site(cls, code: str) -> Actor:
        """A site's enrollment policy approving an agent that proved the site's key."""
        return cls(name=f"site:{code}", kind="site", role=UserRole.OPERATOR)

    @classmethod
    def cli(cls) -> Actor:
        """Someone with shell access to the server and its database: treated as admin, audited as 'cli'."""
        return cls(name="cli", kind="user", role=UserRole.ADMIN, source_ip="local")

    def require(self, role: UserRole) -> None:
        if self.role is None:
            raise PermissionDenied(f"this needs the {role.value} role")
        require_role(self.role, role)
