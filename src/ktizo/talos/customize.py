"""Per-device customization of a base Talos config: hostname, static addresses by MAC, DNS, install disk.

The base config is shared by every machine of a role; a device's customization is applied on top of a deep
copy, in the form the device's Talos version reads: multi-document networking from Talos 1.12, the legacy
``machine.network`` section before.
"""

from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass
from typing import Any

from ktizo.domain.errors import ValidationFailed
from ktizo.domain.identity import (
    normalize_hostname,
    normalize_interface_address,
    normalize_ip,
    normalize_mac,
)
from ktizo.talos.versions import SUPPORTED_TALOS_VERSIONS, TalosVersion
from ktizo.talos.yamlio import dump_documents

API_VERSION = "v1alpha1"
LINK_NAME_PREFIX = "ktizo"

# Multi-document kinds that Talos 1.11 does not know. Its loader rejects unknown kinds, so a config holding
# any of them would never load there: they are dropped (after carrying over what the legacy section can say).
MULTIDOC_NETWORK_KINDS = frozenset({"HostnameConfig", "LinkConfig", "LinkAliasConfig", "ResolverConfig"})


@dataclass(frozen=True)
class Nic:
    """A network interface of the device, identified by its (permanent) MAC address."""

    mac: str  # canonical aa:bb:cc:dd:ee:ff
    addresses: tuple[str, ...] = ()  # CIDR strings, e.g. "10.0.5.100/24"
    gateway: str | None = None  # default route via this gateway (optional)


@dataclass(frozen=True)
class Customization:
    """What one device gets on top of its role's base config; empty fields leave the base as it is."""

    hostname: str | None = None
    nics: tuple[Nic, ...] = ()
    nameservers: tuple[str, ...] = ()
    install_disk: str | None = None


@dataclass(frozen=True)
class _Link:
    name: str
    mac: str
    addresses: tuple[str, ...]
    gateway: str | None


@dataclass(frozen=True)
class _Plan:
    hostname: str | None
    links: tuple[_Link, ...]
    nameservers: tuple[str, ...]
    install_disk: str | None


def _plan(c: Customization) -> _Plan:
    """Normalize and check the customization, so nothing malformed reaches a config Talos would refuse."""
    hostname = normalize_hostname(c.hostname, "hostname") if c.hostname else None
    links: list[_Link] = []
    seen_macs: set[str] = set()
    for index, nic in enumerate(c.nics):
        where = f"nics[{index}]"
        # The MAC is pasted into a CEL expression: only the canonical form may get there.
        mac = normalize_mac(nic.mac, f"{where}.mac")
        if mac in seen_macs:
            raise ValidationFailed(f"MAC {mac} is given for two NICs", f"{where}.mac")
        seen_macs.add(mac)
        addresses = tuple(
            normalize_interface_address(address, f"{where}.addresses[{n}]") for n, address in enumerate(nic.addresses)
        )
        gateway = None
        if nic.gateway:
            gateway = normalize_ip(nic.gateway, f"{where}.gateway")
            if ipaddress.ip_address(gateway).is_unspecified:
                raise ValidationFailed(f"{gateway} cannot be a gateway", f"{where}.gateway")
        # Named by position, so the same device always gets the same names whatever its addresses are.
        links.append(_Link(f"{LINK_NAME_PREFIX}{index}", mac, addresses, gateway))
    nameservers = tuple(normalize_ip(server, f"nameservers[{n}]") for n, server in enumerate(c.nameservers))
    disk = c.install_disk.strip() if c.install_disk else None
    if disk is not None and (not disk.startswith("/dev/") or any(ch.isspace() for ch in disk)):
        raise ValidationFailed(f"{disk[:80]!r} is not a disk path such as /dev/sda", "install_disk")
    return _Plan(hostname, tuple(links), nameservers, disk)


def _mapping(parent: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = parent.get(key)
    if value is None:
        value = parent[key] = {}
    if not isinstance(value, dict):
        raise ValidationFailed(f"base config: {where} is not a mapping", where)
    return value


def _existing_mapping(parent: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = parent.get(key)
    return value if isinstance(value, dict) else None


def _prune_empty(parent: dict[str, Any], key: str) -> None:
    if parent.get(key) in ({}, []):
        del parent[key]


def _the_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    configs = [doc for doc in docs if isinstance(doc, dict) and doc.get("kind") is None]
    if len(configs) != 1:
        raise ValidationFailed(
            f"base config needs exactly one v1alpha1 document (the one without kind); found {len(configs)}"
        )
    return configs[0]


def _find(docs: list[dict[str, Any]], kind: str, name: str = "") -> int | None:
    for index, doc in enumerate(docs):
        if doc.get("kind") == kind and (doc.get("name") or "") == name:
            return index
    return None


def _put(docs: list[dict[str, Any]], doc: dict[str, Any]) -> None:
    """Add a generated document, replacing one of the same kind and name: Talos refuses duplicates."""
    index = _find(docs, doc["kind"], doc.get("name", ""))
    if index is None:
        docs.append(doc)
    else:
        docs[index] = doc


def _same_mac(entry: Any, mac: str) -> bool:
    if not isinstance(entry, dict):
        return False
    selector = entry.get("deviceSelector")
    if not isinstance(selector, dict):
        return False
    value = selector.get("hardwareAddr")
    return isinstance(value, str) and value.strip().lower() == mac


def _apply_multidoc(docs: list[dict[str, Any]], machine: dict[str, Any], plan: _Plan) -> None:
    network = _existing_mapping(machine, "network")
    if plan.hostname:
        # Talos refuses a HostnameConfig next to a v1alpha1 hostname or stableHostname (conflict check).
        if network is not None:
            network.pop("hostname", None)
        features = _existing_mapping(machine, "features")
        if features is not None:
            features.pop("stableHostname", None)
        index = _find(docs, "HostnameConfig")
        if index is None:
            docs.append({"apiVersion": API_VERSION, "kind": "HostnameConfig"})
            index = len(docs) - 1
        hostname_doc = docs[index]
        # The generated base says auto: stable; Talos refuses a hostname unless auto is off.
        hostname_doc["auto"] = "off"
        hostname_doc["hostname"] = plan.hostname

    for link in plan.links:
        if not link.addresses and not link.gateway:
            continue
        _put(
            docs,
            {
                "apiVersion": API_VERSION,
                "kind": "LinkAliasConfig",
                "name": link.name,
                # The permanent address survives the link being enslaved to a bond, unlike link.hardware_addr.
                "selector": {"match": f'mac(link.permanent_addr) == "{link.mac}"'},
            },
        )
        link_doc: dict[str, Any] = {"apiVersion": API_VERSION, "kind": "LinkConfig", "name": link.name}
        if link.addresses:
            link_doc["addresses"] = [{"address": address} for address in link.addresses]
        if link.gateway:
            link_doc["routes"] = [{"gateway": link.gateway}]  # no destination: the default route
        _put(docs, link_doc)
        # A legacy entry for the same NIC would configure the link a second time, from the base.
        if network is not None and isinstance(network.get("interfaces"), list):
            network["interfaces"] = [e for e in network["interfaces"] if not _same_mac(e, link.mac)]
            _prune_empty(network, "interfaces")

    if plan.nameservers:
        index = _find(docs, "ResolverConfig")
        if index is None:
            docs.append({"apiVersion": API_VERSION, "kind": "ResolverConfig"})
            index = len(docs) - 1
        resolver = docs[index]
        # The device's servers replace the base's: a per-device list exists because the base's servers
        # are not the right ones (or not reachable) from where this machine sits.
        resolver["nameservers"] = [{"address": server} for server in plan.nameservers]
        if network is not None:
            # Talos refuses legacy resolver fields next to a ResolverConfig; carry over what they said.
            network.pop("nameservers", None)
            domains = network.pop("searchDomains", None)
            disable = network.pop("disableSearchDomain", None)
            if domains is not None or disable:
                search = _mapping(resolver, "searchDomains", "ResolverConfig.searchDomains")
                if domains is not None:
                    search.setdefault("domains", domains)
                if disable:
                    search.setdefault("disableDefault", True)

    if network is not None:
        _prune_empty(machine, "network")


def _carry_over_multidoc(dropped: list[dict[str, Any]], machine: dict[str, Any], plan: _Plan) -> None:
    """Say in legacy form what dropped hostname and resolver documents of the base said, where the
    customization does not say otherwise, so a 1.12-style base keeps its meaning on Talos 1.11."""
    network = _existing_mapping(machine, "network") or {}
    for doc in dropped:
        kind = doc.get("kind")
        if kind == "HostnameConfig" and not plan.hostname and not network.get("hostname"):
            if doc.get("hostname"):
                _mapping(machine, "network", "machine.network")["hostname"] = doc["hostname"]
            elif doc.get("auto") == "stable":
                _mapping(machine, "features", "machine.features").setdefault("stableHostname", True)
        elif kind == "ResolverConfig":
            servers = [s.get("address") for s in doc.get("nameservers") or () if isinstance(s, dict)]
            search = _existing_mapping(doc, "searchDomains") or {}
            if servers and not plan.nameservers and not network.get("nameservers"):
                _mapping(machine, "network", "machine.network")["nameservers"] = servers
            if search.get("domains") is not None and network.get("searchDomains") is None:
                _mapping(machine, "network", "machine.network")["searchDomains"] = search["domains"]
            if search.get("disableDefault"):
                _mapping(machine, "network", "machine.network")["disableSearchDomain"] = True


def _apply_legacy(docs: list[dict[str, Any]], machine: dict[str, Any], plan: _Plan) -> list[dict[str, Any]]:
    dropped = [doc for doc in docs if doc.get("kind") in MULTIDOC_NETWORK_KINDS]
    kept = [doc for doc in docs if doc.get("kind") not in MULTIDOC_NETWORK_KINDS]
    _carry_over_multidoc(dropped, machine, plan)

    if plan.hostname:
        _mapping(machine, "network", "machine.network")["hostname"] = plan.hostname

    for link in plan.links:
        if not link.addresses and not link.gateway:
            continue
        entry: dict[str, Any] = {"deviceSelector": {"hardwareAddr": link.mac}}
        if link.addresses:
            entry["addresses"] = list(link.addresses)
        if link.gateway:
            default = "::/0" if ipaddress.ip_address(link.gateway).version == 6 else "0.0.0.0/0"
            entry["routes"] = [{"network": default, "gateway": link.gateway}]
        # Static addresses only: DHCP on the same NIC would add a second, unplanned address.
        entry["dhcp"] = False
        network = _mapping(machine, "network", "machine.network")
        interfaces = network.setdefault("interfaces", [])
        if not isinstance(interfaces, list):
            raise ValidationFailed("base config: machine.network.interfaces is not a list")
        for position, existing in enumerate(interfaces):
            if _same_mac(existing, link.mac):
                interfaces[position] = entry
                break
        else:
            interfaces.append(entry)

    if plan.nameservers:
        _mapping(machine, "network", "machine.network")["nameservers"] = list(plan.nameservers)
    return kept


def customize(base: list[dict[str, Any]], c: Customization, version: TalosVersion) -> list[dict[str, Any]]:
    """Return a new document list: ``base`` with the device's customization applied for Talos ``version``.

    ``base`` is never modified. Raises ``ValidationFailed`` for a malformed customization, an unsupported
    version, or a base without exactly one v1alpha1 document.
    """
    if version not in SUPPORTED_TALOS_VERSIONS:
        supported = ", ".join(str(v) for v in SUPPORTED_TALOS_VERSIONS)
        raise ValidationFailed(f"Talos {version} is not supported; supported: {supported}", "talos_version")
    plan = _plan(c)
    docs = copy.deepcopy(base)
    machine = _mapping(_the_config(docs), "machine", "machine")
    if version.multidoc_network:
        _apply_multidoc(docs, machine, plan)
    else:
        docs = _apply_legacy(docs, machine, plan)
    if plan.install_disk:
        install = _mapping(machine, "install", "machine.install")
        install["disk"] = plan.install_disk
        # Talos lets a diskSelector win over disk; the device's explicit disk must be the one used.
        install.pop("diskSelector", None)
    return docs


def render(base: list[dict[str, Any]], c: Customization, version: TalosVersion) -> bytes:
    """The customized config as the UTF-8 YAML bytes a machine downloads."""
    return dump_documents(customize(base, c, version)).encode("utf-8")
