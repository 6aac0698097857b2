"""What the device pages share: the ``{id}`` path convertor, the approve form's fields and how they are read, and
what a row or a page says about a machine (hardware, architecture, the network its address belongs in)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request, Response
from fastapi.responses import RedirectResponse
from starlette.convertors import Convertor, register_url_convertor

from ktizo.domain.devices import DeviceStatus, MachineKind, Role
from ktizo.domain.identity import normalize_hostname, normalize_interface_address
from ktizo.services.devices import DeviceChanges, DeviceQuery
from ktizo.services.records import Device
from ktizo.services.registry import Services
from ktizo.web.forms import Errors, parse, text, too_long
from ktizo.web.templating import set_flash


class IdConvertor(Convertor[int]):
    """``{name:id}`` in a UI path: a row id, digits as for ``{name:int}``, but at most 100 of them.

    Starlette's ``int`` calls ``int()`` while matching routes, before any sign-in check, and ``int()`` refuses
    more than 4300 digits with ValueError: a 500 for anyone. An id has at most 10 digits (the services answer
    "not found" for any number beyond the id range); a longer path matches no route and is a plain 404."""

    regex = "[0-9]{1,100}"

    def convert(self, value: str) -> int:
        return int(value)

    def to_string(self, value: int) -> str:
        return str(value)


register_url_convertor("id", IdConvertor())  # before the routes below (and in web.users) compile their paths

ROLE_OPTIONS = [("worker", "worker"), ("controlplane", "controlplane")]
APPROVE_FIELDS = ("hostname", "ip_address", "role", "notes")
EDIT_FIELDS = (*APPROVE_FIELDS, "install_disk", "labels")
HARDWARE_FACTS = ("manufacturer", "vendor", "product", "model")
ARCH_FACTS = ("arch", "architecture", "platform")
AGENT_APPROVE_FIELDS = ("hostname", "notes")
MAX_LISTED = 64  # disks or NICs a host reports beyond this are counted, not listed


def hardware(device: Device) -> str:
    facts = device.facts or {}
    parts = [str(facts[k]) for k in HARDWARE_FACTS if facts.get(k)]
    return " ".join(dict.fromkeys(parts))  # manufacturer and vendor are often the same string


def arch(device: Device) -> str:
    facts = device.facts or {}
    return next((str(facts[k]) for k in ARCH_FACTS if facts.get(k)), "")


def is_agent(device: Device) -> bool:
    return device.kind == MachineKind.AGENT.value


# An agent host reports its identity at enrollment and its hardware at every check-in: JSON it wrote itself, so
# every value is read defensively (any type may be anywhere) and shown as text, never markup.


def _text(value: Any, limit: int = 256) -> str:
    if value is None or isinstance(value, (dict, list)):
        return ""
    return str(value)[:limit]


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


@dataclass(frozen=True)
class Reported:
    """What an agent host said about itself when it enrolled."""

    hostname: str
    fqdn: str
    addresses: list[str]
    os: str  # "debian 12"
    kernel: str


def reported(device: Device) -> Reported:
    facts = device.facts or {}
    os_info = _dict(facts.get("os"))
    addresses = facts.get("ip_addresses")
    return Reported(
        hostname=_text(facts.get("hostname")),
        fqdn=_text(facts.get("fqdn")),
        addresses=[_text(a, 64) for a in addresses[:MAX_LISTED]] if isinstance(addresses, list) else [],
        os=" ".join(p for p in (_text(os_info.get("id")), _text(os_info.get("version"))) if p),
        kernel=_text(os_info.get("kernel")),
    )


@dataclass(frozen=True)
class Disk:
    name: str
    size: int | None
    model: str
    medium: str  # "SSD", "HDD" or ""


@dataclass(frozen=True)
class Nic:
    name: str
    mac: str
    state: str
    speed_mbps: int | None
    mtu: int | None


@dataclass(frozen=True)
class HostFacts:
    """The hardware an agent reported at its last check-in (or probe), summarised for a page."""

    at: dt.datetime | None
    cpu_model: str
    cpus: int | None
    memory: int | None
    disks: list[Disk] = field(default_factory=list)
    nics: list[Nic] = field(default_factory=list)
    more_disks: int = 0
    more_nics: int = 0

    @property
    def cpu(self) -> str:
        count = f"{self.cpus} CPU{'s' if self.cpus != 1 else ''}" if self.cpus else ""
        return " · ".join(p for p in (self.cpu_model, count) if p)


def _when(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _medium(rotational: Any) -> str:
    if not isinstance(rotational, bool):
        return ""
    return "HDD" if rotational else "SSD"


def host_facts(device: Device) -> HostFacts | None:
    facts = device.facts or {}
    host = facts.get("host")
    if not isinstance(host, dict):
        return None
    cpu = _dict(host.get("cpu"))
    disks = _dicts(host.get("disks"))
    nics = _dicts(host.get("nics"))
    return HostFacts(
        at=_when(facts.get("host_at")),
        cpu_model=_text(cpu.get("model")),
        cpus=_count(cpu.get("logical_cpus")),
        memory=_count(_dict(host.get("memory")).get("total_bytes")),
        disks=[
            Disk(
                name=_text(d.get("name"), 64),
                size=_count(d.get("size_bytes")),
                model=_text(d.get("model")),
                medium=_medium(d.get("rotational")),
            )
            for d in disks[:MAX_LISTED]
        ],
        nics=[
            Nic(
                name=_text(n.get("name"), 64),
                mac=_text(n.get("mac"), 64),
                state=_text(n.get("operstate"), 32),
                speed_mbps=_count(n.get("speed_mbps")),
                mtu=_count(n.get("mtu")),
            )
            for n in nics[:MAX_LISTED]
        ],
        more_disks=max(0, len(disks) - MAX_LISTED),
        more_nics=max(0, len(nics) - MAX_LISTED),
    )


def network_hint(services: Services) -> tuple[str, str]:
    """(placeholder, hint) for the IP address field: the network the cluster's machines live in, as far as
    the gateway and the addresses already handed out tell."""
    gateway_text = services.cluster.settings().gateway
    gateway = ipaddress.ip_address(gateway_text) if gateway_text else None
    network = None
    recent, _ = services.devices.list(DeviceQuery(status=DeviceStatus.APPROVED, limit=25, order="id", descending=True))
    for device in recent:
        if not device.ip_address:
            continue
        try:
            candidate = ipaddress.ip_interface(device.ip_address).network
        except ValueError:
            continue
        if gateway is None or gateway in candidate:
            network = candidate
            break
    if network is None and gateway is not None and gateway.version == 4:
        network = ipaddress.ip_network(f"{gateway}/24", strict=False)
        guessed = True
    else:
        guessed = False
    if network is None:
        return "10.0.5.100/24", "CIDR form, e.g. 10.0.5.100/24. Leave empty to keep DHCP."
    if network.version == 4:
        placeholder = ".".join(str(network.network_address).split(".")[:3]) + f".x/{network.prefixlen}"
    else:
        placeholder = f"{network.network_address}x/{network.prefixlen}"
    parts = [f"CIDR form, e.g. {placeholder}."]
    parts.append(f"{'Probably n' if guessed else 'N'}etwork {network}")
    parts[-1] += f", gateway {gateway}." if gateway else "."
    return placeholder, " ".join(parts)


def approve_changes(form: Any, errors: Errors) -> tuple[DeviceChanges, dict[str, str]]:
    values = {name: text(form, name, 4096 if name == "notes" else 255) for name in APPROVE_FIELDS}
    changes = DeviceChanges()
    if values["hostname"]:
        changes.hostname = parse(errors, "hostname", values["hostname"], normalize_hostname)
    if values["ip_address"]:
        changes.ip_address = parse(errors, "ip_address", values["ip_address"], normalize_interface_address)
    if values["role"]:
        if values["role"] in Role.__members__.values():
            changes.role = Role(values["role"]).value
        else:
            errors["role"] = "choose controlplane or worker"
    too_long(errors, "notes", values["notes"], 4096)
    changes.notes = values["notes"]
    return changes, values


def after_change(request: Request, device_id: int, message: str) -> Response:
    """Post/redirect/get back to the device's page, with the outcome as a one-time notice."""
    response = RedirectResponse(f"/ui/devices/{device_id}", status_code=303)
    set_flash(response, message)
    return response


def approved_message(device: Device, warnings: list[str]) -> str:
    if is_agent(device):
        name = device.hostname or "(no hostname)"
        if device.fqdn:
            name += f" ({device.fqdn})"
        return f"Approved as {name}. Its certificate is issued and waits for the host's next poll."
    parts = [device.hostname or "(Talos picks the hostname)", device.ip_address or "DHCP", device.role or device.kind]
    message = "Approved as " + " · ".join(parts) + ". It gets its config on its next request."
    return message + "".join(f" Warning: {w}." for w in warnings)
