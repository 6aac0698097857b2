"""What the GitOps repository holds for one machine: a Tinkerbell ``Hardware`` manifest (``tinkerbell.org/v1alpha1``,
as its CRD's schema accepts it) and Ktizo's own ``Device`` document, rendered from plain values.

Where a file lives:
- ``hardware/<name>.yaml``: approved and rejected machines (``allowPXE`` true only when approved); ``<name>`` is
  the hostname of an approved machine, else its MAC with dashes, else its machine-id.
- ``discovered/<mac>.yaml``: pending Talos machines, with the seed's ``auto-generated`` and ``discovery-timeout``
  annotations (pending agent enrollments are not hardware and are not written).
- ``ktizo/devices/<name>.yaml``: the ``Device`` document beside either of them, same ``<name>``.

A patch is never written to a ``Hardware`` manifest; to the ``Device`` document only when asked (patches can hold
secrets)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

try:  # the C dumper when PyYAML has it
    from yaml import CSafeDumper as _Dumper
except ImportError:  # pragma: no cover
    from yaml import SafeDumper as _Dumper  # type: ignore[assignment]

HARDWARE_DIR = "hardware"
DISCOVERED_DIR = "discovered"
DEVICES_DIR = "ktizo/devices"
MANAGED_DIRS = (HARDWARE_DIR, DISCOVERED_DIR, DEVICES_DIR)

DEVICE_ID = "ktizo.dev/device-id"  # the annotation that ties a manifest to its registry row
EXPIRES_AT = "ktizo.dev/expires-at"
# The seed's own annotation keys (shared/seeds: "Tinkerbell auto-registration"), exactly as it writes them.
AUTO_GENERATED = "auto-generated"
DISCOVERY_TIMEOUT = "discovery-timeout"

# A Kubernetes object name (RFC 1123 subdomain) and label value.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")


@dataclass(frozen=True)
class Machine:
    """One registry row as the repository sees it: plain values, no database."""

    id: int
    kind: str  # talos | agent
    status: str  # pending | approved | rejected
    mac_address: str | None = None
    machine_id: str | None = None
    machine_uid: str | None = None
    uuid: str | None = None
    hostname: str | None = None
    ip_address: str | None = None  # with its prefix, e.g. 10.0.5.100/24
    role: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    patch: str | None = None
    install_disk: str | None = None
    extra_nics: tuple[dict[str, Any], ...] = ()
    source: str = "manual"
    first_seen: dt.datetime | None = None
    gateway: str | None = None  # the default route for ip_address (cluster's or a group's), if any
    nameservers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Options:
    namespace: str = "tink-system"
    discovery_timeout: dt.timedelta = dt.timedelta(hours=24)
    include_patches: bool = False


def written(machine: Machine) -> bool:
    """Whether the repository holds anything for this machine: not for a pending agent (an enrollment, not
    hardware)."""
    return not (machine.status == "pending" and machine.kind == "agent")


def dashed(mac: str) -> str:
    return mac.lower().replace(":", "-")


def name_of(machine: Machine) -> str:
    """The file's stem and the object's name: the hostname of an approved machine (unique among approved ones),
    else the MAC with dashes, else the machine-id (agents), else ``device-<id>``."""
    candidates = []
    if machine.status == "approved" and machine.hostname:
        candidates.append(machine.hostname.lower())
    if machine.mac_address:
        candidates.append(dashed(machine.mac_address))
    candidates += [v.lower() for v in (machine.machine_id, machine.machine_uid) if v]
    for name in candidates:
        if _NAME.fullmatch(name):
            return name
    return f"device-{machine.id}"


def paths_of(machine: Machine) -> tuple[str, str]:
    """(the Hardware manifest's path, the Device document's path), relative to the repository."""
    name = name_of(machine)
    folder = DISCOVERED_DIR if machine.status == "pending" else HARDWARE_DIR
    return f"{folder}/{name}.yaml", f"{DEVICES_DIR}/{name}.yaml"


def go_duration(delta: dt.timedelta) -> str:
    """A duration as Go (and the seed) writes it: ``24h``, ``90m``, ``45s``."""
    seconds = int(delta.total_seconds())
    if seconds and seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds and seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def _ip(address: str, gateway: str | None) -> dict[str, Any]:
    iface = ipaddress.ip_interface(address)
    ip: dict[str, Any] = {"address": str(iface.ip), "netmask": str(iface.netmask), "family": iface.version}
    if gateway:
        ip["gateway"] = gateway
    return ip


def _label(value: str | None) -> str | None:
    return value if value and len(value) <= 63 and _LABEL_VALUE.fullmatch(value) else None


def hardware(machine: Machine, options: Options | None = None) -> dict[str, Any]:
    """The Tinkerbell ``Hardware`` manifest of a machine: its NICs (the MAC, the hostname, the static address as
    ``ip.address``/``netmask``/``gateway``), ``allowPXE`` (true only when approved) and its install disk."""
    options = options or Options()
    approved = machine.status == "approved"
    pending = machine.status == "pending"
    name = name_of(machine)
    hostname = machine.hostname
    if pending and not hostname and machine.mac_address:
        hostname = "discovered-" + machine.mac_address.lower().replace(":", "")[6:]  # the seed's <mac-truncated>
    annotations: dict[str, str] = {DEVICE_ID: str(machine.id)}
    if pending:
        discovered = machine.source != "manual"
        annotations[AUTO_GENERATED] = "true" if discovered else "false"
        if discovered:
            annotations[DISCOVERY_TIMEOUT] = go_duration(options.discovery_timeout)
            if machine.first_seen is not None:
                expires = machine.first_seen + options.discovery_timeout
                annotations[EXPIRES_AT] = expires.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    labels = {"app.kubernetes.io/managed-by": "ktizo", "ktizo.dev/status": machine.status}
    if _label(machine.role):
        labels["ktizo.dev/role"] = machine.role  # type: ignore[assignment]

    interfaces: list[dict[str, Any]] = []
    ips: list[dict[str, Any]] = []
    if machine.mac_address:
        dhcp: dict[str, Any] = {"mac": machine.mac_address.lower()}
        if hostname:
            dhcp["hostname"] = hostname
        if machine.ip_address:
            ip = _ip(machine.ip_address, machine.gateway)
            dhcp["ip"] = ip
            ips.append(ip)
            if machine.nameservers:
                dhcp["name_servers"] = list(machine.nameservers)
        interfaces.append(
            {"dhcp": dhcp, "netboot": {"allowPXE": approved and machine.kind == "talos", "allowWorkflow": approved}}
        )
    for nic in machine.extra_nics:
        mac = str(nic.get("mac") or "").lower()
        if not mac:
            continue
        extra: dict[str, Any] = {"mac": mac}
        addresses = [a for a in nic.get("addresses") or () if a]
        if addresses:
            extra["ip"] = _ip(str(addresses[0]), nic.get("gateway"))
        interfaces.append({"dhcp": extra, "netboot": {"allowPXE": False, "allowWorkflow": False}})

    instance: dict[str, Any] = {"allow_pxe": approved and machine.kind == "talos"}
    if hostname:
        instance["hostname"] = hostname
    if machine.uuid:
        instance["id"] = machine.uuid
    if ips:
        instance["ips"] = ips
    spec: dict[str, Any] = {"metadata": {"instance": instance}}
    if pending:
        spec["metadata"]["facility"] = {"facility_code": "discovery"}
    spec["interfaces"] = interfaces
    if machine.install_disk:
        spec["disks"] = [{"device": machine.install_disk}]
    return {
        "apiVersion": "tinkerbell.org/v1alpha1",
        "kind": "Hardware",
        "metadata": {
            "name": f"temp-discovered-{name}" if pending else name,
            "namespace": options.namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": spec,
    }


def device_document(machine: Machine, options: Options | None = None) -> dict[str, Any]:
    """Ktizo's own ``Device`` document (``ktizo.dev/v1``): who the machine is and what it was given, empty values
    omitted; its patch only with ``include_patches``."""
    options = options or Options()
    spec: dict[str, Any] = {}
    if machine.mac_address:
        spec["mac_address"] = machine.mac_address
    elif machine.machine_id:
        spec["machine_id"] = machine.machine_id
    for key in ("hostname", "ip_address", "role"):
        value = getattr(machine, key)
        if value:
            spec[key] = value
    if machine.labels:
        spec["labels"] = dict(sorted(machine.labels.items()))
    if options.include_patches and machine.patch:
        spec["patch"] = machine.patch
    spec["status"] = machine.status
    return {"apiVersion": "ktizo.dev/v1", "kind": "Device", "metadata": {"name": name_of(machine)}, "spec": spec}


def dump(document: dict[str, Any]) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


def files_of(machine: Machine, options: Options | None = None) -> dict[str, str]:
    """Every file the repository holds for the machine, path -> text (none for a pending agent)."""
    if not written(machine):
        return {}
    manifest_path, device_path = paths_of(machine)
    return {manifest_path: dump(hardware(machine, options)), device_path: dump(device_document(machine, options))}


_DEVICE_ID_LINE = re.compile(rf"^\s+{re.escape(DEVICE_ID)}: ['\"]?(\d+)['\"]?\s*$", re.MULTILINE)


def device_id_in(text: str) -> int | None:
    """The registry id a manifest names (its ``ktizo.dev/device-id`` annotation), read without parsing YAML."""
    match = _DEVICE_ID_LINE.search(text)
    return int(match.group(1)) if match else None
