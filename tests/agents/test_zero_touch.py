"""Zero-touch enrollment (seed 004): every branch of ``POST /api/enroll`` (new, manual, reuse, site move, collision
and its three resolutions; wrong key, unknown site, rotated, expired and used-up keys; lockout; rate limit), parity
between a wrong key and an unknown site, racing enrollments of one machine_uid, secrets kept out of the audit log."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import secrets
import threading
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient
from sqlalchemy import select

from ktizo.db.models import AgentApiKey, AuditEvent, Device, Refusal, SiteKey
from ktizo.services.context import Actor
from ktizo.services.registry import Services
from tests.agents.support import body, csr_pem, key
from tests.clock import ManualClock

REFUSED = "enrollment refused: unknown site, or a wrong, rotated, expired or used-up key"


def site(services: Services, code: str = "fra1", **kwargs: Any) -> str:
    services.sites.create(Actor.cli(), code, name=code.upper(), **kwargs)
    return services.sites.rotate_key(Actor.cli(), code)[0]


def zt_body(site_code: str, enrollment_key: str, uid: str | None = None, **over: Any) -> dict[str, Any]:
    out = body(hostname=over.pop("hostname", "web-01"))
    out.pop("machine_id")
    out.update(site_code=site_code, enrollment_key=enrollment_key, machine_uid=uid or secrets.token_hex(32))
    out.update(over)
    return out


def actions(services: Services) -> list[tuple[str, dict[str, Any]]]:
    with services.db.read() as s:
        return [(e.action, e.details) for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]


def der(pem: str) -> bytes:
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)


@pytest.fixture
def zt(make_client: Any) -> tuple[TestClient, Services]:
    """A Ktizo whose proxy (10.0.0.0/24) may pass client certificates; one test address, no new-machine budget."""
    return make_client(trusted_proxies=["10.0.0.0/24"], new_devices_per_minute=0)  # type: ignore[no-any-return]


def test_new_machine_at_an_auto_approve_site_is_active_in_one_round_trip(zt: Any) -> None:
    client, services = zt
    cek = site(services)
    r = client.post("/api/enroll", json=zt_body("fra1", cek))
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["enrollment_state"] == "active" and out["outcome"] == "new"
    assert out["agent_api_key"].startswith(f"cak_{1}_") or out["agent_api_key"].startswith("cak_")
    cert = x509.load_pem_x509_certificate(out["server_crt"].encode())
    assert cert.subject.rfc4514_string() == "CN=web-01"
    agent = services.agents.resolve(str(out["agent_id"]))
    assert (agent.status, agent.site_id is not None, agent.key_version, agent.machine_id) == ("approved", True, 1, None)
    with services.db.read() as s:
        row = s.scalars(select(AgentApiKey)).one()
        secret = out["agent_api_key"].split("_", 2)[2]
        assert row.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    # The cak_ key goes with its certificate: both, or no check-in.
    pem_der = base64.b64encode(der(out["server_crt"])).decode()
    headers = {"Client-Cert": f":{pem_der}:"}
    assert client.post("/api/v1/agent/checkin", json={"facts": {}}, headers=headers).status_code == 403
    headers["Authorization"] = f"Bearer {out['agent_api_key']}"
    assert client.post("/api/v1/agent/checkin", json={"facts": {}}, headers=headers).status_code == 200
    attempt = [d for a, d in actions(services) if a == "enroll.attempt"]
    assert attempt[-1]["result"] == "active" and attempt[-1]["key"] == services.sites.active_key("fra1").fingerprint  # type: ignore[union-attr]


def test_manual_policy_waits_for_an_operator_then_the_pickup_carries_the_api_key(zt: Any) -> None:
    client, services = zt
    cek = site(services, policy="manual")
    r = client.post("/api/enroll", json=zt_body("fra1", cek))
    assert r.status_code == 202
    assert r.json()["enrollment_state"] == "pending"
    token = r.json()["polling_token"]
    assert client.get(f"/api/v1/enroll/status/{token}").status_code == 202
    [agent] = services.agents.list()
    assert services.agents.certificates(agent.id) == []  # nothing minted while pending
    services.agents.approve(Actor.cli(), str(agent.id))
    pickup = client.get(f"/api/v1/enroll/status/{token}")
    assert pickup.status_code == 200
    assert pickup.json()["agent_api_key"].startswith("cak_")
    assert client.get(f"/api/v1/enroll/status/{token}").status_code == 404


def test_reuse_with_the_api_key_gets_fresh_credentials_and_revokes_the_old(zt: Any) -> None:
    client, services = zt
    cek = site(services)
    uid = secrets.token_hex(32)
    first = client.post("/api/enroll", json=zt_body("fra1", cek, uid)).json()
    again = client.post("/api/enroll", json=zt_body("fra1", cek, uid, agent_api_key=first["agent_api_key"]))
    assert again.status_code == 201 and again.json()["outcome"] == "reuse"
    assert again.json()["agent_id"] == first["agent_id"]
    certs = services.agents.certificates(first["agent_id"])
    assert [c.revoked_at is None for c in certs] == [True, False]  # newest first
    # The old cak_ is dead: it proves nothing any more.
    third = client.post("/api/enroll", json=zt_body("fra1", cek, uid, agent_api_key=first["agent_api_key"]))
    assert third.status_code == 202 and third.json()["enrollment_state"] == "pending"


def test_reuse_with_the_current_certificate_over_mtls(zt: Any) -> None:
    client, services = zt
    cek = site(services)
    uid = secrets.token_hex(32)
    first = client.post("/api/enroll", json=zt_body("fra1", cek, uid)).json()
    headers = {
        "Client-Cert": ":" + base64.b64encode(der(first["server_crt"])).decode() + ":",
        "Authorization": f"Bearer {first['agent_api_key']}",
    }
    r = client.post("/api/enroll", json=zt_body("fra1", cek, uid), headers=headers)
    assert r.status_code == 201 and r.json()["outcome"] == "reuse"


def test_a_site_move_needs_proof_and_the_new_sites_key(zt: Any) -> None:
    client, services = zt
    fra, ams = site(services, "fra1"), site(services, "ams1")
    uid = secrets.token_hex(32)
    first = client.post("/api/enroll", json=zt_body("fra1", fra, uid)).json()
    moved = client.post("/api/enroll", json=zt_body("ams1", ams, uid, agent_api_key=first["agent_api_key"]))
    assert moved.status_code == 201 and moved.json()["outcome"] == "site_move"
    agent = services.agents.resolve(str(first["agent_id"]))
    assert agent.site_id == services.sites.get("ams1").id
    [(_, details)] = [(a, d) for a, d in actions(services) if a == "agent.site_moved"]
    assert details["from"] == "fra1" and details["site"] == "ams1"


def test_a_collision_mints_nothing_and_waits_for_an_operator(zt: Any) -> None:
    client, services = zt
    cek = site(services)
    uid = secrets.token_hex(32)
    first = client.post("/api/enroll", json=zt_body("fra1", cek, uid)).json()
    before = len(services.agents.certificates(first["agent_id"]))
    r = client.post("/api/enroll", json=zt_body("fra1", cek, uid, hostname="impostor"))
    assert r.status_code == 202
    assert r.json()["enrollment_state"] == "pending"
    token = r.json()["polling_token"]
    assert len(services.agents.certificates(first["agent_id"])) == before
    with services.db.read() as s:
        assert len(s.scalars(select(AgentApiKey).where(AgentApiKey.revoked_at.is_(None))).all()) == 1
    [collision] = services.zero_touch.collisions()
    assert collision.device.id == first["agent_id"] and collision.claim["hostname"] == "impostor"
    assert [a for a, _ in actions(services)].count("agent.collision") == 1
    assert client.get(f"/api/v1/enroll/status/{token}").status_code == 202
    # A second claim while one waits: refused, still nothing minted.
    assert client.post("/api/enroll", json=zt_body("fra1", cek, uid)).status_code == 409
    services.zero_touch.resolve(Actor.cli(), collision.enrollment_id, "reject")
    assert client.get(f"/api/v1/enroll/status/{token}").status_code == 403
    assert services.agents.resolve(str(first["agent_id"])).status == "approved"  # the real one is untouched


def test_collision_resolved_by_replacing_the_old_machine(zt: Any) -> None:
    client, services = zt
    cek = site(services)
    uid = secrets.token_hex(32)
    first = client.post("/api/enroll", json=zt_body("fra1", cek, uid)).json()
    token = client.post("/api/enroll", json=zt_body("fra1", cek, uid, hostname="web-02")).json()["polling_token"]
    [collision] = services.zero_touch.collisions()
    services.zero_touch.resolve(Actor.cli(), collision.enrollment_id, "replace")
    pickup = client.get(f"/api/v1/enroll/status/{token}")
    assert pickup.status_code == 200
    assert pickup.json()["agent_api_key"].startswith("cak_")
    agent = services.agents.resolve(str(first["agent_id"]))
    assert agent.hostname == "web-02"
    certs = services.agents.certificates(agent.id)
    assert sum(c.revoked_at is None for c in certs) == 1
    old = base64.b64encode(der(first["server_crt"])).decode()
    r = client.post(
        "/api/v1/agent/checkin",
        json={"facts": {}},
        headers={"Client-Cert": f":{old}:", "Authorization": f"Bearer {first['agent_api_key']}"},
    )
    assert r.status_code == 403


def test_collision_resolved_as_a_new_machine(zt: Any) -> None:
    client, services = zt
    cek = site(services)
    uid = secrets.token_hex(32)
    first = client.post("/api/enroll", json=zt_body("fra1", cek, uid)).json()
    token = client.post("/api/enroll", json=zt_body("fra1", cek, uid, hostname="web-02")).json()["polling_token"]
    [collision] = services.zero_touch.collisions()
    twin = services.zero_touch.resolve(Actor.cli(), collision.enrollment_id, "new")
    assert twin.id != first["agent_id"] and twin.status == "approved" and twin.hostname == "web-02"
    assert client.get(f"/api/v1/enroll/status/{token}").status_code == 200
    assert services.agents.resolve(str(first["agent_id"])).status == "approved"


def test_proof_is_not_enough_while_the_existing_agent_is_online_under_another_name(zt: Any) -> None:
    client, services = zt
    cek = site(services)
    uid = secrets.token_hex(32)
    first = client.post("/api/enroll", json=zt_body("fra1", cek, uid)).json()
    headers = {
        "Client-Cert": ":" + base64.b64encode(der(first["server_crt"])).decode() + ":",
        "Authorization": f"Bearer {first['agent_api_key']}",
    }
    assert client.post("/api/v1/agent/checkin", json={"facts": {}}, headers=headers).status_code == 200
    r = client.post(
        "/api/enroll", json=zt_body("fra1", cek, uid, hostname="db-9", agent_api_key=first["agent_api_key"])
    )
    assert r.status_code == 202
    assert [d["reason"] for a, d in actions(services) if a == "agent.collision"] == ["online_as_other"]


@pytest.mark.parametrize("case", ["wrong_key", "unknown_site", "rotated_key", "expired_key", "used_up_key"])
def test_every_refused_key_gets_one_answer(zt: Any, clock: ManualClock, case: str) -> None:
    client, services = zt
    cek = site(services)
    code, key_text = "fra1", cek
    if case == "wrong_key":
        key_text = "cek_" + secrets.token_urlsafe(32)
    elif case == "unknown_site":
        code = "nowhere"
    elif case == "rotated_key":
        services.sites.rotate_key(Actor.cli(), "fra1")
    elif case == "expired_key":
        key_text, _ = services.sites.rotate_key(Actor.cli(), "fra1", expires_at=clock.now() + dt.timedelta(hours=1))
        clock.advance(hours=2)
    elif case == "used_up_key":
        key_text, _ = services.sites.rotate_key(Actor.cli(), "fra1", max_uses=1)
        assert client.post("/api/enroll", json=zt_body("fra1", key_text, hostname="first")).status_code == 201
    r = client.post("/api/enroll", json=zt_body(code, key_text))
    assert r.status_code == 401
    assert r.json() == {"detail": REFUSED}
    reasons = [d["reason"] for a, d in actions(services) if a == "enroll.attempt" and d.get("result") == "refused"]
    expected = {"wrong_key": "bad_key", "rotated_key": "bad_key"}.get(case, case)
    assert reasons == [expected]


def test_wrong_key_and_unknown_site_are_indistinguishable(zt: Any) -> None:
    client, services = zt
    site(services)
    wrong = client.post("/api/enroll", json=zt_body("fra1", "cek_" + secrets.token_urlsafe(32)))
    unknown = client.post("/api/enroll", json=zt_body("ghost", "cek_" + secrets.token_urlsafe(32)))
    assert (wrong.status_code, wrong.content) == (unknown.status_code, unknown.content)
    strip = {"date", "server-timing"}
    assert {k: v for k, v in wrong.headers.items() if k not in strip} == {
        k: v for k, v in unknown.headers.items() if k not in strip
    }


def test_refused_keys_lock_out_the_pair_not_the_site(make_client: Any, clock: ManualClock) -> None:
    client, services = make_client(new_devices_per_minute=0)
    cek = site(services)
    bad = "cek_" + secrets.token_urlsafe(32)
    for _ in range(5):
        assert client.post("/api/enroll", json=zt_body("fra1", bad)).status_code == 401
    locked = client.post("/api/enroll", json=zt_body("fra1", cek))  # even the right key, from this address
    assert locked.status_code == 429
    assert 0 < int(locked.headers["retry-after"]) <= 15 * 60 + 1  # rounded up
    other = TestClient(client.app, client=("10.0.0.77", 4000))
    assert other.post("/api/enroll", json=zt_body("fra1", cek, hostname="a")).status_code == 201  # site not locked
    clock.advance(minutes=16)
    assert client.post("/api/enroll", json=zt_body("fra1", cek, hostname="b")).status_code == 201
    with services.db.read() as s:
        assert s.scalars(select(Refusal).where(Refusal.action == "enroll.failed")).first() is not None


def test_requests_per_address_are_limited_across_enrollment_doors(make_client: Any, clock: ManualClock) -> None:
    # On the test's clock: the budget counts per calendar minute, and four requests must not straddle two.
    client, services = make_client(enroll_requests_per_minute=3, new_devices_per_minute=0)
    cek = site(services)
    codes = [client.post("/api/enroll", json=zt_body("fra1", cek, hostname=f"h-{i}")).status_code for i in range(4)]
    assert codes == [201, 201, 201, 429]


def test_site_limits(zt: Any) -> None:
    client, services = zt
    cek = site(services, max_agents=1)
    assert client.post("/api/enroll", json=zt_body("fra1", cek)).status_code == 201
    full = client.post("/api/enroll", json=zt_body("fra1", cek, hostname="web-02"))
    assert full.status_code == 409 and "limit" in full.json()["detail"]


def test_fifty_racing_enrollments_of_one_machine_uid_make_one_record(zt: Any) -> None:
    client, services = zt
    cek = site(services)
    uid = secrets.token_hex(32)
    statuses: list[int] = []
    barrier = threading.Barrier(50)
    lock = threading.Lock()

    def go() -> None:
        payload = zt_body("fra1", cek, uid)
        barrier.wait()
        code = client.post("/api/enroll", json=payload).status_code
        with lock:
            statuses.append(code)

    threads = [threading.Thread(target=go) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with services.db.read() as s:
        assert len(s.scalars(select(Device).where(Device.machine_uid == uid)).all()) == 1
    assert statuses.count(201) == 1
    assert set(statuses) <= {201, 202, 409}
    assert statuses.count(202) <= 1  # at most one claim waits at the gate


def test_no_secret_reaches_the_audit_log(zt: Any) -> None:
    client, services = zt
    cek = site(services)
    out = client.post("/api/enroll", json=zt_body("fra1", cek)).json()
    client.post("/api/enroll", json=zt_body("fra1", cek + "x", hostname="other"))
    text = json.dumps([d for _, d in actions(services)])
    secret = out["agent_api_key"].split("_", 2)[2]
    assert cek not in text and cek[4:] not in text and secret not in text
    with services.db.read() as s:
        stored = s.scalars(select(SiteKey)).one()
        assert cek not in stored.key_hash and stored.key_hash.startswith("$argon2id$")


def test_sites_api_roles_and_the_seed_key_endpoints(zt: Any, admin: dict[str, str], ops: dict[str, str]) -> None:
    client, _services = zt
    assert client.post("/api/v1/sites", json={"site_code": "lab"}, headers=ops).status_code == 403
    r = client.post(
        "/api/v1/sites", json={"site_code": "lab", "name": "Lab", "enrollment_policy": "manual"}, headers=admin
    )
    assert r.status_code == 201 and r.json()["active_key"] is None
    site_id = r.json()["id"]
    assert client.post(f"/api/sites/{site_id}/enrollment-key/rotate", headers=ops).status_code == 403
    rotated = client.post(f"/api/sites/{site_id}/enrollment-key/rotate", headers=admin)
    assert rotated.status_code == 200
    k = rotated.json()
    assert k["enrollment_key"].startswith("cek_") and len(k["enrollment_key"]) == 47
    fp = hashlib.sha256(k["enrollment_key"].encode()).hexdigest()[:4].upper()
    assert k["fingerprint"] == f"v1 ({fp})"
    shown = client.get("/api/sites/lab/enrollment-key", headers=ops).json()
    assert shown["fingerprint"] == f"v1 ({fp})" and "enrollment_key" not in shown
    again = client.post("/api/v1/sites/lab/enrollment-key/rotate", headers=admin).json()
    assert again["version"] == 2
    assert client.get("/api/v1/sites/lab/enrollment-key", headers=ops).json()["version"] == 2


def test_key_type_and_csr_rules_hold_at_the_site_door_too(zt: Any) -> None:
    client, services = zt
    cek = site(services)
    r = client.post("/api/enroll", json=zt_body("fra1", cek, csr_pem=csr_pem(key("p384"))))
    assert r.status_code == 400
    r = client.post("/api/enroll", json=zt_body("fra1", cek, machine_uid="not-hex"))
    assert r.status_code == 400


def test_a_taken_hostname_waits_for_an_operator_instead_of_failing(zt: Any) -> None:
    client, services = zt
    cek = site(services)
    assert client.post("/api/enroll", json=zt_body("fra1", cek)).status_code == 201
    second = client.post("/api/enroll", json=zt_body("fra1", cek))  # another machine, same hostname
    assert second.status_code == 202
    reasons = [d["reason"] for a, d in actions(services) if a == "enroll.attempt"]
    assert reasons[-1] == "hostname_taken"


def test_who_enrolled_with_which_key_version_after_when(zt: Any, clock: ManualClock, ops: dict[str, str]) -> None:
    client, services = zt
    v1 = site(services)
    client.post("/api/enroll", json=zt_body("fra1", v1, hostname="early"))
    v2, _ = services.sites.rotate_key(Actor.cli(), "fra1")
    clock.advance(hours=1)
    moment = clock.now()
    clock.advance(hours=1)
    client.post("/api/enroll", json=zt_body("fra1", v2, hostname="late"))
    r = client.get("/api/v1/agents", params={"site": "fra1", "key_version": 2}, headers=ops)
    assert [a["hostname"] for a in r.json()] == ["late"]
    r = client.get("/api/v1/agents", params={"site": "fra1", "enrolled_after": moment.isoformat()}, headers=ops)
    assert [a["hostname"] for a in r.json()] == ["late"]
    assert services.sites.enrollments_by_version("fra1")[0][:2] == (2, 1)
