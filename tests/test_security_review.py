"""Regression tests for the security review: one section per review item, each test naming the item it covers.

Every test states what a user (an operator, an attacker at an unauthenticated door, a machine booting) would see;
time moves only by the ``clock`` fixture."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from typer.testing import CliRunner

from ktizo.app import build_services
from ktizo.cli import app as cli_app
from ktizo.db.models import AuditEvent, AuditRetention, Device, DeviceCode
from ktizo.domain.addresses import client_address, parse_networks
from ktizo.domain.devices import IDENTITY_REFUSED, DeviceStatus, Role
from ktizo.domain.errors import Conflict, PermissionDenied, TooManyAttempts, Unauthenticated, ValidationFailed
from ktizo.domain.users import UserRole
from ktizo.services.audit import AuditQuery
from ktizo.services.bulk import BulkApproval
from ktizo.services.context import Actor
from ktizo.services.queries import DeviceChanges, DeviceQuery
from ktizo.services.registry import Services
from ktizo.services.transactions import transaction
from ktizo.services.users import LOGIN_FAILURES_PER_USER
from ktizo.settings import Settings
from ktizo.web.session import CSRF_FIELD, LOGIN_COOKIE, SESSION_COOKIE, csrf_token
from tests.clock import ManualClock
from tests.factories import approved, next_mac, pending, user
from tests.support import TALOS_HEADERS, bearer, talos_url

Make = Callable[..., tuple[TestClient, Services]]

UUID = "4c4c4544-0042-3510-8051-b4c04f4e3132"
OTHER_UUID = "11111111-2222-3333-4444-555555555555"
SERIAL = "SN-SECRET-77"
PASSWORD = "correct horse battery staple"
OPS = Actor.user("ops", UserRole.OPERATOR, "10.0.0.9")
ROOT = Actor.user("root", UserRole.ADMIN, "10.0.0.9")
ADMIN_ONLY = "needs the admin role"

# A patch with a registry password in it (a path redact.SECRET_FIELDS names), and one with nothing secret, written
# the way a person writes YAML (a comment, quoting): shown to operators byte for byte.
SECRET_PATCH = (
    "machine:\n  registries:\n    config:\n      reg.example:\n        auth:\n"
    "          username: puller\n          password: hunter2hunter2\n"
)
SECRET_PATCH_2 = SECRET_PATCH.replace("hunter2hunter2", "hunter3hunter3")
PLAIN_PATCH = '# rack labels\nmachine:\n  nodeLabels:\n    site: "vault-b"   # the basement\n'
REDACTED = "***redacted***"


def _device(client: TestClient, headers: dict[str, str], device_id: int) -> dict[str, Any]:
    r = client.get(f"/api/v1/devices/{device_id}", headers=headers)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _audit(client: TestClient, headers: dict[str, str], action: str, **query: object) -> list[dict[str, Any]]:
    params = "".join(f"&{k}={v}" for k, v in query.items())
    r = client.get(f"/api/v1/audit?action={action}{params}", headers=headers)
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def _denied(r: Any) -> None:
    """An operator refused for a controlplane: 403, and the answer says an admin is needed."""
    assert r.status_code == 403, r.text
    assert ADMIN_ONLY in r.json()["detail"], r.text


def _race(n: int, work: Callable[[int], Any]) -> list[tuple[str, Any]]:
    """Run ``work(0..n-1)`` in ``n`` threads released at once; each outcome is ("ok", result), ("conflict", the
    field the Conflict names) or ("error", what else was raised)."""
    barrier = threading.Barrier(n)

    def run(i: int) -> tuple[str, Any]:
        barrier.wait()
        try:
            return "ok", work(i)
        except Conflict as exc:
            return "conflict", exc.field
        except Exception as exc:
            return "error", f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def _raw_audit(services: Services, *actions: str) -> list[AuditEvent]:
    """Audit rows as stored (the audit service's listing scrubs old rows on display; this is what is kept)."""
    with services.db.read() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action.in_(actions)).order_by(AuditEvent.id)))


def _session(client: TestClient, token: str) -> dict[str, str]:
    """Sign the test client's browser in with ``token`` as its UI session; returns the CSRF form field."""
    client.cookies.set(SESSION_COOKIE, token, path="/ui")
    return {CSRF_FIELD: csrf_token(token)}


def _sql_approve(services: Services, device_id: int, **values: str) -> None:
    """Approve a device by plain SQL, past every check of the service."""
    with services.db.write() as s:
        s.execute(update(Device).where(Device.id == device_id).values(status="approved", **values))


def _orm_approve(services: Services, device_id: int, **values: str) -> None:
    """Approve a device through the model (which lower-cases the hostname and derives the static IP), past the
    service's checks."""
    with services.db.write() as s:
        row = s.get(Device, device_id)
        assert row is not None
        row.status = "approved"
        for key, value in values.items():
            setattr(row, key, value)
        s.flush()


def _in_request(work: Callable[[], None]) -> None:
    """``work`` inside an edge's transaction, as an API request, a CLI command or a job runs it."""
    with transaction():
        work()


# == Review item 1: identity refusals leak nothing ==============================================================


def test_identity_refusals_are_one_answer_that_tells_nothing_about_the_machine(
    client: TestClient, make_client: Make, ops: dict[str, str], services: Services, bases: Path, clock: ManualClock
) -> None:
    """Review item 1: a caller who names a MAC without proving the machine learns nothing of what it is bound to."""
    mac = next_mac()
    lease = "10.0.0.77"
    hostname, notes = "vault-node-1", "rack 7, under the stairs"
    r = client.get(talos_url(mac=mac, uuid=UUID, serial=SERIAL), headers=TALOS_HEADERS)
    assert (r.status_code, r.text) == (403, "Device not approved. Current status: pending\n")
    device_id = services.devices.resolve(mac).id
    assert client.put(f"/api/v1/devices/{device_id}", json={"patch": PLAIN_PATCH}, headers=ops).status_code == 200
    r = client.post(f"/api/v1/devices/{device_id}/approve", json={"hostname": hostname, "notes": notes}, headers=ops)
    assert r.status_code == 200, r.text
    with services.db.write() as s:
        s.execute(update(Device).where(Device.id == device_id).values(lease_ip=lease))
    secrets = (UUID, UUID.upper(), SERIAL, hostname, notes, lease, "vault-b")
    # The machine itself, repeating what it is bound to, gets its config.
    r = client.get(talos_url(mac=mac, uuid=UUID, serial=SERIAL), headers=TALOS_HEADERS)
    assert r.status_code == 200 and hostname in r.text

    def refused_as_text(r: Any) -> None:
        assert r.status_code == 403
        assert r.headers["content-type"].startswith("text/plain")
        assert r.text == IDENTITY_REFUSED + "\n"
        assert not [s for s in secrets if s in r.text]

    # Each refusal in a minute of its own: the first refusal of a minute is the audit row with its detail.
    clock.advance(60)
    refused_as_text(client.get(talos_url(mac=mac), headers=TALOS_HEADERS))  # the MAC alone
    clock.advance(60)
    refused_as_text(client.get(talos_url(mac=mac, uuid=OTHER_UUID, serial=SERIAL), headers=TALOS_HEADERS))
    clock.advance(60)
    r = client.post("/api/v1/config/download", json={"mac_address": mac})  # the seed's form names only the MAC
    assert (r.status_code, r.json()) == (403, {"detail": IDENTITY_REFUSED})
    assert not [s for s in secrets if s in r.text]
    leased, _ = make_client(require_lease_ip=True)
    clock.advance(60)
    refused_as_text(leased.get(talos_url(mac=mac, uuid=UUID, serial=SERIAL), headers=TALOS_HEADERS))  # not the lease
    from_lease = TestClient(leased.app, client=(lease, 4000))
    assert from_lease.get(talos_url(mac=mac, uuid=UUID, serial=SERIAL), headers=TALOS_HEADERS).status_code == 200

    # The register door answers the MAC named and the state, nothing else.
    r = client.post("/api/v1/devices/register", json={"mac_address": mac})
    assert (r.status_code, r.json()) == (200, {"mac_address": mac, "status": "approved"})

    # Operators find the detail in the audit log.
    items = _audit(client, ops, "identity_mismatch", device_id=device_id)
    details = [{k: v for k, v in item["details"].items() if k != "door"} for item in reversed(items)]
    assert details == [
        {"uuid": {"bound": UUID, "claimed": None}},
        {"uuid": {"bound": UUID, "claimed": OTHER_UUID}},
        {"uuid": {"bound": UUID, "claimed": None}},
        {"lease_ip": {"bound": lease, "claimed": "10.0.0.9"}},
    ]
    assert _device(client, ops, device_id)["uuid"] == UUID  # nothing was re-bound by the refused requests


# == Review item 4: control planes are an admin's decision ======================================================


def test_operators_cannot_create_or_approve_a_controlplane(
    client: TestClient, ops: dict[str, str], admin: dict[str, str], services: Services
) -> None:
    """Review item 4: pre-registering a controlplane, approving a worker as one, approving one an admin
    pre-registered: each 403 for an operator, with nothing changed; an admin does each, and it is audited."""
    mac = next_mac()
    _denied(client.post("/api/v1/devices", json={"mac_address": mac, "role": "controlplane"}, headers=ops))
    assert client.get(f"/api/v1/devices?q={mac}", headers=ops).json() == []

    worker = pending(services)
    r = client.post(
        f"/api/v1/devices/{worker.id}/approve", json={"role": "controlplane", "hostname": "cp-1"}, headers=ops
    )
    _denied(r)
    dev = _device(client, ops, worker.id)
    assert (dev["status"], dev["role"], dev["hostname"], dev["revision"]) == (
        "pending",
        "worker",
        None,
        worker.revision,
    )

    r = client.post("/api/v1/devices", json={"mac_address": next_mac(), "role": "controlplane"}, headers=admin)
    assert r.status_code == 201, r.text
    cp_id = r.json()["id"]
    _denied(client.post(f"/api/v1/devices/{cp_id}/approve", json={}, headers=ops))
    _denied(client.post(f"/api/v1/devices/{cp_id}/approve", json={"role": "worker"}, headers=ops))
    assert (_device(client, ops, cp_id)["status"], _device(client, ops, cp_id)["role"]) == ("pending", "controlplane")
    assert _audit(client, ops, "approve") == [] and _audit(client, ops, "secrets_release") == []

    r = client.post(f"/api/v1/devices/{cp_id}/approve", json={"hostname": "cp-2"}, headers=admin)
    assert (r.status_code, r.json()["status"], r.json()["role"]) == (200, "approved", "controlplane")
    r = client.post(f"/api/v1/devices/{worker.id}/approve", json={"role": "controlplane"}, headers=admin)
    assert (r.status_code, r.json()["status"], r.json()["role"]) == (200, "approved", "controlplane")
    released = _audit(client, ops, "secrets_release")
    assert sorted(e["device_id"] for e in released) == sorted([cp_id, worker.id])
    assert {e["actor"] for e in released} == {"root"}


def test_operators_cannot_change_an_approved_controlplane(
    client: TestClient, ops: dict[str, str], admin: dict[str, str], services: Services, bases: Path
) -> None:
    """Review item 4: editing an approved controlplane (hostname, patch), re-roling a worker to controlplane and
    unbinding a controlplane are refused to operators and leave the device as it was; an admin may."""
    cp = approved(services, role="controlplane", hostname="cp-1", uuid=UUID)
    worker = approved(services, hostname="w-1")
    _denied(client.put(f"/api/v1/devices/{cp.id}", json={"hostname": "cp-9"}, headers=ops))
    _denied(client.put(f"/api/v1/devices/{cp.id}", json={"patch": PLAIN_PATCH}, headers=ops))
    _denied(client.post(f"/api/v1/devices/{cp.id}/unbind", headers=ops))
    _denied(client.put(f"/api/v1/devices/{worker.id}", json={"role": "controlplane"}, headers=ops))
    dev = _device(client, ops, cp.id)
    assert (dev["hostname"], dev["patch"], dev["uuid"], dev["revision"]) == ("cp-1", None, UUID, cp.revision)
    dev = _device(client, ops, worker.id)
    assert (dev["role"], dev["revision"]) == ("worker", worker.revision)

    r = client.put(f"/api/v1/devices/{cp.id}", json={"hostname": "cp-9", "patch": PLAIN_PATCH}, headers=admin)
    assert (r.status_code, r.json()["hostname"], r.json()["patch"]) == (200, "cp-9", PLAIN_PATCH)
    r = client.post(f"/api/v1/devices/{cp.id}/unbind", headers=admin)
    assert (r.status_code, r.json()["uuid"]) == (200, None)
    r = client.put(f"/api/v1/devices/{worker.id}", json={"role": "controlplane"}, headers=admin)
    assert (r.status_code, r.json()["role"]) == (200, "controlplane")


def test_operators_cannot_bulk_approve_controlplanes(services: Services) -> None:
    """Review item 4: a bulk approval as controlplanes is refused to an operator, every device staying pending."""
    ids = tuple(pending(services).id for _ in range(3))
    with pytest.raises(PermissionDenied, match=ADMIN_ONLY):
        services.bulk.approve(OPS, BulkApproval(ids, "cp-{n}", role=Role.CONTROLPLANE))
    assert [services.devices.get(i).status for i in ids] == ["pending"] * 3
    assert services.audit.list(AuditQuery(action="approve"))[1] == 0

    plan = services.bulk.approve(ROOT, BulkApproval(ids, "cp-{n}", role=Role.CONTROLPLANE))
    assert [(a.hostname, a.role) for a in plan.assignments] == [(f"cp-{n}", "controlplane") for n in (1, 2, 3)]
    assert {services.devices.get(i).status for i in ids} == {"approved"}
    released, total = services.audit.list(AuditQuery(action="secrets_release"))
    assert total == 3 and {e.device_id for e in released} == set(ids)


def test_operators_cannot_approve_a_controlplane_by_console_code(
    make_client: Make, ops: dict[str, str], admin: dict[str, str]
) -> None:
    """Review item 4: the console-code approval is the same approval: no controlplane for an operator."""
    site, _ = make_client(oauth_enabled=True)
    form = {"client_id": "ktizo", "scope": "openid", "uuid": UUID, "serial": "SN-1"}
    r = site.post("/device/code", data={**form, "mac": next_mac()})
    assert r.status_code == 200, r.text
    code = r.json()["user_code"]
    _denied(site.post(f"/api/v1/device-codes/{code}/approve", json={"role": "controlplane"}, headers=ops))
    # The code is still waiting (a code already used would be "no machine is waiting"), its device still pending.
    r = site.get(f"/api/v1/device-codes/{code}", headers=ops)
    assert (r.status_code, r.json()["status"], r.json()["role"]) == (200, "pending", "worker")

    # A machine an admin pre-registered as a controlplane: its code is not an operator's either.
    cp_mac = next_mac()
    assert site.post("/api/v1/devices", json={"mac_address": cp_mac, "role": "controlplane"}, headers=admin).is_success
    cp_code = site.post("/device/code", data={**form, "uuid": OTHER_UUID, "mac": cp_mac}).json()["user_code"]
    _denied(site.post(f"/api/v1/device-codes/{cp_code}/approve", json={}, headers=ops))
    assert site.get(f"/api/v1/device-codes/{cp_code}", headers=ops).json()["status"] == "pending"

    r = site.post(f"/api/v1/device-codes/{code}/approve", json={"role": "controlplane"}, headers=admin)
    assert (r.status_code, r.json()["status"], r.json()["role"]) == (200, "approved", "controlplane")
    assert [e["device_id"] for e in _audit(site, ops, "secrets_release")] == [r.json()["id"]]


def test_operators_still_approve_edit_and_reject_workers(
    client: TestClient, ops: dict[str, str], services: Services, bases: Path
) -> None:
    """Review item 4: workers stay an operator's job."""
    worker = pending(services)
    r = client.post(f"/api/v1/devices/{worker.id}/approve", json={"hostname": "w-1", "role": "worker"}, headers=ops)
    assert (r.status_code, r.json()["status"], r.json()["approved_by"]) == (200, "approved", "ops")
    r = client.put(f"/api/v1/devices/{worker.id}", json={"hostname": "w-2", "patch": PLAIN_PATCH}, headers=ops)
    assert (r.status_code, r.json()["hostname"], r.json()["patch"]) == (200, "w-2", PLAIN_PATCH)
    r = client.post(f"/api/v1/devices/{worker.id}/reject", json={"notes": "retired"}, headers=ops)
    assert (r.status_code, r.json()["status"], r.json()["notes"]) == (200, "rejected", "retired")
    assert _audit(client, ops, "secrets_release") == []


# == Review item 5: patches redacted below admin ================================================================


def test_patches_are_redacted_below_admin_and_never_audited(
    client: TestClient,
    ops: dict[str, str],
    admin: dict[str, str],
    viewer_token: str,
    services: Services,
    bases: Path,
) -> None:
    """Review item 5: a secret in a device or group patch is shown only to admins; the audit keeps only a digest."""
    viewer = bearer(viewer_token)
    r = client.post("/api/v1/devices", json={"mac_address": next_mac(), "patch": SECRET_PATCH}, headers=ops)
    assert r.status_code == 201, r.text
    assert "hunter2hunter2" not in r.text and REDACTED in r.json()["patch"]  # not even in the creator's answer
    device_id = r.json()["id"]
    r = client.post("/api/v1/groups", json={"name": "registry", "patch": SECRET_PATCH}, headers=admin)
    assert r.status_code == 201, r.text

    def patches(headers: dict[str, str]) -> list[str]:
        listed = [d for d in client.get("/api/v1/devices", headers=headers).json() if d["id"] == device_id]
        groups = [g for g in client.get("/api/v1/groups", headers=headers).json() if g["name"] == "registry"]
        return [
            _device(client, headers, device_id)["patch"],
            listed[0]["patch"],
            groups[0]["patch"],
            client.get("/api/v1/groups/registry", headers=headers).json()["patch"],
        ]

    for headers in (viewer, ops):
        for shown in patches(headers):
            assert "hunter2hunter2" not in shown
            assert REDACTED in shown and "reg.example" in shown and "puller" in shown
    assert patches(admin) == [SECRET_PATCH] * 4

    # Nothing secret: the text as written, comments and quoting included.
    plain = client.post("/api/v1/devices", json={"mac_address": next_mac(), "patch": PLAIN_PATCH}, headers=ops)
    assert plain.status_code == 201, plain.text
    assert _device(client, ops, plain.json()["id"])["patch"] == PLAIN_PATCH
    assert _device(client, viewer, plain.json()["id"])["patch"] == PLAIN_PATCH

    assert client.put(f"/api/v1/devices/{device_id}", json={"patch": SECRET_PATCH_2}, headers=ops).status_code == 200
    assert client.put("/api/v1/groups/registry", json={"patch": SECRET_PATCH_2}, headers=admin).status_code == 200
    rows = _raw_audit(services, "create", "update", "group_create", "group_update")
    assert {r.action for r in rows} == {"create", "update", "group_create", "group_update"}
    summary = re.compile(r"patch \(\d+ bytes, sha256 [0-9a-f]{16}…\)")
    for row in rows:
        stored = json.dumps(row.details, ensure_ascii=False)
        assert "hunter2hunter2" not in stored and "hunter3hunter3" not in stored and "registries" not in stored
        assert "vault-b" not in stored
        assert summary.search(stored), stored
    sizes = {f"patch ({len(p.encode())} bytes, sha256 " for p in (SECRET_PATCH, SECRET_PATCH_2, PLAIN_PATCH)}
    assert all(any(size in json.dumps(r.details, ensure_ascii=False) for size in sizes) for r in rows)


# == Review item 6: approved hostnames and static IPs are unique in the database =================================


@pytest.mark.parametrize("threads", [2, 8])
def test_concurrent_approvals_with_one_hostname_leave_exactly_one(services: Services, threads: int) -> None:
    """Review item 6: approvals racing for one hostname: one wins, every other is a Conflict naming the field."""
    ids = [pending(services).id for _ in range(threads)]
    outcomes = _race(threads, lambda i: services.devices.approve(OPS, ids[i], DeviceChanges(hostname="node-1")).id)
    assert sorted(kind for kind, _ in outcomes) == ["conflict"] * (threads - 1) + ["ok"], outcomes
    assert {value for kind, value in outcomes if kind == "conflict"} == {"hostname"}
    rows, total = services.devices.list(DeviceQuery(status=DeviceStatus.APPROVED))
    assert total == 1 and rows[0].hostname == "node-1"
    assert [rows[0].id] == [value for kind, value in outcomes if kind == "ok"]


@pytest.mark.parametrize("threads", [2, 8])
def test_concurrent_approvals_with_one_static_ip_leave_exactly_one(services: Services, threads: int) -> None:
    """Review item 6: the same address with another prefix length is the same address."""
    ids = [pending(services).id for _ in range(threads)]
    prefixes = ("24", "16")

    def approve(i: int) -> int:
        changes = DeviceChanges(hostname=f"node-{i}", ip_address=f"10.0.5.7/{prefixes[i % 2]}")
        return services.devices.approve(OPS, ids[i], changes).id

    outcomes = _race(threads, approve)
    assert sorted(kind for kind, _ in outcomes) == ["conflict"] * (threads - 1) + ["ok"], outcomes
    assert {value for kind, value in outcomes if kind == "conflict"} == {"ip_address"}
    rows, total = services.devices.list(DeviceQuery(status=DeviceStatus.APPROVED))
    assert total == 1 and (rows[0].ip_address or "").startswith("10.0.5.7/")


def test_the_database_refuses_a_duplicate_past_the_services_check(services: Services) -> None:
    """Review item 6: with the service's pre-check bypassed (plain SQL, the ORM), the database itself refuses a
    second approved machine with a hostname, a hostname in other case, or a static IP."""
    holder = approved(services, hostname="node-1", ip_address="10.0.5.7/24")
    other = pending(services)
    with pytest.raises((IntegrityError, Conflict)):
        _sql_approve(services, other.id, hostname="node-1")
    with pytest.raises((IntegrityError, Conflict)):
        _orm_approve(services, other.id, hostname="NODE-1")  # the model stores it lower-cased: the same name
    with pytest.raises((IntegrityError, Conflict)):
        _orm_approve(services, other.id, hostname="node-2", ip_address="10.0.5.7/16")
    assert (services.devices.get(other.id).status, services.devices.get(other.id).hostname) == ("pending", None)
    assert services.devices.get(holder.id).hostname == "node-1"


def test_a_service_call_racing_past_the_precheck_gets_a_conflict(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review item 6: what two replicas racing past the pre-check amount to, made deterministic: the second
    approval is refused by the constraint, and a caller of the service (a script, a hook, a test calling it
    outside a request) gets the same Conflict naming the field as a request would, not a driver's IntegrityError."""
    first, second = pending(services), pending(services)
    monkeypatch.setattr("ktizo.services.devices._ensure_name_and_address_free", lambda *_args: None)
    services.devices.approve(OPS, first.id, DeviceChanges(hostname="node-1"))
    outcome = _race(1, lambda _: services.devices.approve(OPS, second.id, DeviceChanges(hostname="node-1")))
    assert outcome == [("conflict", "hostname")]
    assert services.devices.get(second.id).status == "pending"


def test_the_databases_refusal_names_the_field(services: Services) -> None:
    """Review item 6: inside a request's transaction a constraint the pre-check missed (two replicas racing) is a
    Conflict naming the field, so the API's 409 and the UI's form can say which field clashes."""
    approved(services, hostname="node-1", ip_address="10.0.5.7/24")
    other = pending(services)
    with pytest.raises(Conflict) as by_name:
        _in_request(lambda: _sql_approve(services, other.id, hostname="node-1"))
    assert by_name.value.field == "hostname", by_name.value.message
    with pytest.raises(Conflict) as by_address:
        _in_request(lambda: _orm_approve(services, other.id, hostname="node-2", ip_address="10.0.5.7/16"))
    assert by_address.value.field == "ip_address", by_address.value.message
    assert services.devices.get(other.id).status == "pending"


def test_hostnames_differing_in_case_are_one_name_and_rejection_frees_it(services: Services) -> None:
    """Review item 6: "Node-1" and "node-1" are one name; a rejected machine gives its name and address back."""
    first = approved(services, hostname="Node-1", ip_address="10.0.5.7/24")
    assert first.hostname == "node-1"
    second = pending(services)
    with pytest.raises(Conflict) as caught:
        services.devices.approve(OPS, second.id, DeviceChanges(hostname="node-1"))
    assert caught.value.field == "hostname" and f"approved device {first.id}" in caught.value.message
    with pytest.raises(Conflict) as caught:
        services.devices.approve(OPS, second.id, DeviceChanges(hostname="NODE-1.", ip_address="10.0.5.8/24"))
    assert caught.value.field == "hostname"
    assert services.devices.get(second.id).status == "pending"

    services.devices.reject(OPS, first.id, "failed disk")
    done = services.devices.approve(OPS, second.id, DeviceChanges(hostname="NODE-1", ip_address="10.0.5.7/16"))
    assert (done.status, done.hostname, done.ip_address) == ("approved", "node-1", "10.0.5.7/16")


# == Review item 7: hammering a door does not flood the audit log ===============================================


def test_a_flood_of_failed_sign_ins_is_counted_not_logged(services: Services, clock: ManualClock) -> None:
    """Review item 7: 200 wrong passwords in a minute are a row or two with their count."""
    services.users.create(Actor.system(), "root", UserRole.ADMIN, PASSWORD)
    refused = []
    for _ in range(200):
        with pytest.raises((Unauthenticated, TooManyAttempts)) as caught:
            services.users.authenticate("root", "wrong password!", "10.0.0.66")
        refused.append(type(caught.value))
    assert refused.count(Unauthenticated) == LOGIN_FAILURES_PER_USER
    events, total = services.audit.list(AuditQuery(action="login_failed"))
    assert total <= 2 and sum(e.count for e in events) == 200
    assert {(e.actor, e.source_ip) for e in events} == {("root", "10.0.0.66")}


def test_a_flood_of_identity_mismatches_is_counted_not_logged(
    client: TestClient, services: Services, clock: ManualClock
) -> None:
    """Review item 7: 200 requests naming a bound MAC with another UUID are a row or two with their count."""
    device = pending(services, uuid=UUID)
    for i in range(200):
        other = f"11111111-2222-3333-4444-{i:012d}"
        r = client.get(talos_url(mac=device.mac_address or "", uuid=other), headers=TALOS_HEADERS)
        assert (r.status_code, r.text) == (403, IDENTITY_REFUSED + "\n")
    events, total = services.audit.list(AuditQuery(action="identity_mismatch"))
    assert total <= 2 and sum(e.count for e in events) == 200
    assert services.devices.get(device.id).uuid == UUID


def test_a_flood_of_console_code_requests_keeps_three_codes_and_one_row_a_minute(
    make_client: Make, clock: ManualClock
) -> None:
    """Review item 7: asking for console codes in a loop for one MAC neither piles up codes nor audit rows."""
    site, services = make_client(oauth_enabled=True)
    mac = next_mac()
    form = {"client_id": "ktizo", "scope": "openid", "mac": mac, "uuid": UUID}
    codes = []
    for _ in range(100):
        r = site.post("/device/code", data=form)
        assert r.status_code == 200, r.text
        codes.append(r.json()["user_code"])
    device_id = services.devices.resolve(mac).id
    with services.db.read() as s:
        rows = s.execute(select(DeviceCode.user_code, DeviceCode.status).where(DeviceCode.device_id == device_id)).all()
    statuses = dict(rows)
    assert sorted(code for code, st in statuses.items() if st == "pending") == sorted(codes[-3:])
    assert sorted(statuses.values()) == ["expired"] * 97 + ["pending"] * 3
    events, total = services.audit.list(AuditQuery(action="device_code"))
    assert total == 1 and events[0].count == 100
    # An old code no longer names a waiting machine.
    assert services.devices.get(device_id).status == "pending"

    clock.advance(60)
    assert site.post("/device/code", data=form).status_code == 200
    events, total = services.audit.list(AuditQuery(action="device_code"))
    assert total == 2 and [e.count for e in events] == [1, 100]


@contextmanager
def _restored_prune_before(services: Services) -> Iterator[None]:
    """The retention mark lives in a table the PostgreSQL fixture does not reset: put it back for the next test."""
    with services.db.read() as s:
        before = s.scalar(select(AuditRetention.prune_before).where(AuditRetention.id == 1))
    try:
        yield
    finally:
        with services.db.write() as s:
            s.execute(update(AuditRetention).where(AuditRetention.id == 1).values(prune_before=before))


def test_retention_prunes_old_audit_rows_and_nothing_else_deletes(
    tmp_path: Path, database_url: str, clock: ManualClock
) -> None:
    """Review item 7: with a day's retention the job deletes rows older than a day and records how many; the
    audit log stays append-only for everyone else."""
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        last_seen_interval=0,
        long_poll_seconds=0,
        audit_retention_days=1,
    )
    services = build_services(settings)
    try:
        with _restored_prune_before(services):
            for _ in range(3):
                pending(services)
            old, n_old = services.audit.list(AuditQuery())
            assert n_old == 3
            clock.advance(days=2)
            new = pending(services)
            assert services.housekeeping.prune_audit() == 3
            left, _ = services.audit.list(AuditQuery())
            assert [(e.action, e.device_id) for e in left] == [("audit_prune", None), ("register", new.id)]
            assert left[0].details["deleted"] == 3 and left[0].details["retention_days"] == 1
            assert not {e.id for e in old} & {e.id for e in left}

            with pytest.raises(DBAPIError, match="append-only"), services.db.write() as s:
                s.execute(text("DELETE FROM audit_events WHERE id = :id"), {"id": left[1].id})
            assert services.audit.list(AuditQuery())[1] == 2
    finally:
        services.db.dispose()


def test_housekeeping_deletes_console_codes_expired_long_ago(
    tmp_path: Path, database_url: str, clock: ManualClock
) -> None:
    """Review item 7: console codes that can no longer matter are deleted, fresh ones stay."""
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        last_seen_interval=0,
        long_poll_seconds=0,
        oauth_enabled=True,
    )
    services = build_services(settings)
    form = {"client_id": "ktizo", "scope": "openid"}
    try:
        old = services.device_flow.start({**form, "mac": next_mac()}, "http://ktizo", "10.0.0.9")["user_code"]
        clock.advance(hours=4)  # past the code's 30 minutes and a token's 3 hours
        fresh = services.device_flow.start({**form, "mac": next_mac()}, "http://ktizo", "10.0.0.9")["user_code"]
        assert services.housekeeping.expire_device_codes() == 1
        with services.db.read() as s:
            left = dict(s.execute(select(DeviceCode.user_code, DeviceCode.status)).all())
        assert left == {fresh: "pending"} and old not in left
    finally:
        services.db.dispose()


# == Review item 8: the new-machine budget counts by first address ==============================================


def test_retouching_machines_from_another_address_frees_no_budget(make_client: Make, clock: ManualClock) -> None:
    """Review item 8: three new MACs from A; the same MACs touched from B; A still may not bring a fourth this
    minute, and may a minute later."""
    client, _ = make_client(new_devices_per_minute=3)
    a = TestClient(client.app, client=("10.0.0.21", 1))
    b = TestClient(client.app, client=("10.0.0.22", 1))
    macs = [next_mac() for _ in range(4)]
    for mac in macs[:3]:
        r = a.post("/api/v1/devices/register", json={"mac_address": mac})
        assert (r.status_code, r.json()) == (201, {"mac_address": mac, "status": "pending"})
    for mac in macs[:3]:
        assert b.post("/api/v1/devices/register", json={"mac_address": mac}).status_code == 200
        assert b.get(talos_url(mac=mac), headers=TALOS_HEADERS).status_code == 403
    r = a.post("/api/v1/devices/register", json={"mac_address": macs[3]})
    assert r.status_code == 429
    assert r.json()["detail"].startswith("too many new machines from 10.0.0.21 in the last minute (3)")
    assert 1 <= int(r.headers["Retry-After"]) <= 61
    r = a.get(talos_url(mac=macs[3]), headers=TALOS_HEADERS)
    assert r.status_code == 429 and "Retry-After" in r.headers

    clock.advance(61)
    r = a.post("/api/v1/devices/register", json={"mac_address": macs[3]})
    assert (r.status_code, r.json()) == (201, {"mac_address": macs[3], "status": "pending"})


# == Review item 9: the database is private to its owner ========================================================


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.sqlite_only
def test_db_upgrade_makes_a_private_data_dir_and_warns_about_a_readable_file(tmp_path: Path) -> None:
    """Review item 9: `ktizo db upgrade` on a new data dir makes it 0700 and the database 0600 whatever the umask;
    the WAL files follow; a database file opened to others is reported with the chmod that fixes it."""
    data = tmp_path / "fresh" / "data"
    runner = CliRunner()
    env: dict[str, str | None] = {"KTIZO_DATA_DIR": None, "KTIZO_DATABASE_URL": None}
    previous = os.umask(0o022)
    try:
        r = runner.invoke(cli_app, ["--data-dir", str(data), "db", "upgrade"], env=env)
    finally:
        os.umask(previous)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"created the database at sqlite:///{data / 'ktizo.db'}")
    assert "warning:" not in r.stderr
    db_file = data / "ktizo.db"
    assert (_mode(data), _mode(db_file)) == (0o700, 0o600)

    settings = Settings(data_dir=data, last_seen_interval=0, long_poll_seconds=0)
    services = build_services(settings)
    try:
        pending(services)  # a write: the WAL and its index exist now
        for suffix in ("-wal", "-shm"):
            side = data / f"ktizo.db{suffix}"
            if side.exists():
                assert _mode(side) == 0o600, suffix
        assert services.db.exposure() == []
        db_file.chmod(0o644)
        problems = services.db.exposure()
        assert [p for p in problems if str(db_file) in p and "mode 644" in p and f"chmod 600 {db_file}" in p]
    finally:
        services.db.dispose()

    r = runner.invoke(cli_app, ["--data-dir", str(data), "db", "upgrade"], env=env)
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert warnings and f"chmod 600 {db_file}" in warnings[0]


# == Review item 10: client addresses behind proxies, sessions, cookies, concurrent sign-ins =====================

TRUSTED = parse_networks(["10.0.0.0/24"])


@pytest.mark.parametrize(
    ("peer", "forwarded", "xff", "expected"),
    [
        ("10.0.0.9", None, "203.0.113.7", "203.0.113.7"),
        ("192.0.2.50", None, "203.0.113.7", "192.0.2.50"),  # not a trusted proxy: its header means nothing
        ("10.0.0.9", None, "1.2.3.4, 203.0.113.7", "203.0.113.7"),  # the client's own left part is ignored
        ("10.0.0.9", None, "1.2.3.4, 203.0.113.7, 10.0.0.5", "203.0.113.7"),  # through two trusted proxies
        ("10.0.0.9", None, "203.0.113.7:4711", "203.0.113.7"),
        ("10.0.0.9", None, "1.2.3.4, unknown", "10.0.0.9"),  # a hop nobody can attribute: the proxy is all we know
        ("10.0.0.9", None, "garbage", "10.0.0.9"),
        ("10.0.0.9", None, None, "10.0.0.9"),
        ("10.0.0.9", 'for="[2001:db8::7]:4711"', None, "2001:db8::7"),
        ("10.0.0.9", "for=192.0.2.60;proto=https, for=10.0.0.3", None, "192.0.2.60"),
        ("10.0.0.9", "For=198.51.100.17", None, "198.51.100.17"),  # a proxy sending only Forwarded
        ("10.0.0.9", 'for="_hidden", for=203.0.113.9', None, "203.0.113.9"),
        (None, None, "203.0.113.7", None),
    ],
)
def test_client_address_walks_the_chain_from_the_right(
    peer: str | None, forwarded: str | None, xff: str | None, expected: str | None
) -> None:
    """Review item 10a: the address a request is attributed to, as a pure function."""
    assert client_address(peer, forwarded, xff, TRUSTED) == expected


def test_client_address_trusts_no_header_without_trusted_proxies() -> None:
    """Review item 10a: with no trusted proxies configured the peer is the client, whatever the headers say."""
    assert client_address("10.0.0.9", "for=203.0.113.7", "203.0.113.7", ()) == "10.0.0.9"
    assert client_address("2001:db8::1", None, "203.0.113.7", parse_networks(["2001:db8::/64"])) == "203.0.113.7"
    assert ipaddress.ip_address(client_address("10.0.0.9", "for=[2001:DB8::7]", None, TRUSTED) or "") == (
        ipaddress.ip_address("2001:db8::7")
    )


def _last_ip(services: Services, mac: str) -> str | None:
    device = services.devices.resolve(mac)
    return device.last_ip


def test_requests_through_a_trusted_proxy_are_attributed_to_the_client(make_client: Make, ops: dict[str, str]) -> None:
    """Review item 10a: the register door, the budget and the audit see the address the proxy names; the same
    header from anyone else is ignored."""
    client, services = make_client(trusted_proxies=["10.0.0.0/24"], new_devices_per_minute=1)
    services.users.create(Actor.system(), "root", UserRole.ADMIN, PASSWORD)
    mac = next_mac()
    r = client.post("/api/v1/devices/register", json={"mac_address": mac}, headers={"X-Forwarded-For": "203.0.113.7"})
    assert r.status_code == 201
    assert services.devices.resolve(mac).first_ip == "203.0.113.7"
    # The budget is that client's: a second machine of 203.0.113.7 waits, another client behind the proxy does not.
    r = client.post(
        "/api/v1/devices/register", json={"mac_address": next_mac()}, headers={"X-Forwarded-For": "203.0.113.7"}
    )
    assert r.status_code == 429 and r.json()["detail"].startswith("too many new machines from 203.0.113.7 ")
    other = next_mac()
    r = client.post(
        "/api/v1/devices/register", json={"mac_address": other}, headers={"X-Forwarded-For": "1.2.3.4, 203.0.113.8"}
    )
    assert r.status_code == 201 and _last_ip(services, other) == "203.0.113.8"

    outsider = TestClient(client.app, client=("192.0.2.50", 1))
    spoofed = next_mac()
    r = outsider.post(
        "/api/v1/devices/register", json={"mac_address": spoofed}, headers={"X-Forwarded-For": "203.0.113.99"}
    )
    assert r.status_code == 201 and _last_ip(services, spoofed) == "192.0.2.50"

    v6 = next_mac()
    r = client.post(
        "/api/v1/devices/register", json={"mac_address": v6}, headers={"Forwarded": 'for="[2001:db8::7]:4711"'}
    )
    assert r.status_code == 201 and _last_ip(services, v6) == "2001:db8::7"

    r = client.post(
        "/api/v1/auth/login",
        json={"username": "root", "password": "not the password"},
        headers={"X-Forwarded-For": "203.0.113.7"},
    )
    assert r.status_code == 401
    r = outsider.post(
        "/api/v1/auth/login",
        json={"username": "root", "password": "not the password"},
        headers={"X-Forwarded-For": "203.0.113.7"},
    )
    assert r.status_code == 401
    failed = _audit(client, ops, "login_failed")
    assert sorted(e["source_ip"] for e in failed) == ["192.0.2.50", "203.0.113.7"]


def test_a_client_supplied_forwarded_header_cannot_choose_its_address(make_client: Make) -> None:
    """Review item 10a: behind a proxy that appends X-Forwarded-For (nginx's $proxy_add_x_forwarded_for), a
    ``Forwarded`` header the client sent itself passes through the proxy untouched; it must not decide the
    address, or every request could claim a fresh one and the per-address budget and sign-in throttle are void."""
    client, services = make_client(trusted_proxies=["10.0.0.0/24"])
    mac = next_mac()
    r = client.post(
        "/api/v1/devices/register",
        json={"mac_address": mac},
        headers={"Forwarded": "for=198.51.100.1", "X-Forwarded-For": "203.0.113.7"},
    )
    assert r.status_code == 201
    assert _last_ip(services, mac) in {"203.0.113.7", "10.0.0.9"}  # what the proxy vouched for, not the claim


def test_a_new_password_or_role_ends_the_users_sessions(
    client: TestClient, services: Services, admin: dict[str, str]
) -> None:
    """Review item 10b: resetting a password or changing a role revokes every token the user had."""
    token = user(services, "alice", UserRole.OPERATOR, PASSWORD)
    second = services.users.create_token(Actor.system(), "alice", name="laptop")
    r = client.get("/api/v1/auth/me", headers=bearer(token))
    assert (r.status_code, r.json()) == (200, {"username": "alice", "role": "operator"})

    services.users.reset_password(Actor.system(), "alice")
    for old in (token, second):
        r = client.get("/api/v1/auth/me", headers=bearer(old))
        assert (r.status_code, r.json()) == (401, {"detail": "unknown or revoked token"})
    [reset] = _audit(client, admin, "password_reset")
    assert reset["details"] == {"username": "alice", "tokens_revoked": 2}

    fresh = services.users.create_token(Actor.system(), "alice", name="after reset")
    assert client.get("/api/v1/auth/me", headers=bearer(fresh)).status_code == 200
    services.users.set_role(Actor.system(), "alice", UserRole.VIEWER)
    assert client.get("/api/v1/auth/me", headers=bearer(fresh)).status_code == 401
    [role] = _audit(client, admin, "user_role")
    assert role["details"] == {"username": "alice", "from": "operator", "to": "viewer", "tokens_revoked": 1}
    newest = services.users.create_token(Actor.system(), "alice", name="as viewer")
    assert client.get("/api/v1/auth/me", headers=bearer(newest)).json() == {"username": "alice", "role": "viewer"}


def _ui_sign_in(client: TestClient) -> Any:
    page = client.get("/ui/login")
    nonce = re.search(r'name="nonce" value="([^"]+)"', page.text)
    assert nonce is not None
    # The browser sends the nonce cookie back (over TLS in production; this test client speaks plain HTTP and
    # would keep back a Secure cookie, so it is sent by hand).
    client.cookies.clear()
    return client.post(
        "/ui/login",
        data={"username": "alice", "password": PASSWORD, "nonce": nonce.group(1)},
        headers={"Cookie": f"{LOGIN_COOKIE}={_cookie(page, LOGIN_COOKIE)}"},
        follow_redirects=False,
    )


def _cookie(response: Any, name: str) -> str:
    header = next(v for k, v in response.headers.multi_items() if k == "set-cookie" and v.startswith(f"{name}="))
    return str(header.split(";")[0].split("=", 1)[1])


def _session_cookie_header(response: Any) -> str:
    return str(
        next(v for k, v in response.headers.multi_items() if k == "set-cookie" and v.startswith(f"{SESSION_COOKIE}="))
    )


@pytest.mark.parametrize(("public_url", "secure"), [("https://ktizo.example", True), ("http://ktizo.example", False)])
def test_the_session_cookie_is_secure_when_the_public_url_is_https(
    make_client: Make, public_url: str, secure: bool
) -> None:
    """Review item 10c: behind a TLS-terminating proxy requests arrive as plain HTTP; the public URL says the
    browser uses TLS, so the session cookie must never be sent in clear."""
    client, services = make_client(public_url=public_url)
    user(services, "alice", UserRole.ADMIN, PASSWORD)
    r = _ui_sign_in(client)
    assert r.status_code == 303, r.text
    cookie = _session_cookie_header(r)
    assert ("Secure" in cookie) is secure, cookie
    assert "HttpOnly" in cookie and "Path=/ui" in cookie


def test_concurrent_wrong_passwords_never_get_past_the_throttle(services: Services) -> None:
    """Review item 10d: 30 sign-ins at once with a wrong password: at most LOGIN_FAILURES_PER_USER are tried, the
    rest are refused as too many (attempts still running count)."""
    services.users.create(Actor.system(), "root", UserRole.ADMIN, PASSWORD)
    barrier = threading.Barrier(30)

    def attempt(_: int) -> str:
        barrier.wait()
        try:
            services.users.authenticate("root", "wrong password!", "10.0.0.66")
        except Unauthenticated:
            return "unauthenticated"
        except TooManyAttempts:
            return "too many"
        return "signed in"

    with ThreadPoolExecutor(30) as pool:
        outcomes = list(pool.map(attempt, range(30)))
    assert outcomes.count("unauthenticated") <= LOGIN_FAILURES_PER_USER
    assert outcomes.count("unauthenticated") + outcomes.count("too many") == 30
    # And the right password is refused now too, from that address.
    with pytest.raises(TooManyAttempts):
        services.users.authenticate("root", PASSWORD, "10.0.0.66")


# == Review item 11: the iPXE door, the booted version, revisions, terminal output ==============================


def _ipxe(client: TestClient, mac: str, **query: str) -> str:
    r = client.get("/api/v1/boot/ipxe", params={"mac": mac, "arch": "x86_64", **query})
    script: str = r.text
    assert r.status_code == 200 and script.startswith("#!ipxe\n"), script
    return script


def test_the_ipxe_door_binds_once_and_refuses_another_identity(
    client: TestClient, ops: dict[str, str], services: Services, clock: ManualClock
) -> None:
    """Review item 11a: iPXE binding a UUID is audited; another UUID later is a mismatch that changes nothing."""
    mac = next_mac()
    device = pending(services, mac)
    _ipxe(client, mac, uuid=UUID, manufacturer="Dell Inc.", product="PowerEdge R650")
    [bind] = _audit(client, ops, "bind", device_id=device.id)
    assert bind["details"] == {"uuid": UUID, "door": "ipxe"}

    clock.advance(60)
    _ipxe(client, mac, uuid=OTHER_UUID, manufacturer="Evil Corp", product="Fake")
    [mismatch] = _audit(client, ops, "identity_mismatch", device_id=device.id)
    assert mismatch["details"]["uuid"] == {"bound": UUID, "claimed": OTHER_UUID}
    dev = _device(client, ops, device.id)
    assert dev["uuid"] == UUID
    assert (dev["facts"]["manufacturer"], dev["facts"]["product"]) == ("Dell Inc.", "PowerEdge R650")
    assert len(_audit(client, ops, "bind", device_id=device.id)) == 1


def test_ipxe_facts_update_a_pending_machine_but_not_an_approved_one(
    client: TestClient, ops: dict[str, str], services: Services
) -> None:
    """Review item 11a: what an unauthenticated caller reports is kept for a machine waiting at the door, never
    written over an approved machine's."""
    mac = next_mac()
    _ipxe(client, mac, uuid=UUID, manufacturer="Dell Inc.", product="PowerEdge R650")
    device_id = services.devices.resolve(mac).id
    _ipxe(client, mac, uuid=UUID, manufacturer="HPE", product="ProLiant DL360")
    facts = _device(client, ops, device_id)["facts"]
    assert (facts["manufacturer"], facts["product"]) == ("HPE", "ProLiant DL360")

    assert client.post(f"/api/v1/devices/{device_id}/approve", json={}, headers=ops).status_code == 200
    _ipxe(client, mac, uuid=UUID, manufacturer="Evil Corp", product="Fake")
    facts = _device(client, ops, device_id)["facts"]
    assert (facts["manufacturer"], facts["product"]) == ("HPE", "ProLiant DL360")


def test_the_ipxe_script_boots_the_clusters_talos_version(client: TestClient, services: Services) -> None:
    """Review item 11b: the Talos release booted is the one the cluster's configs are rendered for."""
    mac = next_mac()
    assert "Talos v1.13." in _ipxe(client, mac)
    services.cluster.update(
        Actor.system(),
        {
            "cluster_name": "lab",
            "endpoint": "https://lab.example:6443",
            "kubernetes_version": "1.33.0",
            "talos_version": "v1.12",
        },
    )
    script = _ipxe(client, mac)
    assert "echo Ktizo: booting Talos v1.12." in script and "/assets/talos/v1.12." in script
    assert "v1.13" not in script


def test_an_edit_against_a_moved_revision_is_refused(
    client: TestClient, ops: dict[str, str], services: Services
) -> None:
    """Review item 11c: an editor who saw revision N does not overwrite a change made since."""
    device = approved(services, hostname="w-1")
    seen = _device(client, ops, device.id)["revision"]
    r = client.put(f"/api/v1/devices/{device.id}?expected_revision={seen}", json={"notes": "first"}, headers=ops)
    assert r.status_code == 200 and r.json()["revision"] == seen + 1
    r = client.put(f"/api/v1/devices/{device.id}?expected_revision={seen}", json={"hostname": "w-9"}, headers=ops)
    assert r.status_code == 409
    detail = r.json()["detail"]
    assert f"revision {seen}, now {seen + 1}" in detail and "reload" in detail
    dev = _device(client, ops, device.id)
    assert (dev["hostname"], dev["notes"], dev["revision"]) == ("w-1", "first", seen + 1)


def test_cli_show_escapes_control_characters(cli: Any, services: Services) -> None:
    """Review item 11d: text a machine or an operator stored cannot drive the admin's terminal."""
    mac = next_mac()
    services.devices.create(Actor.system(), DeviceChanges(mac_address=mac, notes="\x1b[31mred\x07 alert"))
    result = cli("devices", "show", mac)
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "\\x1b[31mred\\x07 alert" in result.output


# == Part B: validation in the service, one transaction per request, no 500 on a constraint ======================


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (DeviceChanges(hostname="NOT A HOST; rm -rf"), "hostname"),
        (DeviceChanges(ip_address="10.0.5.300/24"), "ip_address"),
        (DeviceChanges(ip_address="10.0.5.7; reboot"), "ip_address"),
        (DeviceChanges(role="master"), "role"),
        (DeviceChanges(notes="x" * 4097), "notes"),
    ],
)
def test_the_service_validates_whoever_calls(services: Services, changes: DeviceChanges, field: str) -> None:
    """Part B: every value is checked by the service itself (a rule, the CLI, a future adapter), and a refused
    approval stores nothing."""
    device = pending(services)
    with pytest.raises(ValidationFailed) as caught:
        services.devices.approve(Actor.system(), device.id, changes)
    assert caught.value.field == field
    after = services.devices.get(device.id)
    assert (after.status, after.hostname, after.ip_address, after.role, after.notes, after.revision) == (
        "pending",
        None,
        None,
        "worker",
        "",
        device.revision,
    )
    assert services.audit.list(AuditQuery(action="approve"))[1] == 0


def test_a_request_failing_halfway_changes_nothing(
    client: TestClient, operator_token: str, admin: dict[str, str], services: Services
) -> None:
    """Part B: one transaction per request. A bulk approval whose last device is a controlplane (which an
    operator may not approve) fails after approving the others: every device is as it was."""
    workers = [pending(services).id for _ in range(2)]
    r = client.post("/api/v1/devices", json={"mac_address": next_mac(), "role": "controlplane"}, headers=admin)
    ids = [*workers, r.json()["id"]]
    plan = services.bulk.preview(OPS, BulkApproval(tuple(ids), "node-{n}"))
    assert [a.role for a in plan.assignments] == ["worker", "worker", "controlplane"]
    form = {
        **_session(client, operator_token),
        "ids": [str(i) for i in ids],
        "hostname_pattern": "node-{n}",
        "fingerprint": plan.fingerprint,
    }
    r = client.post("/ui/devices/bulk/approve", data=form, follow_redirects=False)
    assert r.status_code in (403, 422), r.text
    assert ADMIN_ONLY in r.text
    assert [(services.devices.get(i).status, services.devices.get(i).hostname) for i in ids] == [("pending", None)] * 3
    assert services.audit.list(AuditQuery(action="approve"))[1] == 0


def test_replicas_starting_at_once_make_one_first_admin(services: Services) -> None:
    """Part B: `ktizo serve` on several replicas of a new installation: each calls ensure_admin at start; one makes
    the admin and shows its password, the others find it made (a Conflict), none fails to start."""
    outcomes = _race(8, lambda _: services.users.ensure_admin())
    assert [kind for kind, _ in outcomes] == ["ok"] * 8, outcomes
    passwords = [value for _, value in outcomes if value]
    assert len(passwords) == 1
    assert services.users.authenticate("admin", passwords[0], "10.0.0.9").username == "admin"


def test_racing_edits_to_one_hostname_are_one_200_and_one_409(
    client: TestClient, ops: dict[str, str], services: Services
) -> None:
    """Part B: two PUTs giving two approved devices one hostname at once: one wins, the other is a 409 with a
    JSON detail, never a 500."""
    a = approved(services, hostname="node-a")
    b = approved(services, hostname="node-b")
    ids = (a.id, b.id)
    responses = _race(2, lambda i: client.put(f"/api/v1/devices/{ids[i]}", json={"hostname": "node-c"}, headers=ops))
    assert [kind for kind, _ in responses] == ["ok", "ok"], responses
    answers = sorted((r.status_code, r.json()) for _, r in responses)
    assert [status for status, _ in answers] == [200, 409], answers
    assert answers[0][1]["hostname"] == "node-c"
    assert isinstance(answers[1][1]["detail"], str) and "hostname" in answers[1][1]["detail"]
    hostnames = sorted(services.devices.get(i).hostname or "" for i in ids)
    assert hostnames in (["node-a", "node-c"], ["node-b", "node-c"])


def test_a_constraint_the_precheck_missed_is_a_409_not_a_500(
    client: TestClient, ops: dict[str, str], services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Part B: with the service's check out of the way (as when two replicas race past it), the database's
    refusal reaches the operator as a 409 with a JSON detail."""
    a = approved(services, hostname="node-a", ip_address="10.0.5.10/24")
    b = approved(services, hostname="node-b", ip_address="10.0.5.11/24")
    monkeypatch.setattr("ktizo.services.devices._ensure_name_and_address_free", lambda *_args: None)
    r = client.put(f"/api/v1/devices/{b.id}", json={"hostname": "node-a"}, headers=ops)
    assert r.status_code == 409 and r.headers["content-type"] == "application/json"
    assert isinstance(r.json()["detail"], str) and r.json()["detail"]
    r = client.put(f"/api/v1/devices/{b.id}", json={"ip_address": "10.0.5.10/16"}, headers=ops)
    assert r.status_code == 409 and isinstance(r.json()["detail"], str)
    after = services.devices.get(b.id)
    assert (after.hostname, after.ip_address) == ("node-b", "10.0.5.11/24")
    assert services.devices.get(a.id).hostname == "node-a"
