"""Events: what the audit log records, named for the outside world (``device.approved``…) and put in the outbox.

``audit.record`` calls ``outbox`` for every audit row, inside the same transaction: an event exists exactly when
the change it tells of was committed, and a change can never be committed without its event. Webhooks and the
GitOps writer read the outbox; neither can lose an event to a crash between the change and the telling."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy.orm import Session

from ktizo.db.batch import table_of
from ktizo.db.models import Event
from ktizo.db.types import utcnow

# Audit action -> event name. Actions not named here (sign-ins, token changes…) are audited but not events.
EVENTS: dict[str, str] = {
    "register": "device.discovered",
    "create": "device.created",
    "approve": "device.approved",
    "reject": "device.rejected",
    "update": "device.updated",
    "delete": "device.deleted",
    "purge": "device.deleted",
    "expire": "device.expired",
    "unbind": "device.unbound",
    "installed": "device.installed",
    "reinstall": "device.reinstall",
    "config_download": "config.downloaded",
    "identity_mismatch": "identity.mismatch",
    "enroll": "agent.enrolled",
    "agent.collision": "agent.collision",
    "agent.replaced": "agent.replaced",
    "agent.site_moved": "agent.site_moved",
    "cert_issue": "cert.issued",
    "cert_revoke": "cert.revoked",
    "site_key.rotated": "site.key_rotated",
}
# Events that change what the GitOps repository holds for a machine.
GITOPS_EVENTS = frozenset(
    {
        "device.discovered",
        "device.created",
        "device.approved",
        "device.rejected",
        "device.updated",
        "device.deleted",
        "device.expired",
        "device.installed",
        "device.unbound",
    }
)
# Every name a subscription may list (besides ``*``).
NAMES = frozenset(EVENTS.values())
_EVENT_INSERT = table_of(Event).insert()

# What an event tells of the machine: who it is and what it was given, never its patch or secrets.
MACHINE_FIELDS = (
    "id",
    "kind",
    "mac_address",
    "machine_id",
    "uuid",
    "serial",
    "hostname",
    "ip_address",
    "role",
    "status",
    "labels",
)


def event_for(action: str, details: dict[str, Any]) -> str | None:
    if action == "enroll.attempt":
        # A zero-touch enrollment that made a new machine (approved by its site or waiting for an operator).
        return "agent.enrolled" if details.get("reason") in ("new", "manual", "hostname_taken") else None
    return EVENTS.get(action)


def wants(subscribed: Iterable[str], event: str) -> bool:
    """Whether a subscription to ``subscribed`` (event names, or ``*``) takes ``event``."""
    names = set(subscribed)
    return "*" in names or event in names


def machine_of(device: Any) -> dict[str, Any] | None:
    if device is None:
        return None
    return {name: getattr(device, name, None) for name in MACHINE_FIELDS}


def outbox(
    s: Session,
    action: str,
    actor: dict[str, Any],
    device: Any,
    details: dict[str, Any],
) -> None:
    name = event_for(action, details)
    if name is None:
        return
    s.execute(  # Core, run now: see audit.record
        _EVENT_INSERT,
        {
            "at": utcnow(),
            "event": name,
            "action": action,
            "device_id": getattr(device, "id", None),
            "actor": actor["name"],
            "actor_type": actor["kind"],
            "payload": {"machine": machine_of(device), "actor": actor, "details": details},
            "webhooks_pending": True,
            "gitops_pending": name in GITOPS_EVENTS,
        },
    )
