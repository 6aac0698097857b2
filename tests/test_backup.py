"""``ktizo backup`` and ``ktizo restore`` on SQLite: an online backup made while the server writes, restored into
a fresh data directory, serves the same config bytes; the manifest's SHA-256s are checked; nothing is written
over unless asked."""

from __future__ import annotations

import json
import shutil
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from ktizo.app import build_services, create_app
from ktizo.cli import app as cli_app
from ktizo.db.migrate import head_revision
from ktizo.pki.sealing import generate_key
from ktizo.services.devices import DeviceQuery
from ktizo.services.registry import Services
from ktizo.settings import Settings
from tests.factories import approved, next_mac
from tests.support import TALOS_FIXTURES, TALOS_HEADERS, talos_url

pytestmark = pytest.mark.sqlite_only

MAC = "52:54:00:be:ac:01"
UUID = "4c4c4544-0042-3510-8051-b4c04f4e3199"
KEY = generate_key()


def _settings(data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        database_url=f"sqlite:///{data_dir / 'ktizo.db'}",
        secret_key=KEY,
        last_seen_interval=0,
        long_poll_seconds=0,
    )


def _cli(data_dir: Path, *args: str, ok: bool = True):  # type: ignore[no-untyped-def]
    env = {
        "KTIZO_DATA_DIR": str(data_dir),
        "KTIZO_DATABASE_URL": f"sqlite:///{data_dir / 'ktizo.db'}",
        "KTIZO_SECRET_KEY": KEY,
    }
    result = CliRunner().invoke(cli_app, list(args), env=env)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def _download(settings: Settings, services: Services) -> bytes:
    with TestClient(create_app(settings, services), client=("10.0.0.9", 40000)) as client:
        r = client.get(talos_url(mac=MAC, uuid=UUID), headers=TALOS_HEADERS)
    assert r.status_code == 200, r.text
    return r.content


def _macs(services: Services) -> set[str]:
    return {d.mac_address for d in services.devices.list(DeviceQuery(limit=10**6))[0]}


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[Settings, Services]]:
    """A server's data directory: a migrated database, a sealed base config imported for each role, an approved
    machine, and a base config file under templates/base/."""
    settings = _settings(tmp_path / "live")
    services = build_services(settings)
    services.schema.upgrade()
    for role in ("controlplane", "worker"):
        _cli(settings.data_dir, "cluster", "import-base", role, str(TALOS_FIXTURES / f"{role}.yaml"))
    settings.base_templates_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TALOS_FIXTURES / "worker.yaml", settings.base_templates_dir / "worker.yaml")
    approved(services, MAC, uuid=UUID, hostname="backed-up")
    yield settings, services
    services.db.dispose()


def test_an_online_backup_restores_into_a_server_that_serves_the_same_config(
    live: tuple[Settings, Services], tmp_path: Path
) -> None:
    settings, services = live
    expected = _download(settings, services)

    # The server goes on registering machines while the backup is taken.
    stop = threading.Event()
    written: list[str] = []
    errors: list[BaseException] = []

    def register() -> None:
        try:
            while not stop.is_set():
                mac = next_mac()
                services.devices.register(mac, "10.0.0.50")
                written.append(mac)
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    writer = threading.Thread(target=register)
    writer.start()
    try:
        while len(written) < 20 and writer.is_alive():
            threading.Event().wait(0.01)
        before = len(written)
        out = _cli(settings.data_dir, "backup", str(tmp_path / "backup")).output
        during = len(written)
        while len(written) < during + 20 and writer.is_alive():  # the writer was not stopped by the backup
            threading.Event().wait(0.01)
    finally:
        stop.set()
        writer.join(timeout=30)
    assert not errors, errors
    assert len(written) > during >= before >= 20
    assert "KTIZO_SECRET_KEY" in out

    backup = tmp_path / "backup"
    assert stat.S_IMODE(backup.stat().st_mode) == 0o700
    manifest = json.loads((backup / "MANIFEST.json").read_text())
    assert manifest["database"] == "sqlite"
    assert manifest["schema_revision"] == head_revision()
    paths = {entry["path"] for entry in manifest["files"]}
    assert paths == {"ktizo.db", "data/templates/base/worker.yaml"}
    for file in [*backup.rglob("*")]:
        if file.is_file():
            assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    assert not (backup / "ktizo.db-wal").exists()  # one self-contained file

    restored = _settings(tmp_path / "restored")
    out = _cli(restored.data_dir, "restore", str(backup)).output
    assert "KTIZO_SECRET_KEY" in out
    assert (restored.base_templates_dir / "worker.yaml").read_bytes() == (TALOS_FIXTURES / "worker.yaml").read_bytes()
    again = build_services(restored)
    try:
        assert _download(restored, again) == expected
        macs = _macs(again)
        # A consistent snapshot: every machine registered before the backup began, none after it ended.
        assert MAC in macs
        assert set(written[:before]) <= macs
        assert not macs & set(written[during + 1 :])  # one may have been committed, not yet counted
    finally:
        again.db.dispose()


def test_a_tampered_backup_is_refused_before_anything_is_written(
    live: tuple[Settings, Services], tmp_path: Path
) -> None:
    settings, _ = live
    _cli(settings.data_dir, "backup", str(tmp_path / "backup"))
    for victim in ("ktizo.db", "data/templates/base/worker.yaml"):
        copy = tmp_path / f"tampered-{victim.replace('/', '_')}"
        shutil.copytree(tmp_path / "backup", copy)
        with (copy / victim).open("ab") as f:
            f.write(b"\n# changed\n")
        target = tmp_path / f"target-{victim.replace('/', '_')}"
        r = _cli(target, "restore", str(copy), ok=False)
        assert r.exit_code != 0
        assert f"{victim} does not match its SHA-256" in r.output
        assert not (target / "ktizo.db").exists()
        assert not (target / "templates").exists()


def test_backup_and_restore_write_over_nothing_unless_forced(live: tuple[Settings, Services], tmp_path: Path) -> None:
    settings, _ = live
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "note.txt").write_text("mine")
    r = _cli(settings.data_dir, "backup", str(busy), ok=False)
    assert r.exit_code != 0 and "is not empty" in r.output
    assert sorted(p.name for p in busy.iterdir()) == ["note.txt"]
    _cli(settings.data_dir, "backup", str(busy), "--force")
    assert (busy / "MANIFEST.json").is_file()

    # Into the live data directory (a database there): refused, then replaced with --force.
    r = _cli(settings.data_dir, "restore", str(busy), ok=False)
    assert r.exit_code != 0 and "already a database" in r.output
    other = tmp_path / "other"
    _cli(other, "db", "upgrade")
    _cli(other, "restore", str(busy), "--force")
    services = build_services(_settings(other))
    try:
        assert MAC in _macs(services)
    finally:
        services.db.dispose()


def test_a_backup_inside_the_data_directory_is_refused(live: tuple[Settings, Services]) -> None:
    settings, _ = live
    r = _cli(settings.data_dir, "backup", str(settings.data_dir / "backup"), ok=False)
    assert r.exit_code != 0 and "inside the data directory" in r.output


def test_a_postgresql_backup_says_what_to_run(tmp_path: Path) -> None:
    data = tmp_path / "pgdata"
    (data / "templates" / "base").mkdir(parents=True)
    (data / "templates" / "base" / "worker.yaml").write_text("version: v1alpha1\n")
    url = "postgresql+psycopg://ktizo:hunter2@db.example:5433/ktizo"
    from ktizo.services import backup as service

    settings = Settings(data_dir=data, database_url=url)
    original = service.migrate.current_revision
    service.migrate.current_revision = lambda db: "0008"  # type: ignore[assignment]  # no server to ask
    try:
        result = service.backup(settings, tmp_path / "pgbackup")
    finally:
        service.migrate.current_revision = original  # type: ignore[assignment]
    (command,) = result.commands
    assert command == (
        f"pg_dump --format=custom --no-owner --file={tmp_path / 'pgbackup' / 'ktizo.pgdump'} "
        "'postgresql://ktizo@db.example:5433/ktizo'"
    )
    assert "hunter2" not in command
    assert result.files == ["data/templates/base/worker.yaml"]
