"""The upgrade an operator runs: the database of an older release, with its machines, users, tokens, cluster
configuration and audit log, is upgraded by ``ktizo db upgrade`` (the real CLI, in its own process) to this release's
schema. Every machine is still there as the operator left it, the audit log still holds and still guards its rows,
the old API token still works, and the upgraded server decides and serves configs as before.

The old databases are made by Alembic itself at the old revision, and filled with the rows that release wrote,
in raw SQL over that revision's tables. Each test runs on the suite's database: a SQLite file, or a fresh PostgreSQL
database (created and dropped here) when KTIZO_TEST_DATABASE_URL is set."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from alembic import command
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from ktizo.app import build_services, create_app
from ktizo.db import Database
from ktizo.db.migrate import alembic_config, current_revision, head_revision
from ktizo.domain.clock import use as use_clock
from ktizo.domain.devices import Role
from ktizo.domain.users import UserRole
from ktizo.services.audit import patch_summary
from ktizo.services.context import Actor
from ktizo.services.queries import AuditQuery, DeviceChanges, DeviceQuery
from ktizo.services.registry import Services
from ktizo.settings import Settings
from ktizo.talos import load_documents, validate_documents
from tests.clock import ManualClock
from tests.support import TALOS_FIXTURES, TALOS_HEADERS, bearer, talos_url

PG_URL = os.environ.get("KTIZO_TEST_DATABASE_URL", "")
T0 = dt.datetime(2026, 11, 20, 9, 0, tzinfo=dt.UTC)  # when the operator set the old release up
PASSWORD = "correct horse battery staple"  # the old admin's
OPS_TOKEN = "ktz_" + "o" * 43  # an operator's API token the old release issued
ROOT_TOKEN = "ktz_" + "r" * 43

NVME_PATCH = """\
machine:
  install:
    disk: /dev/nvme0n1
  kubelet:
    extraArgs:
      max-pods: "250"
"""
SYSCTL_PATCH = """\
machine:
  sysctls:
    vm.max_map_count: "262144"
"""


def _at(minutes: int) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


@pytest.fixture
def empty_url(tmp_path: Path) -> Iterator[str]:
    """Where the old release kept its data: a new SQLite file, or a new PostgreSQL database (dropped after)."""
    if not PG_URL:
        yield f"sqlite:///{tmp_path / 'ktizo.db'}"
        return
    name = f"ktizo_upgrade_{uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _old_release(url: str, revision: str) -> Database:
    """A database as the release at ``revision`` left it: migrated by Alembic that far, and no further."""
    db = Database(url)
    command.upgrade(alembic_config(db), revision)
    assert current_revision(db) == revision
    return db


def _insert(conn: Connection, table: str, returning: str | None = "id", **row: Any) -> Any:
    """One row as the old release stored it: JSON as text, times as its UTCDateTime columns keep them."""
    sqlite = conn.dialect.name == "sqlite"

    def stored(value: Any) -> Any:
        if isinstance(value, dict | list):
            return json.dumps(value)
        if isinstance(value, dt.datetime):
            utc = value.astimezone(dt.UTC)
            return utc.strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite else utc.isoformat()
        return value

    columns = ", ".join(row)
    values = ", ".join(f":{name}" for name in row)
    sql = f"INSERT INTO {table} ({columns}) VALUES ({values})"  # noqa: S608 - the test's own names, values bound
    sql += f" RETURNING {returning}" if returning else ""
    result = conn.execute(text(sql), {name: stored(value) for name, value in row.items()})
    return result.scalar_one() if returning else None


def _ktizo(url: str, data_dir: Path, *args: str) -> str:
    """The real CLI, in its own process, as the operator runs it on the server; its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KTIZO_")}
    env["KTIZO_DATA_DIR"] = str(data_dir)
    result = subprocess.run(
        [sys.executable, "-m", "ktizo", "--database-url", url, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=data_dir.parent,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _upgrade(url: str, data_dir: Path, before: str) -> None:
    """``ktizo db upgrade`` says it upgraded from ``before`` to this release's head."""
    out = _ktizo(url, data_dir, "db", "upgrade")
    assert "upgraded the database at " in out, out
    assert f" from schema {before} to {head_revision()}" in out, out


def _upgrade_again(url: str, data_dir: Path) -> None:
    out = _ktizo(url, data_dir, "db", "upgrade")
    assert f"is up to date (schema {head_revision()})" in out, out


@pytest.fixture
def server(tmp_path: Path, empty_url: str) -> Iterator[tuple[Settings, Path]]:
    """The settings of this release's server over the database, and its data directory; Ktizo's clock stands
    still for it (the CLI, in its own process, runs on the real one)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    settings = Settings(data_dir=data_dir, database_url=empty_url, last_seen_interval=0, long_poll_seconds=0)
    # The server comes back two hours after the operator's last change: nothing pending has expired yet.
    with use_clock(ManualClock(_at(120))):
        yield settings, data_dir


@contextmanager
def _serving(settings: Settings) -> Iterator[tuple[TestClient, Services]]:
    """This release's server over the upgraded database (the app with its lifespan, as ``ktizo serve`` runs it)."""
    services = build_services(settings)
    try:
        with TestClient(create_app(settings, services), client=("10.0.0.9", 40000)) as client:
            yield client, services
    finally:
        services.db.dispose()


def _devices(client: TestClient, token: str) -> dict[str, dict[str, Any]]:
    r = client.get("/api/v1/devices", headers=bearer(token))
    assert r.status_code == 200, r.text
    return {d["mac_address"] or d["machine_id"]: d for d in r.json()}


def _config(client: TestClient, mac: str, uuid: str | None = None, serial: str | None = None) -> dict[Any, Any]:
    """What Talos gets at boot: the config documents by (kind, name) (the v1alpha1 document under "v1alpha1")."""
    query = {"mac": mac, **({"uuid": uuid} if uuid else {}), **({"serial": serial} if serial else {})}
    r = client.get(talos_url(**query), headers=TALOS_HEADERS)
    assert r.status_code == 200, r.text
    docs = load_documents(r.content)
    validate_documents(docs)
    return {(d["kind"], d.get("name")) if "kind" in d else "v1alpha1": d for d in docs}


def _refused(client: TestClient, mac: str, **query: str) -> str:
    r = client.get(talos_url(mac=mac, **query), headers=TALOS_HEADERS)
    assert r.status_code == 403, r.text
    return str(r.text).strip()


def _audit(services: Services) -> list[tuple[Any, ...]]:
    rows, _ = services.audit.list(AuditQuery(limit=10_000))
    return sorted(
        (
            e.at,
            e.actor,
            e.actor_type,
            e.action,
            e.device_id,
            e.device_mac,
            e.source_ip,
            json.dumps(e.details, sort_keys=True),
        )
        for e in rows
    )


def _seen(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def _install_bases(settings: Settings) -> None:
    """The base configs as the first releases read them: files under the data directory's templates/base/."""
    settings.base_templates_dir.mkdir(parents=True, exist_ok=True)
    for role in ("controlplane", "worker"):
        (settings.base_templates_dir / f"{role}.yaml").write_bytes((TALOS_FIXTURES / f"{role}.yaml").read_bytes())


# -- from the first release (0001): machines, users, tokens, the audit log ------------------------------

CP = "52:54:00:0a:00:01"
WORKER = "52:54:00:0a:00:02"
PENDING = "52:54:00:0a:00:03"
REJECTED = "52:54:00:0a:00:04"
GONE = "52:54:00:0a:00:05"
UUIDS = {mac: f"4c4c4544-0042-3510-8051-b4c04f4e30{n:02d}" for n, mac in enumerate((CP, WORKER, PENDING), 1)}


def _fill_0001(conn: Connection) -> dict[str, Any]:
    """What an operator of the first release had: an admin and an operator (with an API token), two approved
    machines, one pending, one rejected, one deleted, and the audit rows of all that."""
    hasher = PasswordHasher(time_cost=1, memory_cost=8 * 1024)  # cheap; the hash carries its parameters
    _insert(conn, "users", username="root", password_hash=hasher.hash(PASSWORD), role="admin", created_at=_at(0))
    ops = _insert(conn, "users", username="ops", password_hash=None, role="operator", created_at=_at(1))
    _insert(
        conn,
        "api_tokens",
        user_id=ops,
        name="automation",
        token_hash=hashlib.sha256(OPS_TOKEN.encode()).hexdigest(),
        prefix=OPS_TOKEN[:10],
        created_at=_at(2),
        last_used_at=_at(50),
    )
    common: dict[str, Any] = {"facts": {"vendor": "QEMU", "cpus": 4}, "revision": 2}
    ids = {
        CP: _insert(
            conn,
            "devices",
            mac_address=CP,
            uuid=UUIDS[CP],
            serial="SN-CP-01",
            hostname="CP-01",  # typed so; this release keeps hostnames lower-cased (0005)
            ip_address="10.0.5.10/24",
            role="controlplane",
            status="approved",
            notes="rack 1, top shelf",
            source="manual",
            first_seen=_at(10),
            last_seen=_at(40),
            last_ip="10.0.5.10",
            approved_at=_at(11),
            approved_by="root",
            last_config_download=_at(40),
            **common,
        ),
        WORKER: _insert(
            conn,
            "devices",
            mac_address=WORKER,
            uuid=UUIDS[WORKER],
            hostname="worker-01",
            ip_address="10.0.5.11/24",
            role="worker",
            status="approved",
            source="config_fetch",
            first_seen=_at(12),
            last_ip="10.0.5.200",
            approved_at=_at(13),
            approved_by="ops",
            **common,
        ),
        PENDING: _insert(
            conn,
            "devices",
            mac_address=PENDING,
            uuid=UUIDS[PENDING],
            serial="SN-0003",
            source="config_fetch",  # role and status: the columns' defaults, as the old release left them
            first_seen=_at(20),
            last_seen=_at(21),
            last_ip="10.0.5.201",
            facts={},
        ),
        REJECTED: _insert(
            conn,
            "devices",
            mac_address=REJECTED,
            role="worker",
            status="rejected",
            notes="not ours: unknown vendor",
            source="register",
            first_seen=_at(30),
            last_ip="10.0.9.9",
            rejected_at=_at(31),
            rejected_by="ops",
            facts={},
        ),
        GONE: _insert(conn, "devices", mac_address=GONE, source="register", first_seen=_at(32), facts={}),
    }
    conn.execute(text("DELETE FROM devices WHERE id = :id"), {"id": ids[GONE]})
    audit = [
        (_at(1), "root", "user", "user_create", None, None, "10.0.0.2", {"username": "ops", "role": "operator"}),
        (_at(2), "root", "user", "token_create", None, None, "10.0.0.2", {"username": "ops", "name": "automation"}),
        (_at(10), "root", "user", "create", ids[CP], CP, "10.0.0.2", {"hostname": "CP-01", "role": "controlplane"}),
        (_at(11), "root", "user", "approve", ids[CP], CP, "10.0.0.2", {"from": "pending"}),
        (_at(12), "device", "device", "register", ids[WORKER], WORKER, "10.0.5.200", {"source": "config_fetch"}),
        (_at(13), "ops", "user", "approve", ids[WORKER], WORKER, "10.0.0.3", {"from": "pending"}),
        (_at(20), "device", "device", "register", ids[PENDING], PENDING, "10.0.5.201", {"source": "config_fetch"}),
        (_at(31), "ops", "user", "reject", ids[REJECTED], REJECTED, "10.0.0.3", {"from": "pending"}),
        (_at(33), "root", "user", "delete", ids[GONE], GONE, "10.0.0.2", {"status": "pending"}),
        (_at(40), "device", "device", "config_download", ids[CP], CP, "10.0.5.10", {"role": "controlplane"}),
    ]
    for at, actor, actor_type, action, device_id, mac, source_ip, details in audit:
        _insert(
            conn,
            "audit_events",
            at=at,
            actor=actor,
            actor_type=actor_type,
            action=action,
            device_id=device_id,
            device_mac=mac,
            source_ip=source_ip,
            details=details,
        )
    return {"ids": ids, "audit": sorted((*row[:7], json.dumps(row[7], sort_keys=True)) for row in audit)}


def test_a_first_release_database_keeps_every_machine_user_token_and_audit_row(
    server: tuple[Settings, Path], empty_url: str
) -> None:
    """An operator who ran the first release upgrades: every machine is listed as they left it, their token and
    password still work, the audit log is the same (and still append-only), approved machines still boot, and
    approving the pending one works, with the old machines' names and addresses still taken."""
    settings, data_dir = server
    old = _old_release(empty_url, "0001")
    with old.write_engine.begin() as conn:
        made = _fill_0001(conn)
    old.dispose()
    ids = made["ids"]

    _upgrade(empty_url, data_dir, "0001")

    _install_bases(settings)
    with _serving(settings) as (client, services):
        assert current_revision(services.db) == head_revision()
        # The audit log: the same rows, none added, none lost; the database still refuses to change them.
        assert _audit(services) == made["audit"]
        for statement in ("UPDATE audit_events SET actor = 'mallory'", "DELETE FROM audit_events"):
            with pytest.raises(DBAPIError, match="append-only"), services.db.write_engine.begin() as conn:
                conn.execute(text(statement))
        assert _audit(services) == made["audit"]

        devices = _devices(client, OPS_TOKEN)  # the automation's old token still reads the registry
        assert set(devices) == {CP, WORKER, PENDING, REJECTED}  # the deleted machine stays deleted
        fields = ("id", "kind", "uuid", "serial", "hostname", "ip_address", "role", "status", "notes", "source")
        shown = {mac: tuple(d[f] for f in fields) for mac, d in devices.items()}
        assert shown == {
            CP: (ids[CP], "talos", UUIDS[CP], "SN-CP-01", "cp-01", "10.0.5.10/24", "controlplane", "approved",
                 "rack 1, top shelf", "manual"),
            WORKER: (ids[WORKER], "talos", UUIDS[WORKER], None, "worker-01", "10.0.5.11/24", "worker", "approved",
                     "", "config_fetch"),
            PENDING: (ids[PENDING], "talos", UUIDS[PENDING], "SN-0003", None, None, "worker", "pending", "",
                      "config_fetch"),
            REJECTED: (ids[REJECTED], "talos", None, None, None, None, "worker", "rejected",
                       "not ours: unknown vendor", "register"),
        }  # fmt: skip
        cp = devices[CP]
        assert (cp["facts"], cp["revision"], cp["approved_by"], cp["last_ip"]) == (
            {"vendor": "QEMU", "cpus": 4},
            2,
            "root",
            "10.0.5.10",
        )
        assert [_seen(cp[k]) for k in ("first_seen", "approved_at", "last_seen", "last_config_download")] == [
            _at(10),
            _at(11),
            _at(40),
            _at(40),
        ]
        assert (devices[REJECTED]["rejected_by"], _seen(devices[REJECTED]["rejected_at"])) == ("ops", _at(31))
        assert services.users.authenticate("root", PASSWORD, "10.0.0.2").role is UserRole.ADMIN

        # The approved machines boot with their configs; the others are still told why not.
        docs = _config(client, CP, UUIDS[CP], "SN-CP-01")
        assert docs["v1alpha1"]["machine"]["type"] == "controlplane"
        assert docs[("HostnameConfig", None)]["hostname"] == "cp-01"
        assert docs[("LinkConfig", "ktizo0")]["addresses"] == [{"address": "10.0.5.10/24"}]
        docs = _config(client, WORKER, UUIDS[WORKER])
        assert docs["v1alpha1"]["machine"]["type"] == "worker"
        assert docs[("HostnameConfig", None)]["hostname"] == "worker-01"
        assert _refused(client, PENDING, uuid=UUIDS[PENDING]) == "Device not approved. Current status: pending"
        assert _refused(client, REJECTED) == "Device not approved. Current status: rejected"

        # The old machines' hostname (in any case) and static address are still theirs alone.
        approve = f"/api/v1/devices/{ids[PENDING]}/approve"
        for taken in ({"hostname": "CP-01"}, {"hostname": "worker-02", "ip_address": "10.0.5.11/16"}):
            r = client.post(approve, json={"role": "worker", **taken}, headers=bearer(OPS_TOKEN))
            assert r.status_code == 409, r.text
        r = client.post(
            approve,
            json={"hostname": "worker-02", "ip_address": "10.0.5.12/24", "role": "worker"},
            headers=bearer(OPS_TOKEN),
        )
        assert r.status_code == 200, r.text
        docs = _config(client, PENDING, UUIDS[PENDING], "SN-0003")
        assert docs[("HostnameConfig", None)]["hostname"] == "worker-02"

    _upgrade_again(empty_url, data_dir)


# -- from 0005: cluster settings, base configs in the database, groups and patches ------------------------

W21 = "52:54:00:0b:00:21"
CP11 = "52:54:00:0b:00:11"
LATE = "52:54:00:0b:00:31"


def _fill_0005(conn: Connection) -> None:
    """A cluster configured through the release at 0005: its settings, both base configs uploaded (stored in
    plaintext: no secret key), a group by label with a patch, machines with labels, patches and install state,
    and the admin's API token for CI."""
    root = _insert(conn, "users", username="root", role="admin", created_at=_at(0))
    _insert(
        conn,
        "api_tokens",
        user_id=root,
        name="ci",
        token_hash=hashlib.sha256(ROOT_TOKEN.encode()).hexdigest(),
        prefix=ROOT_TOKEN[:10],
        created_at=_at(1),
    )
    _insert(
        conn,
        "cluster_settings",
        id=1,
        cluster_name="lab",
        endpoint="https://10.0.5.10:6443",
        talos_version="v1.13",
        kubernetes_version="1.34.1",
        install_disk="/dev/sda",
        pod_subnets=["10.244.0.0/16"],
        service_subnets=["10.96.0.0/12"],
        dns_domain="cluster.local",
        cert_sans=["k8s.lab.example"],
        gateway="10.0.5.1",
        nameservers=["10.0.5.53"],
        revision=4,
        updated_at=_at(5),
        updated_by="root",
    )
    for role in ("controlplane", "worker"):
        content = (TALOS_FIXTURES / f"{role}.yaml").read_text()
        _insert(
            conn,
            "base_configs",
            returning=None,
            role=role,
            content="plain:" + content,
            sha256=hashlib.sha256(content.encode()).hexdigest(),
            source="uploaded",
            revision=2,
            updated_at=_at(6),
            updated_by="root",
        )
    conn.execute(text("UPDATE config_state SET revision = 9"))
    _insert(
        conn,
        "device_groups",
        name="rack-5",
        priority=50,
        selector={"rack": "5"},
        patch=NVME_PATCH,
        nameservers=[],
        description="the NVMe rack",
        revision=3,
        created_at=_at(7),
        updated_at=_at(8),
    )
    w21 = _insert(
        conn,
        "devices",
        kind="talos",
        mac_address=W21,
        hostname="w-21",
        ip_address="10.0.5.21/24",
        static_ip="10.0.5.21",
        role="worker",
        status="approved",
        notes="GPU box",
        source="ipxe",
        facts={},
        first_seen=_at(20),
        first_ip="10.0.5.21",
        last_ip="10.0.5.21",
        approved_at=_at(21),
        approved_by="root",
        labels={"rack": "5", "gpu": "a100"},
        patch=SYSCTL_PATCH,
        extra_nics=[{"mac": "52:54:00:0b:01:21", "addresses": ["192.168.20.21/24"]}],
        lease_ip="10.0.5.21",
        installed_at=_at(25),
        revision=5,
    )
    _insert(
        conn,
        "devices",
        mac_address=CP11,
        hostname="cp-11",
        role="controlplane",
        status="approved",
        source="manual",
        facts={},
        first_seen=_at(22),
        approved_at=_at(23),
        approved_by="root",
        install_disk="/dev/vda",
    )
    _insert(
        conn,
        "devices",
        mac_address=LATE,
        role="worker",
        source="dhcp",
        facts={"vendor_class": "PXEClient"},
        first_seen=_at(30),
        first_ip="10.0.5.150",
        last_ip="10.0.5.150",
        lease_ip="10.0.5.150",
    )
    # Written before 0005 (this database was upgraded once already): the patch text itself, which is kept.
    _insert(
        conn,
        "audit_events",
        at=_at(21),
        actor="root",
        actor_type="user",
        action="update",
        device_id=w21,
        device_mac=W21,
        source_ip="10.0.0.2",
        details={"patch": SYSCTL_PATCH},
    )


def test_a_0005_database_keeps_its_cluster_configuration_groups_and_patches(
    server: tuple[Settings, Path], empty_url: str
) -> None:
    """An operator on the release at 0005 (before Linux agents) upgrades: the cluster settings, the uploaded base
    configs, the group and every machine's labels, patches, NICs and install state are as they were, and a
    labelled machine's config still carries the group's patch, its own patch and the cluster's network."""
    settings, data_dir = server
    old = _old_release(empty_url, "0005")
    with old.write_engine.begin() as conn:
        _fill_0005(conn)
        old_audit = conn.execute(text("SELECT id, details FROM audit_events")).all()
    old.dispose()

    _upgrade(empty_url, data_dir, "0005")

    with _serving(settings) as (client, services):
        cluster = services.cluster.settings()
        assert (
            cluster.cluster_name,
            cluster.endpoint,
            cluster.talos_version,
            cluster.kubernetes_version,
            cluster.install_disk,
            cluster.cert_sans,
            cluster.gateway,
            cluster.nameservers,
            cluster.revision,
            cluster.updated_by,
        ) == ("lab", "https://10.0.5.10:6443", "v1.13", "1.34.1", "/dev/sda", ["k8s.lab.example"], "10.0.5.1",
              ["10.0.5.53"], 4, "root")  # fmt: skip
        for role in Role:
            fixture = (TALOS_FIXTURES / f"{role.value}.yaml").read_bytes()
            assert services.cluster.get_base(role) == fixture
            assert cluster.bases[role.value]["source"] == "uploaded"
            assert cluster.bases[role.value]["sha256"] == hashlib.sha256(fixture).hexdigest()
        group, _ = services.groups.get("rack-5")
        assert (group.priority, group.selector, group.patch, group.description, group.revision) == (
            50,
            {"rack": "5"},
            NVME_PATCH,
            "the NVMe rack",
            3,
        )

        devices = _devices(client, ROOT_TOKEN)
        assert set(devices) == {W21, CP11, LATE}
        w21 = devices[W21]
        assert {k: w21[k] for k in ("hostname", "ip_address", "status", "notes", "source", "labels", "patch")} == {
            "hostname": "w-21",
            "ip_address": "10.0.5.21/24",
            "status": "approved",
            "notes": "GPU box",
            "source": "ipxe",
            "labels": {"rack": "5", "gpu": "a100"},
            "patch": SYSCTL_PATCH,
        }
        assert w21["extra_nics"] == [{"mac": "52:54:00:0b:01:21", "addresses": ["192.168.20.21/24"]}]
        assert (w21["lease_ip"], _seen(w21["installed_at"]), w21["revision"]) == ("10.0.5.21", _at(25), 5)
        assert (devices[CP11]["install_disk"], devices[CP11]["role"]) == ("/dev/vda", "controlplane")
        assert (devices[LATE]["status"], devices[LATE]["facts"]) == ("pending", {"vendor_class": "PXEClient"})

        # The audit row keeps the patch text it was written with; it is shown summarised.
        with services.db.read() as s:
            assert s.execute(text("SELECT id, details FROM audit_events")).all() == old_audit
        (entry,) = services.audit.list(AuditQuery(device_id=devices[W21]["id"]))[0]
        assert entry.details == {"patch": patch_summary(SYSCTL_PATCH)}

        # The labelled machine's config: the group's patch, its own, the cluster's gateway and nameservers.
        docs = _config(client, W21)
        machine = docs["v1alpha1"]["machine"]
        assert machine["install"]["disk"] == "/dev/nvme0n1"
        assert machine["kubelet"]["extraArgs"]["max-pods"] == "250"
        assert machine["sysctls"]["vm.max_map_count"] == "262144"
        assert docs[("HostnameConfig", None)]["hostname"] == "w-21"
        assert docs[("LinkConfig", "ktizo0")]["routes"] == [{"gateway": "10.0.5.1"}]
        assert docs[("LinkConfig", "ktizo1")]["addresses"] == [{"address": "192.168.20.21/24"}]
        assert docs[("ResolverConfig", None)]["nameservers"] == [{"address": "10.0.5.53"}]
        docs = _config(client, CP11)
        assert docs["v1alpha1"]["machine"]["type"] == "controlplane"
        assert docs["v1alpha1"]["machine"]["install"]["disk"] == "/dev/vda"
        assert _refused(client, LATE) == "Device not approved. Current status: pending"


# -- through 0005's one constraint: names and addresses approved twice before it ---------------------------

FIRST, SECOND, THIRD, FOURTH = (f"52:54:00:0c:00:0{n}" for n in range(1, 5))


def test_names_and_addresses_approved_twice_before_0005_keep_their_earliest_approval(
    server: tuple[Settings, Path], empty_url: str
) -> None:
    """Two machines approved concurrently under one hostname (in different case), and two under one static
    address (with different prefixes), before 0005 made it a constraint: the upgrade keeps the earliest approval
    of each, revokes the later one with an audit row saying why, and nothing else changes."""
    settings, data_dir = server
    old = _old_release(empty_url, "0004")
    with old.write_engine.begin() as conn:
        rows = [
            (FIRST, "node-07", "10.0.5.30/24", 2),
            (SECOND, "Node-07", "10.0.5.31/24", 3),
            (THIRD, "node-08", "10.0.5.40/24", 1),
            (FOURTH, "node-09", "10.0.5.40/16", 4),
        ]
        ids = {
            mac: _insert(
                conn,
                "devices",
                mac_address=mac,
                hostname=hostname,
                ip_address=ip,
                role="worker",
                status="approved",
                notes=f"approved at minute {minute}",
                facts={},
                first_seen=_at(0),
                approved_at=_at(minute),
                approved_by="ops",
            )
            for mac, hostname, ip, minute in rows
        }
    old.dispose()

    _upgrade(empty_url, data_dir, "0004")

    _install_bases(settings)
    with _serving(settings) as (client, services):
        devices = {d.mac_address: d for d in services.devices.list(DeviceQuery(limit=10_000))[0]}
        assert {mac: (d.status, d.hostname, d.ip_address, d.rejected_by) for mac, d in devices.items()} == {
            FIRST: ("approved", "node-07", "10.0.5.30/24", None),
            SECOND: ("rejected", "node-07", "10.0.5.31/24", "migration"),
            THIRD: ("approved", "node-08", "10.0.5.40/24", None),
            FOURTH: ("rejected", "node-09", "10.0.5.40/16", "migration"),
        }
        assert {mac: devices[mac].notes for mac, *_ in rows} == {mac: f"approved at minute {m}" for mac, *_, m in rows}
        revoked = {e.device_id: e for e in services.audit.list(AuditQuery(limit=100))[0] if e.actor == "migration"}
        assert set(revoked) == {ids[SECOND], ids[FOURTH]}
        for entry in revoked.values():
            assert (entry.action, entry.actor_type, entry.details["revoked"]) == ("reject", "system", True)
            assert "another approved machine already had this hostname or static IP" in entry.details["reason"]

        assert _config(client, FIRST)[("HostnameConfig", None)]["hostname"] == "node-07"
        assert _refused(client, SECOND) == "Device not approved. Current status: rejected"
        # The operator re-approves the revoked one under a name of its own.
        services.devices.approve(Actor.system(), ids[SECOND], DeviceChanges(hostname="node-10"))
        assert _config(client, SECOND)[("HostnameConfig", None)]["hostname"] == "node-10"


# -- what hangs off a machine's id: memberships, console codes, enrollments, certificates, its audit history -

MEMBER, WAITING, DELETED, AGENT_MACHINE_ID = (*(f"52:54:00:0d:00:0{n}" for n in range(1, 4)), "4f1c2e9a" * 4)


def test_what_hangs_off_a_machine_survives_the_upgrade(server: tuple[Settings, Path], empty_url: str) -> None:
    """Through 0005's and 0007's rebuilds of the devices table (the release at 0006 ran in between): a machine's
    group membership, a console code waiting for approval, an agent's pending enrollment and issued certificate
    are still that machine's, and a machine deleted before the upgrade never lends its id, and so its audit
    history, to a new one. (On SQLite the rebuilds once ran with foreign keys on: see migrations/env.py.)"""
    settings, data_dir = server
    old = _old_release(empty_url, "0004")
    with old.write_engine.begin() as conn:
        device: dict[str, Any] = {"role": "worker", "facts": {}, "first_seen": _at(10)}
        member = _insert(conn, "devices", mac_address=MEMBER, status="approved", approved_at=_at(11), **device)
        waiting = _insert(conn, "devices", mac_address=WAITING, source="device_code", **device)
        deleted = _insert(conn, "devices", mac_address=DELETED, **device)
        conn.execute(text("DELETE FROM devices WHERE id = :id"), {"id": deleted})
        _insert(
            conn,
            "audit_events",
            at=_at(12),
            actor="root",
            actor_type="user",
            action="delete",
            device_id=deleted,
            device_mac=DELETED,
            details={},
        )
        group = _insert(
            conn,
            "device_groups",
            name="gpu",
            selector={},  # members by hand only
            patch=SYSCTL_PATCH,
            nameservers=[],
            created_at=_at(5),
            updated_at=_at(5),
        )
        _insert(conn, "group_members", returning=None, group_id=group, device_id=member)
        _insert(
            conn,
            "device_codes",
            device_id=waiting,
            client_id="talos",
            device_code_hash="d" * 64,
            user_code="BCDF-GHJK",
            created_at=_at(119),
            expires_at=_at(134),
        )
    command.upgrade(alembic_config(old), "0006")  # the release with Linux agents, and its first agent
    with old.write_engine.begin() as conn:
        agent = _insert(
            conn,
            "devices",
            kind="agent",
            machine_id=AGENT_MACHINE_ID,
            role=None,
            hostname="build-01",
            fqdn="build-01.lab.example",
            addresses=["10.0.6.7"],
            status="approved",
            source="enroll",
            facts={"os": "debian"},
            first_seen=_at(40),
            approved_at=_at(41),
        )
        _insert(
            conn,
            "agent_certificates",
            returning="serial",
            serial="0a" * 20,
            device_id=agent,
            machine_id=AGENT_MACHINE_ID,
            cert_pem="-----BEGIN CERTIFICATE-----",
            not_before=_at(41),
            not_after=_at(41 + 90 * 24 * 60),
            issued_at=_at(41),
            issued_by="root",
            reason="enroll",
        )
        _insert(
            conn,
            "enrollments",
            device_id=agent,
            token_hash="e" * 64,
            csr_pem="-----BEGIN CERTIFICATE REQUEST-----",
            key_type="ed25519",
            status="pending",
            created_at=_at(110),
            expires_at=_at(110 + 24 * 60),
        )
    old.dispose()

    _upgrade(empty_url, data_dir, "0006")

    services = build_services(settings)
    try:
        with services.db.read() as s:
            rows = {
                "group_members": s.execute(text("SELECT group_id, device_id FROM group_members")).all(),
                "device_codes": s.execute(text("SELECT device_id, user_code, status FROM device_codes")).all(),
                "enrollments": s.execute(text("SELECT device_id, status FROM enrollments")).all(),
                "agent_certificates": s.execute(text("SELECT serial, device_id FROM agent_certificates")).all(),
            }
        assert rows == {
            "group_members": [(group, member)],
            "device_codes": [(waiting, "BCDF-GHJK", "pending")],
            "enrollments": [(agent, "pending")],
            "agent_certificates": [("0a" * 20, agent)],
        }
        assert services.groups.get("gpu")[1] == [member]
        new = services.devices.create(Actor.system(), DeviceChanges(mac_address="52:54:00:0d:00:05"))
        assert new.id > agent > deleted
        assert [e.action for e in services.audit.list(AuditQuery(device_id=new.id))[0]] == ["create"]
    finally:
        services.db.dispose()
