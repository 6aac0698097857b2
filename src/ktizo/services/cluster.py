"""Cluster configuration: settings, the secrets bundle, generated or uploaded base configs, talosconfig."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ktizo.db import Database
from ktizo.db.models import Authority, BaseConfigRow, ClusterSecrets, ClusterSettings, Device, Webhook
from ktizo.db.types import utcnow
from ktizo.domain.devices import DeviceStatus, Role
from ktizo.domain.errors import Conflict, FailedPrecondition, NotReady, ValidationFailed
from ktizo.domain.identity import normalize_ip
from ktizo.domain.users import UserRole
from ktizo.pki.sealing import Sealer
from ktizo.services import audit, state
from ktizo.services.context import Actor
from ktizo.services.render import ConfigSource
from ktizo.talos import (
    TalosVersion,
    apply_patches,
    check_patch_result,
    dump_documents,
    load_documents,
    load_patch,
    machine_type,
    parse_talos_version,
    validate_documents,
)

if TYPE_CHECKING:  # generation needs cryptography: it loads with the first generation, not with every CLI command
    from ktizo.talos import ClusterInput, SecretsBundle

# Stand-ins for settings not given yet, so one field can be checked with generate's own rules.
# What validation fills in for settings not given yet (only the given ones are checked).
_PLACEHOLDER = {"cluster_name": "placeholder", "endpoint": "https://placeholder:6443", "kubernetes_version": "1.0.0"}
_PLACEHOLDER_VERSION = TalosVersion(1, 13)


@dataclass
class SettingsView:
    cluster_name: str | None
    endpoint: str | None
    talos_version: str
    kubernetes_version: str | None
    install_disk: str | None
    install_image: str | None
    pod_subnets: list[str]
    service_subnets: list[str]
    dns_domain: str
    cert_sans: list[str]
    gateway: str | None
    nameservers: list[str]
    revision: int
    updated_at: dt.datetime | None
    updated_by: str | None
    secrets_present: bool
    secrets_sealed: bool
    bases: dict[str, dict[str, Any]]


SETTABLE = (
    "cluster_name",
    "endpoint",
    "talos_version",
    "kubernetes_version",
    "install_disk",
    "install_image",
    "pod_subnets",
    "service_subnets",
    "dns_domain",
    "cert_sans",
    "gateway",
    "nameservers",
)


def _accepts(role: Role, kind: str | None) -> bool:
    # Talos's "init" type is a control plane node that bootstraps; it is a valid controlplane base.
    return kind == role.value or (role is Role.CONTROLPLANE and kind == "init")


class ClusterService:
    def __init__(
        self, db: Database, sealer: Sealer, source: ConfigSource, base_dir: Path, default_talos_version: TalosVersion
    ) -> None:
        self.db = db
        self.sealer = sealer
        self.source = source
        self.base_dir = base_dir
        self.default_talos_version = default_talos_version

    # -- settings --------------------------------------------------------------------------------------

    @staticmethod
    def _settings_row(s: Session) -> ClusterSettings:
        row = s.get(ClusterSettings, 1)
        if row is None:
            row = ClusterSettings(id=1)
            s.add(row)
            s.flush()
        return row

    @staticmethod
    def _unsaved_settings() -> ClusterSettings:
        """What the settings are before anything was set: the row's column defaults, revision 0."""
        return ClusterSettings(
            id=1,
            install_disk="/dev/sda",
            pod_subnets=["10.244.0.0/16"],
            service_subnets=["10.96.0.0/12"],
            dns_domain="cluster.local",
            cert_sans=[],
            nameservers=[],
            revision=0,
        )

    def settings(self) -> SettingsView:
        with self.db.read() as s:
            row = s.get(ClusterSettings, 1) or self._unsaved_settings()
            secrets = s.get(ClusterSecrets, 1)
        return SettingsView(
            cluster_name=row.cluster_name,
            endpoint=row.endpoint,
            talos_version=row.talos_version or str(self.default_talos_version),
            kubernetes_version=row.kubernetes_version,
            install_disk=row.install_disk,
            install_image=row.install_image,
            pod_subnets=list(row.pod_subnets),
            service_subnets=list(row.service_subnets),
            dns_domain=row.dns_domain,
            cert_sans=list(row.cert_sans),
            gateway=row.gateway,
            nameservers=list(row.nameservers),
            revision=row.revision,
            updated_at=row.updated_at,
            updated_by=row.updated_by,
            secrets_present=secrets is not None,
            secrets_sealed=secrets is not None and not secrets.bundle.startswith("plain:"),
            bases=self.base_status(),
        )

    def update(self, actor: Actor, changes: dict[str, Any]) -> SettingsView:
        """Change cluster settings; each is checked with the rules ``generate`` applies. Nothing is half-set."""
        actor.require(UserRole.ADMIN)
        unknown = set(changes) - set(SETTABLE)
        if unknown:
            raise ValidationFailed(f"unknown setting(s): {', '.join(sorted(unknown))}", sorted(unknown)[0])
        with self.db.write() as s:
            stored = s.get(ClusterSettings, 1) or self._unsaved_settings()
            merged = {name: getattr(stored, name) for name in SETTABLE} | changes
            normalised = self._check(merged, set(changes))
            # Compared after normalising ("HTTPS://Lab.Example/" is the stored "https://lab.example:6443"): a write
            # that changes nothing is not audited and does not move the revision, which re-renders every config.
            changed = {k: {"from": getattr(stored, k), "to": normalised[k]} for k in changes}
            changed = {k: v for k, v in changed.items() if v["from"] != v["to"]}
            if changed:
                row = self._settings_row(s)
                for key in changed:
                    setattr(row, key, normalised[key])
                row.revision += 1
                row.updated_at = utcnow()
                row.updated_by = actor.name
                state.bump(s)
                audit.record(s, actor, "cluster_update", None, changed)
        return self.settings()

    def _check(self, merged: dict[str, Any], given: set[str]) -> dict[str, Any]:
        from ktizo.talos import ClusterInput, validate_cluster_input

        for name in (
            "install_disk",
            "install_image",
            "gateway",
            "cluster_name",
            "endpoint",
            "kubernetes_version",
            "talos_version",
        ):
            if merged.get(name) == "":
                merged[name] = None  # an empty string clears an optional setting, as null does
        for name in ("cert_sans", "nameservers"):
            if merged.get(name) is None:
                merged[name] = []
        for name in ("dns_domain", "pod_subnets", "service_subnets"):
            if name in given and not merged.get(name):
                raise ValidationFailed("cannot be empty: the cluster needs one", name)
        out = dict(merged)
        if merged.get("talos_version"):
            out["talos_version"] = str(parse_talos_version(merged["talos_version"]))
        probe = ClusterInput(
            cluster_name=merged.get("cluster_name") or _PLACEHOLDER["cluster_name"],
            endpoint=merged.get("endpoint") or _PLACEHOLDER["endpoint"],
            kubernetes_version=merged.get("kubernetes_version") or _PLACEHOLDER["kubernetes_version"],
            talos_version=_PLACEHOLDER_VERSION,
            install_disk=merged.get("install_disk") or None,
            install_image=merged.get("install_image") or None,
            pod_subnets=tuple(merged.get("pod_subnets") or ()),
            service_subnets=tuple(merged.get("service_subnets") or ()),
            dns_domain=merged.get("dns_domain") or "cluster.local",
            cert_sans=tuple(merged.get("cert_sans") or ()),
        )
        checked = validate_cluster_input(probe)
        for name in ("endpoint", "kubernetes_version", "cert_sans", "pod_subnets", "service_subnets"):
            if name in given and merged.get(name) is not None:
                value = getattr(checked, name)
                out[name] = list(value) if isinstance(value, tuple) else value
        if merged.get("gateway"):
            out["gateway"] = normalize_ip(merged["gateway"], "gateway")
        out["nameservers"] = [normalize_ip(n, "nameservers") for n in merged.get("nameservers") or ()]
        return out

    def _cluster_input(self, view: SettingsView) -> ClusterInput:
        from ktizo.talos import ClusterInput

        name, endpoint, kubernetes = view.cluster_name, view.endpoint, view.kubernetes_version
        if not (name and endpoint and kubernetes):
            missing = [n for n in ("cluster_name", "endpoint", "kubernetes_version") if not getattr(view, n)]
            raise FailedPrecondition(
                f"set {', '.join(missing)} first: `ktizo cluster set --name N --endpoint https://HOST:6443 "
                "--kubernetes-version 1.33.0` or PUT /api/v1/cluster"
            )
        return ClusterInput(
            cluster_name=name,
            endpoint=endpoint,
            kubernetes_version=kubernetes,
            talos_version=parse_talos_version(view.talos_version),
            install_disk=view.install_disk,
            install_image=view.install_image,
            pod_subnets=tuple(view.pod_subnets),
            service_subnets=tuple(view.service_subnets),
            dns_domain=view.dns_domain,
            cert_sans=tuple(view.cert_sans),
        )

    # -- secrets ---------------------------------------------------------------------------------------

    def _bundle(self, s: Session) -> SecretsBundle | None:
        from ktizo.talos import load_secrets

        row = s.get(ClusterSecrets, 1)
        return load_secrets(self.sealer.open(row.bundle)) if row is not None else None

    def generate(self, actor: Actor, *, rotate_secrets: bool = False) -> dict[str, int]:
        """Render controlplane and worker base configs from the settings and the stored secrets bundle
        (made on first use). A new bundle is a new cluster identity: it needs ``rotate_secrets``."""
        from ktizo.talos import generate_configs, generate_secrets

        actor.require(UserRole.ADMIN)
        inp = self._cluster_input(self.settings())
        with self.db.write() as s:
            bundle = self._bundle(s)
            created = bundle is None or rotate_secrets
            if bundle is None or rotate_secrets:
                bundle = generate_secrets()
                self._store_bundle(s, bundle, "generated")
            configs = generate_configs(inp, bundle)
            sizes = {}
            for role in Role:
                docs = configs[role.value]
                validate_documents(docs)
                self._check_patches(s, role, docs)
                sizes[role.value] = self._store_base(s, actor, role, dump_documents(docs).encode(), "generated")
            state.bump(s)
            audit.record(
                s,
                actor,
                "cluster_generate",
                None,
                {
                    "secrets": "rotated" if rotate_secrets else ("created" if created else "kept"),
                    "talos_version": str(inp.talos_version),
                    "kubernetes_version": inp.kubernetes_version,
                },
            )
        self._mirror_files()
        return sizes

    def _store_bundle(self, s: Session, bundle: SecretsBundle, source: str) -> None:
        from ktizo.talos import dump_secrets

        row = s.get(ClusterSecrets, 1)
        sealed = self.sealer.seal(dump_secrets(bundle))
        if row is None:
            s.add(ClusterSecrets(id=1, bundle=sealed, source=source))
        else:
            row.bundle, row.source, row.created_at = sealed, source, utcnow()

    def import_secrets(self, actor: Actor, data: bytes | str, *, replace: bool = False) -> None:
        """Adopt an existing cluster: a ``talosctl gen secrets`` bundle. Replacing a bundle needs ``replace``."""
        from ktizo.talos import load_secrets

        actor.require(UserRole.ADMIN)
        bundle = load_secrets(data)
        with self.db.write() as s:
            if s.get(ClusterSecrets, 1) is not None and not replace:
                raise Conflict(
                    "a secrets bundle is already stored; replacing it changes the cluster's identity: "
                    "pass --rotate-secrets (API: ?replace=true) if that is what you mean"
                )
            self._store_bundle(s, bundle, "imported")
            state.bump(s)
            audit.record(s, actor, "secrets_import", None, {"replaced": replace})

    def export_secrets(self, actor: Actor) -> str:
        from ktizo.talos import dump_secrets

        actor.require(UserRole.ADMIN)
        with self.db.write() as s:
            bundle = self._bundle(s)
            if bundle is None:
                raise FailedPrecondition("no secrets bundle yet: run `ktizo cluster generate` or import one")
            audit.record(s, actor, "secrets_export", None, {})
        return dump_secrets(bundle)

    def talosconfig(self, actor: Actor) -> str:
        """A talosconfig with a fresh admin certificate and the approved control planes' IPs as endpoints."""
        from ktizo.talos import make_talosconfig

        actor.require(UserRole.ADMIN)
        view = self.settings()
        with self.db.write() as s:
            bundle = self._bundle(s)
            if bundle is None:
                raise FailedPrecondition("no secrets bundle yet: run `ktizo cluster generate` or import one")
            rows = (
                s.execute(
                    select(Device.ip_address)
                    .where(
                        Device.role == Role.CONTROLPLANE.value,
                        Device.status == DeviceStatus.APPROVED.value,
                        Device.ip_address.is_not(None),
                    )
                    .order_by(Device.id)
                )
                .scalars()
                .all()
            )
            endpoints = [ip.split("/")[0] for ip in rows if ip]
            audit.record(s, actor, "talosconfig", None, {"endpoints": endpoints})
        return make_talosconfig(bundle, view.cluster_name or "ktizo", endpoints)

    # -- base configs ----------------------------------------------------------------------------------

    @staticmethod
    def check_base(role: Role, data: bytes) -> list[dict[str, Any]]:
        """Validate a candidate base config the way Talos will read it; raise ``ValidationFailed`` if it is not."""
        documents = load_documents(data)
        validate_documents(documents)
        try:
            # The fields every machine config needs, checked here as they are for a patched config: otherwise a
            # base without them is taken while no group exists, and refused later in a group patch's name.
            check_patch_result(documents)
        except ValidationFailed as exc:
            if exc.field and "is missing from the patched config" in exc.message:
                raise ValidationFailed(
                    f"the base config has no {exc.field}: every Talos machine config needs it (a config made by "
                    "`talosctl gen config` or `ktizo cluster generate` has it)",
                    exc.field,
                ) from None
            raise
        kind = machine_type(documents)
        if not _accepts(role, kind):
            raise ValidationFailed(
                f"this is a {kind or 'typeless'} config (machine.type), not a {role.value} one", "machine.type"
            )
        return documents

    def _check_patches(self, s: Session, role: Role, documents: list[dict[str, Any]]) -> None:
        """A new base must not break a patch that was valid on the old one: refuse it, naming the patch."""
        snap = self.source.snapshot()
        for group in snap.groups:
            if group.patch is None:
                continue
            try:
                check_patch_result(apply_patches(documents, [group.patch]))
            except ValidationFailed as exc:
                raise ValidationFailed(
                    f"the new {role.value} base breaks group {group.name}'s patch: {exc.message}; change the "
                    "patch first",
                    "patch",
                ) from None
        rows = s.execute(
            select(Device.id, Device.patch).where(Device.role == role.value, Device.patch.is_not(None))
        ).all()
        for device_id, text in rows:
            try:
                check_patch_result(apply_patches(documents, [load_patch(text or "")]))
            except ValidationFailed as exc:
                raise ValidationFailed(
                    f"the new {role.value} base breaks device {device_id}'s patch: {exc.message}", "patch"
                ) from None

    def _store_base(self, s: Session, actor: Actor, role: Role, data: bytes, source: str) -> int:
        row = s.get(BaseConfigRow, role.value)
        sealed = self.sealer.seal(data.decode())
        digest = hashlib.sha256(data).hexdigest()
        if row is None:
            s.add(
                BaseConfigRow(
                    role=role.value, content=sealed, sha256=digest, source=source, revision=1, updated_by=actor.name
                )
            )
        else:
            row.content, row.sha256, row.source = sealed, digest, source
            row.revision += 1
            row.updated_at, row.updated_by = utcnow(), actor.name
        return len(data)

    def put_base(self, actor: Actor, role: Role, data: bytes) -> None:
        actor.require(UserRole.ADMIN)
        documents = self.check_base(role, data)
        with self.db.write() as s:
            self._check_patches(s, role, documents)
            self._store_base(s, actor, role, data, "uploaded")
            state.bump(s)
            audit.record(s, actor, "base_config_upload", None, {"role": role.value, "bytes": len(data)})
        self._mirror_files()

    def get_base(self, role: Role) -> bytes:
        """The base config as it was stored (comments and all), or the seed-style file if that is all there is."""
        with self.db.read() as s:
            row = s.get(BaseConfigRow, role.value)
        if row is not None:
            return self.sealer.open(row.content).encode()
        try:
            self.source.base(self.source.snapshot(), role)
        except NotReady as exc:  # for an operator this is a missing step, not an outage
            raise FailedPrecondition(exc.message) from None
        return (self.base_dir / f"{role.value}.yaml").read_bytes()

    def base_status(self) -> dict[str, dict[str, Any]]:
        with self.db.read() as s:
            rows = {r.role: r for r in s.scalars(select(BaseConfigRow))}
        out: dict[str, dict[str, Any]] = {}
        for role in Role:
            row = rows.get(role.value)
            path = self.base_dir / f"{role.value}.yaml"
            if row is not None:
                out[role.value] = {
                    "present": True,
                    "source": row.source,
                    "sha256": row.sha256,
                    "updated_at": row.updated_at,
                    "path": str(path),
                }
            else:
                present = path.exists()
                out[role.value] = {
                    "present": present,
                    "source": "file" if present else None,
                    "sha256": None,
                    "updated_at": None,
                    "path": str(path),
                }
        return out

    def _mirror_files(self) -> None:
        """Write the base configs to templates/base/ as the seed lays them out, unless secrets are sealed:
        then nothing secret touches the disk in plaintext (export with `ktizo cluster base export`)."""
        if self.sealer.enabled:
            self._remove_plaintext_mirrors()
            return
        with self.db.read() as s:
            rows = list(s.scalars(select(BaseConfigRow)))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for row in rows:
            _atomic_write(self.base_dir / f"{row.role}.yaml", self.sealer.open(row.content).encode())

    # -- key rotation ----------------------------------------------------------------------------------

    def reseal(self, actor: Actor, *, unseal: bool = False) -> int:
        """Re-seal every stored secret with the first configured key (after adding a new key in front), or with
        ``unseal`` store them in plaintext again (opened with the configured keys)."""
        actor.require(UserRole.ADMIN)
        sealer = self.sealer.unsealing() if unseal else self.sealer
        count = 0
        with self.db.write() as s:
            for row in s.scalars(select(ClusterSecrets)):
                if sealer.needs_reseal(row.bundle):
                    row.bundle = sealer.seal(self.sealer.open(row.bundle))
                    count += 1
            for base in s.scalars(select(BaseConfigRow)):
                if sealer.needs_reseal(base.content):
                    base.content = sealer.seal(self.sealer.open(base.content))
                    count += 1
            ca = s.get(Authority, 1, with_for_update=True)  # the agent CA's key
            if ca is not None and sealer.needs_reseal(ca.key):
                ca.key = sealer.seal(self.sealer.open(ca.key))
                count += 1
            for hook in s.scalars(select(Webhook).with_for_update()):  # webhook signing secrets
                if sealer.needs_reseal(hook.secret_sealed):
                    hook.secret_sealed = sealer.seal(self.sealer.open(hook.secret_sealed))
                    count += 1
            audit.record(s, actor, "secrets_reseal", None, {"values": count, "sealed": sealer.enabled})
        if sealer.enabled:
            self._remove_plaintext_mirrors()
        return count

    def _remove_plaintext_mirrors(self) -> list[Path]:
        """Once secrets are sealed, the plaintext copies written to templates/base/ while they were not must go."""
        removed = []
        with self.db.read() as s:
            digests = {row.role: row.sha256 for row in s.scalars(select(BaseConfigRow))}
        for role, digest in digests.items():
            path = self.base_dir / f"{role}.yaml"
            if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == digest:
                path.unlink()
                removed.append(path)
        return removed


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # a controlplane config holds the cluster's CA keys
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
