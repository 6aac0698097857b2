"""What the device pages share: the ``{id}`` path convertor, the approve form's fields and how they are read, and
what a row or a page says about a machine (hardware, architecture, the network its address belongs in)."""

from __future__ import annotations

import ipaddress
from typing import Any

from fastapi import Request, Response
from fastapi.responses import RedirectResponse
from starlette.convertors import Convertor, register_url_convertor

from ktizo.domain.devices import DeviceStatus, Role
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


def hardware(device: Device) -> str:
    facts = device.facts or {}
    parts = [str(facts[k]) for k in HARDWARE_FACTS if facts.get(k)]
    return " ".join(dict.fromkeys(parts))  # manufacturer and vendor are often the same string


def arch(device: Device) -> str:
    facts = device.facts or {}
    return next((str(facts[k]) for k in ARCH_FACTS if facts.get(k)), "")


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
    parts = [device.hostname or "(Talos picks the hostname)", device.ip_address or "DHCP", device.role or device.kind]
    message = "Approved as " + " · ".join(parts) + ". It gets its config on its next request."
    return message + "".join(f" Warning: {w}." for w in warnings)
