"""Secrets at rest: with KTIZO_SECRET_KEY the secrets bundle and the base configs are sealed in the database and
never written to disk; without one they are stored as plaintext and mirrored to templates/base/; keys rotate."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from ktizo.app import build_services, create_app
from ktizo.cli import app as cli_app
from ktizo.domain.users import UserRole
from ktizo.pki.sealing import Sealer, SealingError, generate_key, parse_keys
from ktizo.services.context import Actor
from ktizo.services.registry import Services
from ktizo.settings import Settings
from ktizo.talos import load_documents
from tests.support import TALOS_FIXTURES, TALOS_HEADERS, bearer, make_token, talos_url

SECRETS_YAML = (TALOS_FIXTURES / "secrets.yaml").read_bytes()
SECRETS = yaml.safe_load(SECRETS_YAML)
SETTINGS = {"cluster_name": "vault", "endpoint": "https://vault.example:6443", "kubernetes_version": "1.33.0"}
MAC = "52:54:00:00:40:01"


@contextmanager
def server(tmp_path: Path, database_url: str, key: str | None) -> Iterator[tuple[TestClient, Services, Settings]]:
    settings = Settings(
        data_dir=tmp_path / "data", database_url=database_url, secret_key=key, last_seen_interval=0, long_poll_seconds=0
    )
    services = build_services(settings)
    try:
        with TestClient(create_app(settings, services), raise_server_exceptions=False) as client:
            yield client, services, settings
    finally:
        services.db.dispose()


def _raw(database_url: str) -> tuple[str, dict[str, str]]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            bundle = conn.execute(text("SELECT bundle FROM cluster_secrets WHERE id = 1")).scalar_one()
            bases: dict[str, str] = dict(conn.execute(text("SELECT role, content FROM base_configs")).all())
    finally:
        engine.dispose()
    return bundle, bases


def _adopt(client: TestClient, headers: dict[str, str]) -> None:
    """Settings, Talos's public test bundle (so no RSA key is made here), generate, one approved device."""
    assert client.put("/api/v1/cluster", json=SETTINGS, headers=headers).status_code == 200
    assert client.post("/api/v1/cluster/secrets", content=SECRETS_YAML, headers=headers).status_code == 204
    r = client.post("/api/v1/cluster/generate", headers=headers)
    assert r.status_code == 200, r.text
    device = client.post("/api/v1/devices", json={"mac_address": MAC, "role": "controlplane"}, headers=headers)
    client.post(f"/api/v1/devices/{device.json()['id']}/approve", headers=headers)


def _secret_texts() -> list[str]:
    return [
        SECRETS["trustdinfo"]["token"],
        SECRETS["secrets"]["bootstraptoken"],
        SECRETS["secrets"]["secretboxencryptionsecret"],
        SECRETS["cluster"]["secret"],
        SECRETS["certs"]["os"]["key"],
        SECRETS["certs"]["k8s"]["key"],
    ]


def test_with_a_key_secrets_are_sealed_and_nothing_touches_the_disk(tmp_path: Path, database_url: str) -> None:
    key = generate_key()
    with server(tmp_path, database_url, key) as (client, services, settings):
        headers = bearer(make_token(services, "root", UserRole.ADMIN))
        _adopt(client, headers)
        status = client.get("/api/v1/cluster", headers=headers).json()
        assert (status["secrets_present"], status["secrets_sealed"]) == (True, True)
        assert {b["source"] for b in status["bases"].values()} == {"generated"}
        # The server itself reads through the seal: the machine gets its config, an admin the bundle.
        served = load_documents(client.get(talos_url(mac=MAC), headers=TALOS_HEADERS).content)
        assert next(d for d in served if "kind" not in d)["machine"]["ca"]["key"] == SECRETS["certs"]["os"]["key"]
        assert yaml.safe_load(client.get("/api/v1/cluster/secrets", headers=headers).text) == SECRETS
        base_dir = settings.base_templates_dir

    bundle, bases = _raw(database_url)
    assert set(bases) == {"controlplane", "worker"}
    for stored in (bundle, *bases.values()):
        assert stored.startswith("fernet:")
        assert "PRIVATE KEY" not in stored
        for secret in _secret_texts():
            assert secret not in stored
        assert "vault.example" not in stored
    assert not base_dir.exists() or list(base_dir.iterdir()) == []


def test_without_a_key_values_are_plain_and_mirrored_to_files(tmp_path: Path, database_url: str) -> None:
    with server(tmp_path, database_url, None) as (client, services, settings):
        headers = bearer(make_token(services, "root", UserRole.ADMIN))
        _adopt(client, headers)
        assert client.get("/api/v1/cluster", headers=headers).json()["secrets_sealed"] is False
        base_dir = settings.base_templates_dir
    bundle, bases = _raw(database_url)
    assert bundle.startswith("plain:")
    assert yaml.safe_load(bundle.removeprefix("plain:")) == SECRETS
    for role, stored in bases.items():
        assert stored.startswith("plain:")
        on_disk = base_dir / f"{role}.yaml"
        assert on_disk.read_text() == stored.removeprefix("plain:")
        assert on_disk.stat().st_mode & 0o077 == 0  # a controlplane config holds the CA keys: owner only


def test_the_wrong_key_or_no_key_is_a_clear_error_naming_ktizo_secret_key(tmp_path: Path, database_url: str) -> None:
    with server(tmp_path, database_url, generate_key()) as (client, services, _):
        token = make_token(services, "root", UserRole.ADMIN)
        _adopt(client, bearer(token))

    for key in (generate_key(), None):
        with server(tmp_path, database_url, key) as (client, services, _):
            headers = bearer(token)
            # What needs no secret still works.
            status = client.get("/api/v1/cluster", headers=headers).json()
            assert (status["cluster_name"], status["secrets_sealed"]) == ("vault", True)
            for r in (
                client.get("/api/v1/cluster/secrets", headers=headers),
                client.get("/api/v1/cluster/talosconfig", headers=headers),
                client.get("/api/v1/cluster/base/controlplane", headers=headers),
            ):
                assert r.status_code >= 400
                assert "KTIZO_SECRET_KEY" in r.text, r.text
            with pytest.raises(SealingError, match="KTIZO_SECRET_KEY"):
                services.cluster.export_secrets(Actor.system())


def test_a_server_with_the_wrong_key_answers_as_a_server_problem(tmp_path: Path, database_url: str) -> None:
    with server(tmp_path, database_url, generate_key()) as (client, services, _):
        token = make_token(services, "root", UserRole.ADMIN)
        _adopt(client, bearer(token))
    with server(tmp_path, database_url, generate_key()) as (client, _services, _):
        r = client.get("/api/v1/cluster/secrets", headers=bearer(token))
        assert r.status_code >= 500 and "KTIZO_SECRET_KEY" in r.text
        r = client.get(talos_url(mac=MAC), headers=TALOS_HEADERS)
        assert r.status_code >= 500 and "KTIZO_SECRET_KEY" in r.text


def test_key_rotation_new_then_old_then_rekey(tmp_path: Path, database_url: str) -> None:
    old, new = generate_key(), generate_key()
    with server(tmp_path, database_url, old) as (client, services, _):
        token = make_token(services, "root", UserRole.ADMIN)
        _adopt(client, bearer(token))
    sealed_with_old = _raw(database_url)

    # NEW,OLD: the first seals, every key opens.
    with server(tmp_path, database_url, f"{new},{old}") as (client, services, _):
        assert yaml.safe_load(client.get("/api/v1/cluster/secrets", headers=bearer(token)).text) == SECRETS
        assert client.get(talos_url(mac=MAC), headers=TALOS_HEADERS).status_code == 200
    assert _raw(database_url) == sealed_with_old  # reading re-seals nothing

    env = {
        "KTIZO_DATA_DIR": str(tmp_path / "data"),
        "KTIZO_DATABASE_URL": database_url,
        "KTIZO_SECRET_KEY": f"{new},{old}",
    }
    result = CliRunner().invoke(cli_app, ["secrets", "rekey"], env=env)
    assert result.exit_code == 0, result.output
    assert "re-sealed 3 value(s)" in result.output
    bundle, bases = _raw(database_url)
    assert bundle != sealed_with_old[0] and bundle.startswith("fernet:")
    assert all(bases[role] != sealed_with_old[1][role] for role in bases)
    # Rekeying again has nothing left to do.
    assert "re-sealed 0 value(s)" in CliRunner().invoke(cli_app, ["secrets", "rekey"], env=env).output

    with server(tmp_path, database_url, new) as (client, services, _):
        assert yaml.safe_load(client.get("/api/v1/cluster/secrets", headers=bearer(token)).text) == SECRETS
        assert client.get(talos_url(mac=MAC), headers=TALOS_HEADERS).status_code == 200
        events = client.get("/api/v1/audit?action=secrets_reseal", headers=bearer(token)).json()["items"]
        assert [e["details"] for e in events] == [{"values": 0, "sealed": True}, {"values": 3, "sealed": True}]
    with server(tmp_path, database_url, old) as (client, _, _):
        r = client.get("/api/v1/cluster/secrets", headers=bearer(token))
        assert r.status_code >= 400 and "KTIZO_SECRET_KEY" in r.text


def test_rekey_seals_what_was_stored_in_plaintext(tmp_path: Path, database_url: str) -> None:
    with server(tmp_path, database_url, None) as (client, services, _):
        token = make_token(services, "root", UserRole.ADMIN)
        _adopt(client, bearer(token))
    key = generate_key()
    with server(tmp_path, database_url, key) as (client, services, _):
        # Plaintext left from before the key still opens; rekey then seals it.
        assert client.get(talos_url(mac=MAC), headers=TALOS_HEADERS).status_code == 200
        assert services.cluster.reseal(Actor.system()) == 3
        assert client.get("/api/v1/cluster", headers=bearer(token)).json()["secrets_sealed"] is True
    bundle, bases = _raw(database_url)
    assert all(v.startswith("fernet:") for v in (bundle, *bases.values()))
    assert all("PRIVATE KEY" not in v for v in (bundle, *bases.values()))


def test_rekey_unseal_goes_back_to_plaintext(tmp_path: Path, database_url: str) -> None:
    key = generate_key()
    with server(tmp_path, database_url, key) as (client, services, _):
        _adopt(client, bearer(make_token(services, "root", UserRole.ADMIN)))
    # Without the key nothing sealed can be opened: the command says which key to set.
    env = {"KTIZO_DATA_DIR": str(tmp_path / "data"), "KTIZO_DATABASE_URL": database_url, "KTIZO_SECRET_KEY": ""}
    refused = CliRunner().invoke(cli_app, ["secrets", "rekey", "--unseal"], env=env)
    assert refused.exit_code != 0
    assert "KTIZO_SECRET_KEY" in refused.output
    result = CliRunner().invoke(cli_app, ["secrets", "rekey", "--unseal"], env={**env, "KTIZO_SECRET_KEY": key})
    assert result.exit_code == 0, result.output
    assert "unsealed" in result.output
    bundle, _ = _raw(database_url)
    assert bundle.startswith("plain:")


def test_key_file_and_bad_keys(tmp_path: Path) -> None:
    first, second = generate_key(), generate_key()
    key_file = tmp_path / "keys"
    key_file.write_text(f"{first}\n{second}\n")
    settings = Settings(data_dir=tmp_path, secret_key_file=key_file)
    assert settings.secret_keys() == [first, second]
    sealed = Sealer([second]).seal("hello")
    assert Sealer(settings.secret_keys()).open(sealed) == "hello"
    assert Sealer(settings.secret_keys()).needs_reseal(sealed)
    with pytest.raises(SealingError, match="KTIZO_SECRET_KEY"):
        parse_keys("not-a-key")
    with pytest.raises(SealingError, match="unknown format"):
        Sealer([first]).open("rot13:uryyb")


def test_sealing_leaves_no_plaintext_copy_behind(tmp_path: Path, database_url: str) -> None:
    with server(tmp_path, database_url, None) as (client, services, settings):
        _adopt(client, bearer(make_token(services, "root", UserRole.ADMIN)))
        controlplane = settings.base_templates_dir / "controlplane.yaml"
    assert SECRETS["certs"]["os"]["key"] in controlplane.read_text()
    env = {
        "KTIZO_DATA_DIR": str(tmp_path / "data"),
        "KTIZO_DATABASE_URL": database_url,
        "KTIZO_SECRET_KEY": generate_key(),
    }
    result = CliRunner().invoke(cli_app, ["secrets", "rekey"], env=env)
    assert result.exit_code == 0, result.output
    assert not controlplane.exists() or "templates/base" in result.output
