"""The machine at the door: its states, roles, how it was seen, and which transitions are allowed."""

from __future__ import annotations

import enum

from ktizo.domain.errors import InvalidTransition


class DeviceStatus(enum.StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"


class MachineKind(enum.StrEnum):
    """What kind of machine knocked: a Talos machine (config by network boot) or a Linux host running the agent."""

    TALOS = "talos"
    AGENT = "agent"


class Role(enum.StrEnum):
    CONTROLPLANE = "controlplane"
    WORKER = "worker"


class Source(enum.StrEnum):
    """The door a machine came through (how Ktizo first learnt of it, and where later knocks came from)."""

    CONFIG_FETCH = "config_fetch"  # Talos asked for its config
    REGISTER = "register"  # the explicit register endpoint
    MANUAL = "manual"  # an operator pre-registered it
    DHCP = "dhcp"  # dnsmasq saw a lease
    IPXE = "ipxe"  # iPXE asked for its boot script
    DEVICE_CODE = "device_code"  # Talos's OAuth device flow
    ENROLL = "enroll"  # a Linux host running ktizo-agent asked to enroll


_ALLOWED: dict[DeviceStatus, frozenset[DeviceStatus]] = {
    DeviceStatus.PENDING: frozenset({DeviceStatus.APPROVED, DeviceStatus.REJECTED}),
    DeviceStatus.REJECTED: frozenset({DeviceStatus.APPROVED}),  # re-approval
    DeviceStatus.APPROVED: frozenset({DeviceStatus.REJECTED}),  # revocation
}


def check_transition(current: DeviceStatus, target: DeviceStatus) -> None:
    """Raise ``InvalidTransition`` unless ``current -> target`` is one the state machine allows."""
    if target not in _ALLOWED[current]:
        if current == target:
            raise InvalidTransition(f"device is already {current.value}")
        raise InvalidTransition(f"a {current.value} device cannot become {target.value}")


def not_approved_message(status: DeviceStatus) -> str:
    """The sentence the seed contract gives Talos (and humans reading its log) when it is refused."""
    return f"Device not approved. Current status: {status.value}"


# One answer for every identity refusal (a factor missing, a factor that differs, the wrong source address), so a
# caller learns nothing about what the machine is bound to; operators find the detail in the audit log and the UI.
IDENTITY_REFUSED = (
    "Device identity not proven: this request does not match what Ktizo knows of the machine with this MAC. "
    "Boot it with talos.config=…/api/v1/config/download?mac=${mac}&uuid=${uuid}&serial=${serial} from its own "
    "network port; if its hardware changed, an operator can see why in Ktizo and clear the binding."
)
