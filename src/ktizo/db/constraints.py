"""What a broken constraint means, in the domain's words: an ``IntegrityError`` is a ``Conflict`` naming the field,
never a server error. Services check the common cases first to name the holder; the constraint is what holds when
two requests (or two replicas) race past those checks."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError

from ktizo.domain.errors import Conflict

# Constraint (or index) name, and for SQLite the "table.column" it reports instead -> (field, message).
_KNOWN: tuple[tuple[tuple[str, ...], str | None, str], ...] = (
    (("uq_devices_mac_address", "devices.mac_address"), "mac_address", "a machine with this MAC address exists"),
    (("uq_devices_machine_id", "devices.machine_id"), "machine_id", "a machine with this machine-id exists"),
    (("uq_devices_machine_uid", "devices.machine_uid"), "machine_uid", "a machine with this machine_uid exists"),
    (("uq_devices_uuid_without_mac", "devices.uuid"), "uuid", "a machine known only by this UUID exists"),
    (
        ("uq_devices_approved_hostname", "devices.hostname"),
        "hostname",
        "another approved machine has this hostname: pick another name, or change or revoke that machine first",
    ),
    (
        ("uq_devices_approved_address", "devices.static_ip"),
        "ip_address",
        "another approved machine has this static IP: pick another address, or change or revoke that machine first",
    ),
    (("uq_users_username", "users.username"), "username", "that user name is taken"),
    (("uq_device_groups_name", "device_groups.name"), "name", "a group with this name exists"),
    (("uq_device_codes_user_code", "device_codes.user_code"), "user_code", "that console code is in use"),
    (
        ("uq_enrollments_device_id", "enrollments.device_id"),
        "machine_id",
        "this machine-id already has an enrollment in Ktizo: keep polling with the saved token, or ask an operator "
        "to approve it, or to purge it so that the host can start over",
    ),
    (("ck_devices_kind_fields",), "role", "a Talos machine has a role (controlplane or worker); an agent has none"),
)


def constraint_of(exc: IntegrityError) -> str:
    """The name PostgreSQL reports, or SQLite's message (which names the index or the columns)."""
    diag = getattr(getattr(exc, "orig", None), "diag", None)
    name = getattr(diag, "constraint_name", None)
    return str(name) if name else str(getattr(exc, "orig", exc))


def conflict_for(exc: IntegrityError) -> Exception:
    """The Conflict ``exc`` means; the audit log's append-only trigger is no conflict but a bug, and stays itself."""
    text = constraint_of(exc)
    if "append-only" in text:
        return exc
    for names, field, message in _KNOWN:
        if any(name in text for name in names):
            return Conflict(message, field)
    return Conflict("that conflicts with what is stored (a concurrent change won); reload and try again")
