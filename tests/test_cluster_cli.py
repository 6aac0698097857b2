"""`ktizo cluster …`, `ktizo groups …` and the device config commands, on the same data as the server."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from typer.testing import CliRunner

from ktizo.cli import app
from ktizo.services.registry import Services
from ktizo.settings import Settings
from ktizo.talos import load_documents
from tests.support import TALOS_FIXTURES

SECRETS_FILE = TALOS_FIXTURES / "secrets.yaml"
MAC = "52:54:00:00:50:01"


@pytest.fixture
def cli(settings: Settings, services: Services):  # type: ignore[no-untyped-def]
    runner = CliRunner()
    env = {"KTIZO_DATA_DIR": str(settings.data_dir), "KTIZO_DATABASE_URL": settings.effective_database_url}

    def run(*args: str, input: str | None = None, ok: bool = True, env_over: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        result = runner.invoke(app, list(args), env={**env, **(env_over or {})}, input=input)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return run


def _set_golden(cli: Any) -> None:
    out = cli(
        "cluster",
        "set",
        "--name",
        "base",
        "--endpoint",
        "https://base",
        "--kubernetes-version",
        "v1.28.0",
        "--talos-version",
        "1.13",
        "--gateway",
        "10.0.5.1",
        "--nameserver",
        "1.1.1.1",
        "--nameserver",
        "9.9.9.9",
    ).output
    assert "cluster settings updated" in out


def test_set_show_and_bad_input(cli: Any, services: Services) -> None:
    _set_golden(cli)
    out = cli("cluster", "show").output
    for text in ("base", "https://base:6443", "1.28.0", "v1.13", "/dev/sda", "10.244.0.0/16", "1.1.1.1, 9.9.9.9"):
        assert text in out, (text, out)
    assert "base controlplane:" in out and "missing" in out
    shown = json.loads(cli("cluster", "show", "--json").output)
    assert (shown["cluster_name"], shown["endpoint"], shown["kubernetes_version"]) == (
        "base",
        "https://base:6443",
        "1.28.0",
    )
    assert shown["nameservers"] == ["1.1.1.1", "9.9.9.9"]
    assert services.cluster.settings().gateway == "10.0.5.1"

    for args, field in (
        (("--endpoint", "http://base:6443"), "endpoint"),
        (("--talos-version", "v1.9"), "talos_version"),
        (("--service-subnet", "10.244.0.0/24"), "service_subnets"),
        (("--gateway", "gateway.local"), "gateway"),
        (("--install-disk", "sda"), "install_disk"),
    ):
        r = cli("cluster", "set", "--name", "changed", *args, ok=False)
        assert r.exit_code == 2, r.output
        assert field in r.output, r.output
    assert "v1.11, v1.12, v1.13" in cli("cluster", "set", "--talos-version", "v2.0", ok=False).output
    assert cli("cluster", "set", ok=False).exit_code == 2
    assert services.cluster.settings().cluster_name == "base"  # nothing half-set


def test_generate_export_import_and_talosconfig(
    cli: Any, services: Services, settings: Settings, tmp_path: Path
) -> None:
    r = cli("cluster", "generate", ok=False)
    assert r.exit_code == 1 and "ktizo cluster set" in r.output
    _set_golden(cli)
    cli("cluster", "set", "--install-disk", "/dev/vda")
    cli("cluster", "secrets", "import", str(SECRETS_FILE))
    r = cli("cluster", "secrets", "import", str(SECRETS_FILE), ok=False)
    assert r.exit_code == 1 and "--rotate-secrets" in r.output

    out = cli("cluster", "generate").output
    assert "controlplane base config generated (" in out
    # Rotating is a new cluster identity: it asks first, and "no" changes nothing.
    r = cli("cluster", "generate", "--rotate-secrets", input="n\n", ok=False)
    assert r.exit_code == 1 and "new cluster identity" in r.output
    assert yaml.safe_load(cli("cluster", "secrets", "export").output) == yaml.safe_load(SECRETS_FILE.read_bytes())
    assert "worker base config generated (" in out
    assert "base controlplane:" in cli("cluster", "show").output and "generated" in cli("cluster", "show").output
    cp = load_documents(cli("cluster", "export-base", "controlplane").output)
    v1 = next(d for d in cp if "kind" not in d)
    assert v1["cluster"]["clusterName"] == "base" and v1["machine"]["install"]["disk"] == "/dev/vda"

    exported = cli("cluster", "secrets", "export").output
    assert yaml.safe_load(exported) == yaml.safe_load(SECRETS_FILE.read_bytes())
    bundle = tmp_path / "bundle.yaml"
    bundle.write_text(exported)

    # A fresh installation adopts the cluster from the exported bundle.
    fresh = {"KTIZO_DATA_DIR": str(tmp_path / "fresh"), "KTIZO_DATABASE_URL": ""}
    cli("db", "upgrade", env_over=fresh)
    assert "ktizo cluster generate" in cli("cluster", "secrets", "import", str(bundle), env_over=fresh).output
    assert cli("cluster", "secrets", "export", env_over=fresh).output == exported
    assert (tmp_path / "fresh" / "ktizo.db").exists()

    services.devices.register(MAC, None)
    cli("devices", "approve", MAC, "--ip", "10.0.5.10/24", "--role", "controlplane")
    config = yaml.safe_load(cli("cluster", "talosconfig").output)
    assert config["context"] == "base"
    context = config["contexts"]["base"]
    assert context["endpoints"] == ["10.0.5.10"]
    ca = x509.load_pem_x509_certificate(base64.b64decode(context["ca"]))
    x509.load_pem_x509_certificate(base64.b64decode(context["crt"])).verify_directly_issued_by(ca)

    audit = cli("audit", "list").output
    for action in ("talosconfig", "secrets_export", "cluster_generate", "secrets_import"):
        assert action in audit, action


def test_groups_device_labels_and_config_preview(cli: Any, services: Services, bases: Path, tmp_path: Path) -> None:
    patch = tmp_path / "nvme.yaml"
    patch.write_text("machine:\n  install:\n    disk: /dev/nvme0n1\n")
    out = cli(
        "groups", "create", "rack-1", "--selector", "rack=r1", "--patch-file", str(patch), "--priority", "20"
    ).output
    assert "created group rack-1" in out
    listed = cli("groups", "list").output
    assert "rack-1" in listed and "rack=r1" in listed and "20" in listed and "yes" in listed
    as_json = json.loads(cli("groups", "list", "--json").output)
    assert as_json[0]["selector"] == {"rack": "r1"} and as_json[0]["patch"] == patch.read_text()

    services.devices.register(MAC, None)
    cli("devices", "approve", MAC, "--hostname", "cp-1", "--role", "controlplane")
    assert "updated device" in cli("devices", "edit", MAC, "--label", "rack=r1", "--label", "zone=z").output
    assert services.devices.resolve(MAC).labels == {"rack": "r1", "zone": "z"}

    shown = cli("devices", "config", MAC).output
    docs = load_documents(shown)
    v1 = next(d for d in docs if "kind" not in d)
    assert v1["machine"]["install"]["disk"] == "/dev/nvme0n1"
    assert v1["machine"]["ca"]["key"] == "***redacted***"
    assert v1["cluster"]["secret"] == "***redacted***"
    assert "PRIVATE KEY" not in shown
    assert {d.get("kind"): d for d in docs}["HostnameConfig"]["hostname"] == "cp-1"
    revealed = next(d for d in load_documents(cli("devices", "config", MAC, "--reveal").output) if "kind" not in d)
    assert b"PRIVATE KEY" in base64.b64decode(revealed["machine"]["ca"]["key"])
    assert "config_reveal" in cli("audit", "list", "--device", MAC).output

    cli("devices", "edit", MAC, "--install-disk", "/dev/sdz", "--label", "zone=")
    assert services.devices.resolve(MAC).labels == {"rack": "r1"}
    v1 = next(d for d in load_documents(cli("devices", "config", "1").output) if "kind" not in d)
    assert v1["machine"]["install"]["disk"] == "/dev/sdz"

    # Bad input: exit code 2 and the field named; nothing stored.
    bad = tmp_path / "bad.yaml"
    bad.write_text("machine:\n  type:\n    $patch: delete\n")
    r = cli("groups", "create", "broken", "--patch-file", str(bad), ok=False)
    assert r.exit_code == 2 and "machine.type" in r.output
    r = cli("groups", "update", "rack-1", "--patch-file", str(bad), ok=False)
    assert r.exit_code == 2 and "patch" in r.output
    r = cli("groups", "create", "odd", "--selector", "rack", ok=False)
    assert r.exit_code == 2 and "--selector" in r.output
    r = cli("devices", "edit", MAC, "--install-disk", "sdb", ok=False)
    assert r.exit_code == 2 and "install_disk" in r.output
    r = cli("devices", "edit", MAC, "--patch-file", str(bad), ok=False)
    assert r.exit_code == 2 and "patch" in r.output
    assert [g.name for g, _ in services.groups.all()] == ["rack-1"]
    assert services.devices.resolve(MAC).patch is None

    cli("groups", "members", "rack-1", "--add", MAC)
    cli("groups", "update", "rack-1", "--clear-patch", "--selector", "rack=r2")
    assert "disk: /dev/sdz" in cli("devices", "config", MAC).output
    assert "deleted group rack-1" in cli("groups", "delete", "rack-1").output
    assert cli("groups", "list", "--json").output.strip() == "[]"
