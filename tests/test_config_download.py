"""Config download as real Talos performs it: GET with the query Talos builds, no credentials, 403 until
approved, then the role's base config customized for the machine."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ktizo.domain.devices import IDENTITY_REFUSED
from ktizo.services.registry import Services
from ktizo.talos import load_documents, validate_documents
from tests.clock import ManualClock
from tests.support import TALOS_HEADERS, talos_url

MAC = "52:54:00:12:34:56"
UUID = "4c4c4544-0042-3510-8051-b4c04f4e3132"


def talos_get(client: TestClient, **values: str):  # type: ignore[no-untyped-def]
    return client.get(talos_url(**values), headers=TALOS_HEADERS)


def _device(client: TestClient, ops: dict[str, str], mac: str = MAC) -> dict[str, object]:
    found = [d for d in client.get("/api/v1/devices", headers=ops).json() if d["mac_address"] == mac]
    assert len(found) == 1, found
    device: dict[str, object] = found[0]
    return device


def test_first_contact_registers_pending_and_refuses_with_the_seed_sentence(
    client: TestClient, ops: dict[str, str], bases: Path
) -> None:
    r = talos_get(client, mac=MAC, uuid=UUID, serial="SN-1", hostname="${hostname}")
    assert r.status_code == 403
    assert r.text.strip() == "Device not approved. Current status: pending"
    assert r.headers["content-type"].startswith("text/plain")
    dev = _device(client, ops)
    assert (dev["status"], dev["source"], dev["uuid"], dev["serial"], dev["last_ip"]) == (
        "pending",
        "config_fetch",
        UUID,
        "SN-1",
        "10.0.0.9",
    )


def test_talos_query_encoding_and_placeholders_are_understood(client: TestClient, ops: dict[str, str]) -> None:
    # Talos percent-encodes the colons and sends literal ${...} for variables it never resolved.
    r = client.get(
        "/api/v1/config/download?code=%24%7Bcode%7D&mac=52%3A54%3A00%3A12%3A34%3A56"
        "&serial=%24%7Bserial%7D&uuid=%24%7Buuid%7D",
        headers=TALOS_HEADERS,
    )
    assert r.status_code == 403
    dev = _device(client, ops)
    assert dev["uuid"] is None and dev["serial"] is None


def test_approved_device_gets_its_customized_config(
    client: TestClient, ops: dict[str, str], bases: Path, services: Services
) -> None:
    talos_get(client, mac=MAC, uuid=UUID)
    dev = _device(client, ops)
    r = client.post(
        f"/api/v1/devices/{dev['id']}/approve",
        json={"hostname": "node-01", "ip_address": "10.0.5.100/24", "role": "worker"},
        headers=ops,
    )
    assert r.status_code == 200

    r = talos_get(client, mac=MAC, uuid=UUID)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/yaml"
    docs = load_documents(r.content)
    validate_documents(docs)  # what Talos's strict loader would accept, per its own schema
    by_kind = {d.get("kind", "v1alpha1"): d for d in docs}
    assert by_kind["v1alpha1"]["machine"]["type"] == "worker"
    assert by_kind["HostnameConfig"]["hostname"] == "node-01"
    assert by_kind["HostnameConfig"]["auto"] == "off"
    alias = by_kind["LinkAliasConfig"]
    assert MAC in alias["selector"]["match"]
    assert by_kind["LinkConfig"]["name"] == alias["name"]
    assert by_kind["LinkConfig"]["addresses"] == [{"address": "10.0.5.100/24"}]

    after = client.get(f"/api/v1/devices/{dev['id']}", headers=ops).json()
    assert after["last_config_download"] is not None
    audit = client.get(f"/api/v1/audit?device_id={dev['id']}&action=config_download", headers=ops).json()
    assert audit["total"] == 1
    assert audit["items"][0]["actor_type"] == "device"


def test_controlplane_role_serves_the_controlplane_base(
    client: TestClient, ops: dict[str, str], admin: dict[str, str], bases: Path
) -> None:
    talos_get(client, mac=MAC)
    dev = _device(client, ops)
    client.post(f"/api/v1/devices/{dev['id']}/approve", json={"role": "controlplane"}, headers=admin)
    docs = load_documents(talos_get(client, mac=MAC).content)
    v1 = next(d for d in docs if "kind" not in d)
    assert v1["machine"]["type"] == "controlplane"
    assert v1["machine"]["ca"]["key"]  # a control plane carries the CA key: this is why approval matters


def test_rejected_device_is_refused_with_its_status(client: TestClient, ops: dict[str, str], bases: Path) -> None:
    talos_get(client, mac=MAC)
    dev = _device(client, ops)
    client.post(f"/api/v1/devices/{dev['id']}/reject", headers=ops)
    r = talos_get(client, mac=MAC)
    assert r.status_code == 403
    assert r.text.strip() == "Device not approved. Current status: rejected"


def test_revoked_device_stops_getting_its_config(client: TestClient, ops: dict[str, str], bases: Path) -> None:
    talos_get(client, mac=MAC)
    dev = _device(client, ops)
    client.post(f"/api/v1/devices/{dev['id']}/approve", headers=ops)
    assert talos_get(client, mac=MAC).status_code == 200
    client.post(f"/api/v1/devices/{dev['id']}/reject", headers=ops)
    assert talos_get(client, mac=MAC).status_code == 403


def test_no_base_config_is_503_with_instructions(client: TestClient, ops: dict[str, str]) -> None:
    talos_get(client, mac=MAC)
    dev = _device(client, ops)
    client.post(f"/api/v1/devices/{dev['id']}/approve", headers=ops)
    r = talos_get(client, mac=MAC)
    assert r.status_code == 503
    assert "ktizo cluster import-base worker" in r.text
    assert _device(client, ops)["last_config_download"] is None


def test_identity_binding_refuses_another_uuid_until_cleared(
    client: TestClient, ops: dict[str, str], bases: Path
) -> None:
    talos_get(client, mac=MAC, uuid=UUID, serial="SN-1")
    dev = _device(client, ops)
    client.post(f"/api/v1/devices/{dev['id']}/approve", headers=ops)
    other = "11111111-2222-3333-4444-555555555555"
    r = talos_get(client, mac=MAC, uuid=other, serial="SN-1")
    assert r.status_code == 403
    assert r.text.strip() == IDENTITY_REFUSED and UUID not in r.text and other not in r.text
    events = client.get(f"/api/v1/audit?device_id={dev['id']}&action=identity_mismatch", headers=ops).json()
    assert events["total"] == 1
    assert events["items"][0]["details"]["uuid"] == {"bound": UUID, "claimed": other}

    assert talos_get(client, mac=MAC, uuid=UUID, serial="SN-1").status_code == 200  # the real one still works
    client.post(f"/api/v1/devices/{dev['id']}/unbind", headers=ops)
    assert talos_get(client, mac=MAC, uuid=other, serial="SN-1").status_code == 200
    assert _device(client, ops)["uuid"] == other  # re-bound to what it reported next


def test_leaving_the_uuid_out_is_no_way_around_the_binding(
    client: TestClient, ops: dict[str, str], bases: Path, clock: ManualClock
) -> None:
    # On the test's clock: three refusals straddling a minute boundary would be two rows (seen in CI).
    talos_get(client, mac=MAC, uuid=UUID, serial="SN-1")
    dev = _device(client, ops)
    client.post(f"/api/v1/devices/{dev['id']}/approve", headers=ops)
    for unproven in (
        talos_get(client, mac=MAC),
        talos_get(client, mac=MAC, uuid="${uuid}", serial="SN-1"),
        client.post("/api/v1/config/download", json={"mac_address": MAC}),
    ):
        assert unproven.status_code == 403
        # The same words whichever factor failed, and nothing the machine reported: UUID and serial stay unknown.
        assert IDENTITY_REFUSED in unproven.text and "uuid=${uuid}" in unproven.text
        assert UUID not in unproven.text and "SN-1" not in unproven.text and "machine:" not in unproven.text
    events = client.get(f"/api/v1/audit?device_id={dev['id']}&action=identity_mismatch", headers=ops).json()
    # Operators see the detail; the three refusals of one minute are one row with a count.
    assert (events["total"], events["items"][0]["count"]) == (1, 3)
    assert events["items"][0]["details"]["uuid"] == {"bound": UUID, "claimed": None}
    assert talos_get(client, mac=MAC, uuid=UUID, serial="SN-1").status_code == 200
    client.post(f"/api/v1/devices/{dev['id']}/unbind", headers=ops)
    assert talos_get(client, mac=MAC).status_code == 200  # an operator cleared the binding: the MAC alone will do


def test_legacy_uuid_only_form_identifies_the_machine(client: TestClient, ops: dict[str, str], bases: Path) -> None:
    r = client.get(f"/api/v1/config/download?uuid={UUID}", headers=TALOS_HEADERS)
    assert r.status_code == 403
    devices = client.get("/api/v1/devices", headers=ops).json()
    assert [(d["mac_address"], d["uuid"]) for d in devices] == [(None, UUID)]
    client.post(f"/api/v1/devices/{devices[0]['id']}/approve", json={"hostname": "by-uuid"}, headers=ops)
    r = client.get(f"/api/v1/config/download?uuid={UUID}", headers=TALOS_HEADERS)
    assert r.status_code == 200
    assert "by-uuid" in r.text


def test_request_naming_no_machine_is_400_and_registers_nothing(client: TestClient, ops: dict[str, str]) -> None:
    r = client.get("/api/v1/config/download?mac=%24%7Bmac%7D", headers=TALOS_HEADERS)
    assert r.status_code == 400
    assert "mac=${mac}" in r.text
    r = client.get("/api/v1/config/download?mac=zz:zz", headers=TALOS_HEADERS)
    assert r.status_code == 400
    assert "not a MAC address" in r.text
    assert client.get("/api/v1/devices", headers=ops).json() == []


def test_seed_post_forms_register_and_download(client: TestClient, ops: dict[str, str], bases: Path) -> None:
    r = client.post("/api/v1/devices/register", json={"mac_address": "00:11:22:33:44:55"})
    assert (r.status_code, r.json()) == (201, {"mac_address": "00:11:22:33:44:55", "status": "pending"})
    again = client.post("/api/v1/devices/register", json={"mac_address": "00-11-22-33-44-55"})
    assert (again.status_code, again.json()) == (200, {"mac_address": "00:11:22:33:44:55", "status": "pending"})
    [registered] = client.get("/api/v1/devices", headers=ops).json()
    assert registered["source"] == "register"

    r = client.post("/api/v1/config/download", json={"mac_address": "00:11:22:33:44:55"})
    assert r.status_code == 403
    assert r.json() == {"detail": "Device not approved. Current status: pending"}
    client.post(f"/api/v1/devices/{registered['id']}/approve", json={"hostname": "seed-node"}, headers=ops)
    r = client.post("/api/v1/config/download", json={"mac_address": "00:11:22:33:44:55"})
    assert r.status_code == 200
    docs = {d.get("kind", "v1alpha1"): d for d in load_documents(r.content)}
    assert docs["HostnameConfig"]["hostname"] == "seed-node"


@pytest.mark.parametrize("version", ["v1.11", "v1.12", "v1.13"])
def test_served_config_matches_the_configured_talos_version(
    version: str, tmp_path: Path, database_url: str, bases: Path
) -> None:
    from ktizo.app import build_services, create_app
    from ktizo.domain.users import UserRole
    from ktizo.settings import Settings
    from tests.support import make_token

    settings = Settings(
        data_dir=bases.parent.parent, database_url=database_url, talos_version=version, long_poll_seconds=0
    )
    services = build_services(settings)
    with TestClient(create_app(settings, services)) as client:
        token = make_token(services, "v", UserRole.OPERATOR)
        talos_get(client, mac=MAC)
        dev = client.get("/api/v1/devices", headers={"Authorization": f"Bearer {token}"}).json()[0]
        client.post(
            f"/api/v1/devices/{dev['id']}/approve",
            json={"hostname": "n1", "ip_address": "10.0.0.5/24"},
            headers={"Authorization": f"Bearer {token}"},
        )
        docs = load_documents(talos_get(client, mac=MAC).content)
    services.db.dispose()
    validate_documents(docs)
    v1 = next(d for d in docs if "kind" not in d)
    kinds = {d.get("kind") for d in docs}
    if version == "v1.11":
        assert v1["machine"]["network"]["hostname"] == "n1"
        assert v1["machine"]["network"]["interfaces"][0]["deviceSelector"]["hardwareAddr"] == MAC
        assert v1["machine"]["network"]["interfaces"][0]["addresses"] == ["10.0.0.5/24"]
        assert "HostnameConfig" not in kinds
    else:
        assert "network" not in v1["machine"] or "hostname" not in v1["machine"]["network"]
        assert {"HostnameConfig", "LinkAliasConfig", "LinkConfig"} <= kinds


def test_rendered_config_is_cached_per_device_revision(
    client: TestClient, ops: dict[str, str], bases: Path, services: Services
) -> None:
    talos_get(client, mac=MAC)
    dev = _device(client, ops)
    client.post(f"/api/v1/devices/{dev['id']}/approve", json={"hostname": "a1"}, headers=ops)
    cache = services.boot.cache
    first = talos_get(client, mac=MAC).content
    second = talos_get(client, mac=MAC).content
    assert first == second
    assert cache.misses == 1  # rendered once (the second answer was remembered, or a cache hit)
    client.put(f"/api/v1/devices/{dev['id']}", json={"hostname": "a2"}, headers=ops)
    third = talos_get(client, mac=MAC).content
    assert b"a2" in third and cache.misses == 2
