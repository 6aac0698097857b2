"""Rendering a device's config: base → group patches by priority → device patch → the device's own fields.

Everything a render depends on but the device row is a ``Snapshot``, reloaded only when the database's
``config_state.revision`` moves (the boot path reads that number in the same query as the device). Rendered
configs are cached under a key made of exactly what they depend on, so a change to one group re-renders only
the devices in that group, a change to the worker base only the workers, and so on."""

from __future__ import annotations

import hashlib
import ipaddress
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select

from ktizo.db import Database
from ktizo.db.models import BaseConfigRow, ClusterSettings, ConfigState, DeviceGroup, GroupMember
from ktizo.domain.devices import Role
from ktizo.domain.errors import NotReady
from ktizo.pki.sealing import Sealer
from ktizo.talos import (
    Customization,
    Nic,
    Patch,
    TalosVersion,
    apply_patches,
    dump_documents,
    load_documents,
    load_patch,
    parse_talos_version,
)
from ktizo.talos import customize as customize_documents


class RenderableDevice(Protocol):
    """The device columns a render reads (an ORM ``Device`` or a boot-path row)."""

    @property
    def id(self) -> int: ...
    @property
    def revision(self) -> int: ...
    @property
    def role(self) -> str | None: ...
    @property
    def mac_address(self) -> str | None: ...
    @property
    def hostname(self) -> str | None: ...
    @property
    def ip_address(self) -> str | None: ...
    @property
    def labels(self) -> dict[str, str]: ...
    @property
    def patch(self) -> str | None: ...
    @property
    def install_disk(self) -> str | None: ...
    @property
    def extra_nics(self) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class BaseConfig:
    role: Role
    documents: list[dict[str, Any]]
    version_key: str  # changes whenever the base does; part of every render cache key
    source: str  # generated | uploaded | file


@dataclass(frozen=True)
class GroupSpec:
    id: int
    name: str
    priority: int
    revision: int
    selector: dict[str, str]
    members: frozenset[int]
    patch: Patch | None
    gateway: str | None
    nameservers: tuple[str, ...]

    def applies_to(self, device_id: int, labels: dict[str, str]) -> bool:
        if device_id in self.members:
            return True
        return bool(self.selector) and all(labels.get(k) == v for k, v in self.selector.items())


@dataclass(frozen=True)
class Snapshot:
    revision: int
    talos_version: TalosVersion
    cluster_revision: int
    gateway: str | None
    nameservers: tuple[str, ...]
    bases: dict[Role, BaseConfig]
    groups: tuple[GroupSpec, ...]  # in the order their patches apply: priority, then id
    settings: dict[str, Any] = field(default_factory=dict)

    def groups_for(self, device: RenderableDevice) -> tuple[GroupSpec, ...]:
        labels = device.labels or {}
        return tuple(g for g in self.groups if g.applies_to(device.id, labels))


class RenderCache:
    """Rendered configs by their full dependency key, least recently used evicted past ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[Any, ...]) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple[Any, ...], value: bytes) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._size += len(value)
            while self._size > self.max_bytes and self._items:
                _, old = self._items.popitem(last=False)
                self._size -= len(old)

    def __len__(self) -> int:
        return len(self._items)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ConfigSource:
    """Loads ``Snapshot``s from the database (and the seed's ``templates/base/`` files as a fallback)."""

    def __init__(self, db: Database, sealer: Sealer, base_dir: Path, default_talos_version: TalosVersion) -> None:
        self.db = db
        self.sealer = sealer
        self.base_dir = base_dir
        self.default_talos_version = default_talos_version
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._files: dict[Role, BaseConfig] = {}

    def current_revision(self) -> int:
        with self.db.read_engine.connect() as conn:
            return int(conn.execute(select(ConfigState.revision).where(ConfigState.id == 1)).scalar_one())

    def snapshot(self, revision: int | None = None) -> Snapshot:
        """The snapshot for ``revision`` (the current one if None), loaded at most once per revision."""
        if revision is None:
            revision = self.current_revision()
        snap = self._snapshot
        if snap is not None and snap.revision == revision:
            return snap
        with self._lock:
            snap = self._snapshot
            if snap is None or snap.revision != revision:
                snap = self._load(revision)
                self._snapshot = snap
        return snap

    def base(self, snap: Snapshot, role: Role) -> BaseConfig:
        base = snap.bases.get(role)
        if base is not None:
            return base
        return self._file_base(role)

    def _file_base(self, role: Role) -> BaseConfig:
        # The seed's layout: an operator may drop templates/base/<role>.yaml in by hand.
        path = self.base_dir / f"{role.value}.yaml"
        try:
            st = path.stat()
        except FileNotFoundError:
            raise NotReady(
                f"No base configuration for role {role.value} yet. Generate one (`ktizo cluster generate`), or "
                f"provide one with `ktizo cluster import-base {role.value} FILE` or "
                f"PUT /api/v1/cluster/base/{role.value}."
            ) from None
        key = f"file:{st.st_mtime_ns}-{st.st_size}"
        cached = self._files.get(role)
        if cached is not None and cached.version_key == key:
            return cached
        base = BaseConfig(role=role, documents=load_documents(path.read_bytes()), version_key=key, source="file")
        self._files[role] = base
        return base

    def _load(self, revision: int) -> Snapshot:
        with self.db.read() as s:
            settings = s.get(ClusterSettings, 1)
            rows = s.scalars(select(BaseConfigRow)).all()
            groups = s.scalars(select(DeviceGroup).order_by(DeviceGroup.priority, DeviceGroup.id)).all()
            members: dict[int, set[int]] = {}
            for gid, did in s.execute(select(GroupMember.group_id, GroupMember.device_id)):
                members.setdefault(gid, set()).add(did)
        bases = {}
        for row in rows:
            text = self.sealer.open(row.content)
            role = Role(row.role)
            bases[role] = BaseConfig(role, load_documents(text), f"db:{row.revision}:{row.sha256[:16]}", row.source)
        version = self.default_talos_version
        if settings is not None and settings.talos_version:
            version = parse_talos_version(settings.talos_version)
        specs = tuple(
            GroupSpec(
                id=g.id,
                name=g.name,
                priority=g.priority,
                revision=g.revision,
                selector=dict(g.selector or {}),
                members=frozenset(members.get(g.id, ())),
                patch=load_patch(g.patch) if g.patch else None,
                gateway=g.gateway,
                nameservers=tuple(g.nameservers or ()),
            )
            for g in groups
        )
        return Snapshot(
            revision=revision,
            talos_version=version,
            cluster_revision=settings.revision if settings else 0,
            gateway=settings.gateway if settings else None,
            nameservers=tuple(settings.nameservers or ()) if settings else (),
            bases=bases,
            groups=specs,
        )


def _in_subnet(gateway: str, address: str) -> bool:
    try:
        return ipaddress.ip_address(gateway) in ipaddress.ip_interface(address).network
    except ValueError:
        return False


def gateway_for(address: str, snap: Snapshot, groups: tuple[GroupSpec, ...]) -> str | None:
    """The default route of a NIC with ``address``: the gateway of the highest-priority group that sets one, else
    the cluster's, whichever first lies in the NIC's subnet (a gateway elsewhere is unreachable: Talos would get a
    route it cannot use)."""
    candidates = [g.gateway for g in reversed(groups) if g.gateway]
    if snap.gateway:
        candidates.append(snap.gateway)
    return next((gw for gw in candidates if _in_subnet(gw, address)), None)


def gateway_warning(address: str | None, snap: Snapshot, groups: tuple[GroupSpec, ...]) -> str | None:
    """Why a machine with this static address gets no default route, when it gets none although one is set."""
    if not address or gateway_for(address, snap, groups) is not None:
        return None
    configured = [g.gateway for g in reversed(groups) if g.gateway] + ([snap.gateway] if snap.gateway else [])
    if not configured:
        return None
    return (
        f"no default route: the gateway {configured[0]} is not in {address}'s subnet "
        f"({ipaddress.ip_interface(address).network}); set a gateway in that subnet on the cluster or a group, "
        "or give the machine an address in the gateway's subnet"
    )


def customization_for(device: RenderableDevice, snap: Snapshot, groups: tuple[GroupSpec, ...]) -> Customization:
    """The device's own fields, with network defaults from its highest-priority group that sets them, else the
    cluster's. A gateway becomes a NIC's default route only if it lies in that NIC's subnet (see ``gateway_for``);
    nameservers are written only for a device with a static address (with DHCP, the DHCP server hands them out)."""
    nameservers = next((g.nameservers for g in reversed(groups) if g.nameservers), snap.nameservers)
    nics: list[Nic] = []
    if device.mac_address and device.ip_address:
        gw = gateway_for(device.ip_address, snap, groups)
        nics.append(Nic(mac=device.mac_address, addresses=(device.ip_address,), gateway=gw))
    for extra in device.extra_nics or ():
        addresses = tuple(extra.get("addresses") or ())
        gw = extra.get("gateway")
        nics.append(Nic(mac=extra["mac"], addresses=addresses, gateway=gw))
    static = any(n.addresses for n in nics)
    return Customization(
        hostname=device.hostname,
        nics=tuple(nics),
        nameservers=tuple(nameservers) if static else (),
        install_disk=device.install_disk,
    )


def _role(device: RenderableDevice) -> Role:
    if device.role is None:
        raise NotReady("this machine is not a Talos machine: it has no Talos config")
    return Role(device.role)


class Renderer:
    def __init__(self, source: ConfigSource, cache: RenderCache) -> None:
        self.source = source
        self.cache = cache

    def documents(self, device: RenderableDevice, snap: Snapshot) -> list[dict[str, Any]]:
        """The full config as documents (uncached): what ``render`` serialises."""
        return self._compose(device, snap, self.source.base(snap, _role(device)), snap.groups_for(device))

    @staticmethod
    def _compose(
        device: RenderableDevice, snap: Snapshot, base: BaseConfig, groups: tuple[GroupSpec, ...]
    ) -> list[dict[str, Any]]:
        patches = [g.patch for g in groups if g.patch is not None]
        if device.patch:
            patches.append(load_patch(device.patch))
        docs = apply_patches(base.documents, patches) if patches else base.documents
        return customize_documents(docs, customization_for(device, snap, groups), snap.talos_version)

    def render(self, device: RenderableDevice, snap: Snapshot) -> bytes:
        base = self.source.base(snap, _role(device))
        groups = snap.groups_for(device)
        key = (
            device.id,
            device.revision,
            base.version_key,
            snap.cluster_revision,
            tuple((g.id, g.revision) for g in groups),
            snap.talos_version,
        )
        body = self.cache.get(key)
        if body is None:
            # The base and the groups were looked up for the key already; a cold render does not redo it.
            body = dump_documents(self._compose(device, snap, base, groups)).encode()
            self.cache.put(key, body)
        return body
