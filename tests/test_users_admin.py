"""The Users page's use cases: disable/enable, role changes, password resets, listing and revoking tokens;
admin-only, audited, and never leaving the system without an enabled admin."""

from __future__ import annotations

import pytest

from ktizo.domain.errors import Conflict, NotFound, PermissionDenied, Unauthenticated
from ktizo.domain.users import UserRole
from ktizo.services.audit import AuditQuery
from ktizo.services.context import Actor
from ktizo.services.registry import Services

PASSWORD = "correct horse battery staple"
ROOT = Actor.user("root", UserRole.ADMIN, "10.0.0.9")


@pytest.fixture
def team(services: Services) -> Services:
    services.users.create(Actor.system(), "root", UserRole.ADMIN, PASSWORD)
    services.users.create(Actor.system(), "ops", UserRole.OPERATOR, PASSWORD)
    return services


def actions(services: Services) -> list[tuple[str, dict[str, object]]]:
    events, _ = services.audit.list(AuditQuery(actor="root"))
    return [(e.action, e.details) for e in reversed(events)]


def test_disable_stops_password_and_tokens_and_enable_restores_them(team: Services) -> None:
    token = team.users.create_token(Actor.system(), "ops", name="ci")
    team.users.set_disabled(ROOT, "ops", True)
    with pytest.raises(Unauthenticated):
        team.users.authenticate("ops", PASSWORD, None)
    with pytest.raises(Unauthenticated):
        team.users.resolve_token(token)
    team.users.set_disabled(ROOT, "ops", False)
    assert team.users.resolve_token(token).username == "ops"
    assert actions(team) == [("user_disable", {"username": "ops"}), ("user_enable", {"username": "ops"})]


def test_reset_password_returns_a_new_one_and_the_old_one_stops_working(team: Services) -> None:
    new = team.users.reset_password(ROOT, "ops")
    assert len(new) >= 20 and new != PASSWORD
    with pytest.raises(Unauthenticated):
        team.users.authenticate("ops", PASSWORD, None)
    assert team.users.authenticate("ops", new, None).username == "ops"
    assert ("password_reset", {"username": "ops", "tokens_revoked": 0}) in actions(team)
    assert new not in str(actions(team))  # never in the audit log


def test_role_changes_are_audited_and_the_last_admin_stays(team: Services) -> None:
    team.users.set_role(ROOT, "ops", UserRole.VIEWER)
    assert team.users.get_by_name("ops").role == "viewer"
    assert ("user_role", {"username": "ops", "from": "operator", "to": "viewer", "tokens_revoked": 0}) in actions(team)
    with pytest.raises(Conflict, match="last enabled admin"):
        team.users.set_role(ROOT, "root", UserRole.OPERATOR)
    with pytest.raises(Conflict, match="your own account"):
        team.users.set_disabled(ROOT, "root", True)
    team.users.set_role(ROOT, "ops", UserRole.ADMIN)
    team.users.set_role(ROOT, "root", UserRole.OPERATOR)  # another admin exists now
    with pytest.raises(Conflict, match="last enabled admin"):
        team.users.set_disabled(Actor.system(), "ops", True)


def test_tokens_are_listed_without_secrets_and_revoked_by_id(team: Services) -> None:
    token = team.users.create_token(Actor.system(), "ops", name="ci")
    listed = team.users.list_tokens(ROOT)
    assert [(t.username, t.name, t.prefix) for t in listed] == [("ops", "ci", token[:10])]
    assert token not in repr(listed)
    ops = Actor.user("ops", UserRole.OPERATOR)
    assert [t.id for t in team.users.list_tokens(ops, "ops")] == [listed[0].id]  # one's own
    with pytest.raises(PermissionDenied):
        team.users.list_tokens(ops)
    revoked = team.users.revoke_token_id(ROOT, listed[0].id)
    assert revoked.revoked_at is not None
    with pytest.raises(Unauthenticated):
        team.users.resolve_token(token)
    assert ("token_revoke", {"prefix": token[:10], "username": "ops", "id": listed[0].id}) in actions(team)
    with pytest.raises(NotFound):
        team.users.revoke_token_id(ROOT, 9999)


def test_only_admins_may(team: Services) -> None:
    ops = Actor.user("ops", UserRole.OPERATOR)
    root_token = team.users.create_token(Actor.system(), "root", name="x")
    root_token_id = team.users.list_tokens(ROOT, "root")[0].id
    for call in (
        lambda: team.users.set_disabled(ops, "root", True),
        lambda: team.users.set_role(ops, "ops", UserRole.ADMIN),
        lambda: team.users.reset_password(ops, "root"),
        lambda: team.users.revoke_token_id(ops, root_token_id),
    ):
        with pytest.raises(PermissionDenied):
            call()
    assert team.users.resolve_token(root_token).username == "root"
    with pytest.raises(NotFound):
        team.users.set_disabled(ROOT, "nobody", True)
