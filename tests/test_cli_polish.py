"""What a newcomer sees at the command line: where the CLI looks for its database, what it says when something
is missing or wrong, and what `show`, `audit list` and `cluster set` report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from alembic.script import ScriptDirectory
from fastapi.testclient import TestClient
from sqlalchemy import text, update
from typer.testing import CliRunner

from ktizo.cli import app
from ktizo.db import Database
from ktizo.db.migrate import alembic_config, head_revision, upgrade
from ktizo.db.models import Device
from ktizo.services.context import Actor
from ktizo.services.devices import DeviceChanges, normalize_nics
from ktizo.services.registry import Services
from ktizo.settings import Settings
from tests.support import TALOS_FIXTURES

MAC = "52:54:00:00:60:01"
OTHER_MAC = "52:54:00:00:60:02"


def _bare(*args: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The CLI as a newcomer runs it: in some directory, with no KTIZO_DATA_DIR or KTIZO_DATABASE_URL."""
    monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, list(args), env={"KTIZO_DATA_DIR": None, "KTIZO_DATABASE_URL": None})


# -- 1. no database where the CLI looks ------------------------------------------------------------------------


@pytest.mark.sqlite_only
def test_a_command_in_the_wrong_directory_creates_nothing_and_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = _bare("devices", "list", cwd=tmp_path, monkeypatch=monkeypatch)
    assert r.exit_code == 1
    assert not (tmp_path / "ktizo-data").exists()
    expected = tmp_path.resolve() / "ktizo-data" / "ktizo.db"
    assert f"error: there is no Ktizo database at {expected}" in r.stderr
    for hint in ("--data-dir DIR", "KTIZO_DATA_DIR", "KTIZO_DATABASE_URL", "`ktizo db upgrade`"):
        assert hint in r.stderr, hint

    elsewhere = tmp_path / "elsewhere"
    r = _bare("--data-dir", str(elsewhere), "audit", "list", cwd=tmp_path, monkeypatch=monkeypatch)
    assert r.exit_code == 1 and f"no Ktizo database at {elsewhere / 'ktizo.db'}" in r.stderr
    assert not elsewhere.exists()


@pytest.mark.sqlite_only
def test_db_upgrade_creates_the_database_and_then_commands_use_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = _bare("db", "upgrade", cwd=tmp_path, monkeypatch=monkeypatch)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ktizo-data" / "ktizo.db").is_file()
    r = _bare("devices", "list", cwd=tmp_path, monkeypatch=monkeypatch)
    assert (r.exit_code, r.stdout) == (0, "No devices.\n")


@pytest.mark.sqlite_only
def test_an_empty_database_file_is_not_initialised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ktizo-data").mkdir()
    (tmp_path / "ktizo-data" / "ktizo.db").touch()
    r = _bare("devices", "list", cwd=tmp_path, monkeypatch=monkeypatch)
    assert r.exit_code == 1
    assert "has no Ktizo schema yet: run `ktizo db upgrade`" in r.stderr


@pytest.mark.sqlite_only
def test_a_database_behind_its_migrations_names_both_revisions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ktizo-data" / "ktizo.db"
    db = Database(f"sqlite:///{path}")
    head = head_revision()
    script = ScriptDirectory.from_config(alembic_config(db)).get_revision(head)
    assert script is not None and isinstance(script.down_revision, str)
    upgrade(db, script.down_revision)
    db.dispose()

    r = _bare("devices", "list", cwd=tmp_path, monkeypatch=monkeypatch)
    assert r.exit_code == 1
    assert (
        f"the database at sqlite:///{path.resolve()} is at revision {script.down_revision}, "
        f"this Ktizo needs {head}: run `ktizo db upgrade`"
    ) in r.stderr


@pytest.mark.sqlite_only
def test_a_database_from_a_newer_release_is_not_offered_an_upgrade(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ktizo-data" / "ktizo.db"
    db = Database(f"sqlite:///{path}")
    upgrade(db)
    with db.write_engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'f00dfeed'"))
    db.dispose()
    r = _bare("devices", "list", cwd=tmp_path, monkeypatch=monkeypatch)
    assert r.exit_code == 1
    assert "is at revision f00dfeed, which this Ktizo" in r.stderr and "newer Ktizo" in r.stderr
    assert "run `ktizo db upgrade`" not in r.stderr


def test_global_options_after_the_command_are_explained(cli: Any) -> None:
    r = cli("devices", "list", "--data-dir", "/srv/ktizo", ok=False)
    assert r.exit_code == 2
    assert "error: No such option: --data-dir. --data-dir and --database-url go before the command" in r.stderr
    assert "`ktizo --data-dir DIR devices list`" in r.stderr


# -- 4. the audit trail of a deleted device ---------------------------------------------------------------------


def test_audit_list_finds_a_deleted_device_by_id_and_by_mac(cli: Any, services: Services) -> None:
    first, _ = services.devices.register(MAC, "10.1.1.1")
    cli("devices", "approve", MAC, "--hostname", "n1", "--ip", "10.0.5.11/24")
    cli("devices", "delete", MAC, "--yes")
    second, _ = services.devices.register(MAC, "10.1.1.2")  # the same machine seen again: a new device
    services.devices.register(OTHER_MAC, "10.1.1.3")

    by_id = json.loads(cli("audit", "list", "--device", str(first.id), "--json").output)
    assert [e["action"] for e in by_id] == ["delete", "approve", "register"]
    assert {e["device_id"] for e in by_id} == {first.id}

    by_mac = json.loads(cli("audit", "list", "--device", MAC.replace(":", "-"), "--json").output)
    assert [(e["action"], e["device_id"]) for e in by_mac] == [
        ("register", second.id),
        ("delete", first.id),
        ("approve", first.id),
        ("register", first.id),
    ]
    table = cli("audit", "list", "--device", MAC, "--action", "approve").output
    assert "approve" in table and "register" not in table

    assert cli("audit", "list", "--device", "4242").output == "No audit events for device 4242.\n"
    r = cli("audit", "list", "--device", "52:54:00:00:60:99", ok=False)
    assert r.exit_code == 1
    assert r.stderr.strip() == (
        "error: no device with MAC 52:54:00:00:60:99, now or deleted "
        "(`ktizo devices list` shows the devices Ktizo knows)"
    )


# -- 5. devices show ------------------------------------------------------------------------------------------------


def test_devices_show_has_labels_patch_disk_lease_install_nics_and_groups(
    cli: Any, services: Services, tmp_path: Path
) -> None:
    device, _ = services.devices.register(MAC, "10.1.1.1")
    patch = tmp_path / "patch.yaml"
    patch.write_text("machine:\n  install:\n    wipe: true\n")
    cli("groups", "create", "rack-3", "--selector", "rack=r3", "--priority", "10")
    cli("groups", "create", "pinned", "--priority", "20")
    cli("groups", "create", "elsewhere", "--selector", "rack=r9")
    cli("groups", "members", "pinned", "--add", MAC)
    cli("devices", "edit", MAC, "--label", "rack=r3", "--patch-file", str(patch), "--install-disk", "/dev/sdb")
    services.devices.update(
        Actor.cli(),
        device.id,
        DeviceChanges(extra_nics=normalize_nics([{"mac": OTHER_MAC, "addresses": ["10.9.0.5/24"]}], MAC)),
    )
    services.devices.set_installed(Actor.cli(), device.id, True)
    with services.db.write() as s:
        s.execute(update(Device).where(Device.id == device.id).values(lease_ip="10.1.1.9"))

    out = cli("devices", "show", MAC).output
    lines = out.splitlines()
    for expected in (
        "labels:               rack=r3",
        "install_disk:         /dev/sdb",
        "lease_ip:             10.1.1.9",
        "groups:               rack-3 (by selector), pinned (by member)",
        f"extra nic:            {OTHER_MAC} 10.9.0.5/24",
        "patch:",
        "  machine:",
        "      wipe: true",
    ):
        assert expected in lines, (expected, out)
    assert any(line.startswith("installed_at:") and line != "installed_at:" for line in lines), out
    assert "elsewhere" not in out

    shown = json.loads(cli("devices", "show", MAC, "--json").output)
    assert shown["labels"] == {"rack": "r3"}
    assert shown["patch"] == patch.read_text()
    assert (shown["install_disk"], shown["lease_ip"]) == ("/dev/sdb", "10.1.1.9")
    assert shown["installed_at"] is not None
    assert shown["extra_nics"] == [{"mac": OTHER_MAC, "addresses": ["10.9.0.5/24"]}]
    assert [(g["name"], g["by"]) for g in shown["groups"]] == [("rack-3", "selector"), ("pinned", "member")]


# -- 6. approval without a base config ----------------------------------------------------------------------------


def test_approve_warns_when_the_role_has_no_base_config(cli: Any, services: Services) -> None:
    services.devices.register(MAC, None)
    r = cli("devices", "approve", MAC, "--role", "controlplane", "--ip", "10.0.5.12/24")
    assert "approved device" in r.stdout and "warning" not in r.stdout
    assert r.stderr.strip() == (
        "warning: there is no controlplane base config yet: the machine gets 503 until you run "
        "`ktizo cluster generate` (after `ktizo cluster set …`) or `ktizo cluster import-base controlplane FILE`"
    )


def test_approve_is_quiet_when_the_base_config_exists(cli: Any, services: Services, bases: Path) -> None:
    services.devices.register(MAC, None)
    r = cli("devices", "approve", MAC, "--role", "worker")
    assert "approved device" in r.stdout
    assert r.stderr == ""


# -- 7. a talosconfig without endpoints ------------------------------------------------------------------------------


def test_talosconfig_warns_without_an_approved_control_plane(cli: Any, services: Services) -> None:
    services.cluster.import_secrets(Actor.cli(), (TALOS_FIXTURES / "secrets.yaml").read_bytes())
    services.devices.register(MAC, None)
    cli("devices", "approve", MAC, "--role", "worker", "--ip", "10.0.5.13/24")  # a worker is no endpoint

    r = cli("cluster", "talosconfig")
    config = yaml.safe_load(r.stdout)
    assert config["contexts"][config["context"]]["endpoints"] == []
    assert "warning: no approved control plane with an IP yet" in r.stderr
    assert "--role controlplane" in r.stderr and "talosctl config endpoint" in r.stderr

    services.devices.register(OTHER_MAC, None)
    cli("devices", "approve", OTHER_MAC, "--role", "controlplane", "--ip", "10.0.5.14/24")
    r = cli("cluster", "talosconfig")
    config = yaml.safe_load(r.stdout)
    assert config["contexts"][config["context"]]["endpoints"] == ["10.0.5.14"]
    assert "no approved control plane" not in r.stderr


# -- 8. a settings update that changes nothing ------------------------------------------------------------------------


def _cluster_updates(services: Services) -> list[dict[str, Any]]:
    from ktizo.services.audit import AuditQuery

    rows, _ = services.audit.list(AuditQuery(action="cluster_update"))
    return [r.details for r in rows]


def test_cluster_set_to_the_same_value_writes_nothing(cli: Any, services: Services) -> None:
    config_revision = services.source.current_revision()
    out = cli("cluster", "set", "--dns-domain", "cluster.local").output
    assert out == "cluster settings unchanged (revision 0): they already had those values\n"
    assert _cluster_updates(services) == []
    assert services.source.current_revision() == config_revision

    cli("cluster", "set", "--name", "lab", "--endpoint", "https://lab.example")
    revision = services.cluster.settings().revision
    config_revision = services.source.current_revision()
    # The endpoint as given differs, as stored it is the same: only the name changes.
    out = cli("cluster", "set", "--endpoint", "HTTPS://Lab.Example/", "--dns-domain", "cluster.local").output
    assert "unchanged" in out
    out = cli("cluster", "set", "--name", "lab2", "--dns-domain", "cluster.local").output
    assert out == f"cluster settings updated (revision {revision + 1})\n"
    assert _cluster_updates(services)[0] == {"cluster_name": {"from": "lab", "to": "lab2"}}
    assert services.source.current_revision() == config_revision + 1


def test_api_put_of_the_current_settings_writes_nothing(
    client: TestClient, admin: dict[str, str], services: Services
) -> None:
    r = client.put("/api/v1/cluster", json={"cluster_name": "lab", "gateway": "10.0.0.1"}, headers=admin)
    assert r.status_code == 200, r.text
    body = r.json()
    settable = {k: body[k] for k in ("cluster_name", "endpoint", "dns_domain", "pod_subnets", "gateway", "nameservers")}
    config_revision = services.source.current_revision()

    again = client.put("/api/v1/cluster", json=settable, headers=admin)
    assert again.status_code == 200, again.text
    assert again.json()["revision"] == body["revision"]
    assert len(_cluster_updates(services)) == 1
    assert services.source.current_revision() == config_revision

    changed = client.put("/api/v1/cluster", json={**settable, "gateway": "10.0.0.254"}, headers=admin)
    assert changed.json()["revision"] == body["revision"] + 1
    assert _cluster_updates(services)[0] == {"gateway": {"from": "10.0.0.1", "to": "10.0.0.254"}}


# -- 9. error messages ------------------------------------------------------------------------------------------------


def test_approving_an_approved_device_points_to_edit(cli: Any, services: Services, bases: Path) -> None:
    services.devices.register(MAC, None)
    cli("devices", "approve", MAC, "--hostname", "n1")
    r = cli("devices", "approve", MAC, "--hostname", "n2", ok=False)
    assert r.exit_code == 1
    assert r.stderr.strip() == (
        f"error: device is already approved; to change its hostname, IP, role or notes use `ktizo devices edit {MAC}`"
    )


def test_an_unknown_mac_points_to_the_device_list(cli: Any) -> None:
    r = cli("devices", "show", MAC, ok=False)
    assert r.exit_code == 1
    assert r.stderr.strip() == f"error: no device with MAC {MAC} (`ktizo devices list` shows the devices Ktizo knows)"
    r = cli("groups", "create", "g", ok=True)
    r = cli("groups", "members", "g", "--add", MAC, ok=False)
    assert "`ktizo devices list`" in r.stderr


@pytest.mark.parametrize(
    ("args", "option", "choices"),
    [
        (("devices", "approve", MAC, "--role", "master"), "'--role'", "'controlplane', 'worker'"),
        (("devices", "edit", MAC, "--role", "master"), "'--role'", "'controlplane', 'worker'"),
        (("devices", "list", "--status", "waiting"), "'--status'", "'pending', 'approved', 'rejected'"),
        (("users", "create", "carol", "--role", "root"), "'--role'", "'viewer', 'operator', 'admin'"),
        (("cluster", "export-base", "master"), "'ROLE'", "'controlplane', 'worker'"),
    ],
)
def test_a_bad_choice_lists_the_choices(cli: Any, args: tuple[str, ...], option: str, choices: str) -> None:
    r = cli(*args, ok=False)
    assert r.exit_code == 2
    bad = args[-1]
    assert f"error: Invalid value for {option}: '{bad}' is not one of {choices}" in r.stderr, r.stderr
    assert "Value error" not in r.stderr and "Error:" not in r.stderr


def test_choices_accept_any_case_and_show_in_the_help(cli: Any, services: Services, bases: Path) -> None:
    services.devices.register(MAC, None)
    assert "as controlplane" in cli("devices", "approve", MAC, "--role", "ControlPlane").stdout
    assert "--role [controlplane|worker]" in cli("devices", "approve", "--help").stdout


def test_usage_errors_read_like_the_others(cli: Any) -> None:
    for args in (("devices", "frobnicate"), ("devices", "list", "--bogus"), ("cluster", "import-base")):
        r = cli(*args, ok=False)
        assert r.exit_code == 2
        assert "\nerror: " in r.stderr and "Error:" not in r.stderr, r.stderr


# -- 3. the serve banner ----------------------------------------------------------------------------------------------


@pytest.fixture
def banner(settings: Settings, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """What `ktizo serve` prints before it starts listening (the server itself is not started)."""
    import logging

    import ktizo.app.server

    monkeypatch.setattr(ktizo.app.server, "serve", lambda *args, **kwargs: None)
    monkeypatch.setattr(ktizo.app.server, "bind_mtls", lambda settings: None)  # nor its mTLS listener
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)  # the root logger is the test session's

    def run(*args: str, env: dict[str, str | None] | None = None) -> str:
        base = {"KTIZO_DATA_DIR": str(settings.data_dir), "KTIZO_DATABASE_URL": settings.effective_database_url}
        r = CliRunner().invoke(app, ["serve", *args], env={"KTIZO_PUBLIC_URL": None, **base, **(env or {})})
        assert r.exit_code == 0, r.output
        return r.stdout

    return run


def test_serve_banner_calls_the_first_password_initial_and_says_how_to_change_it(banner: Any) -> None:
    out = banner("--port", "8123")
    assert "initial password (shown once): " in out and "one-time" not in out
    assert "Sign in at http://localhost:8123/ui" in out
    assert "`ktizo users reset-password admin`" in out and "Users page" in out
    assert "Web UI: http://localhost:8123/ui\n" in out and "API docs: http://localhost:8123/docs\n" in out
    # Listening on every address, it cannot know which one the machines reach: it says so.
    assert "talos.config=http://localhost" not in out
    assert "talos.config=http://ADDRESS:8123/api/v1/config/download?mac=${mac}" in out
    assert "KTIZO_PUBLIC_URL" in out
    assert "initial password" not in banner("--port", "8123")  # only on the first start


def test_serve_banner_uses_the_public_url(banner: Any) -> None:
    out = banner(env={"KTIZO_PUBLIC_URL": "http://10.0.5.2:8000/"})
    assert "Talos machines: talos.config=http://10.0.5.2:8000/api/v1/config/download?mac=${mac}&uuid=" in out
    out = banner("--host", "10.0.5.3", "--port", "9000")
    assert "talos.config=http://10.0.5.3:9000/api/v1/config/download" in out
