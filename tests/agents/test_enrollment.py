"""The enrollment door (seed 003's contract): enroll, poll, the bundle once, rejection, purge, expiry, and what a
hostile host can and cannot get out of it. In-process (Starlette's TestClient); the real TLS paths are in
test_mtls.py."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import threading
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fastapi.testclient import TestClient
from sqlalchemy import select

from ktizo.db.models import AgentCertificate, AuditEvent, Authority, Enrollment, Refusal
from ktizo.services.context import Actor
from ktizo.services.registry import Services
from tests.agents.support import body, csr_pem, key, machine_id
from tests.clock import ManualClock


def enroll(client: TestClient, payload: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    payload = payload or body()
    r = client.post("/api/v1/enroll", json=payload)
    assert r.status_code == 202, r.text
    return payload, r.json()["polling_token"]


def poll(client: TestClient, token: str) -> Any:
    return client.get(f"/api/v1/enroll/status/{token}")


def audit_actions(services: Services, device_id: int) -> list[str]:
    with services.db.read() as s:
        return list(
            s.scalars(select(AuditEvent.action).where(AuditEvent.device_id == device_id).order_by(AuditEvent.id))
        )


def test_enroll_returns_a_256_bit_token_stored_only_as_its_hash(client: TestClient, services: Services) -> None:
    payload, token = enroll(client)
    r = client.post("/api/v1/enroll", json=body())
    assert r.json()["poll_interval_seconds"] == 60
    assert len(token) >= 43  # 32 bytes, url-safe base64
    with services.db.read() as s:
        row = s.scalars(select(Enrollment)).first()
        assert row is not None
        assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
        assert token not in (row.token_hash, row.csr_pem)
    agent = services.agents.resolve(payload["machine_id"])
    assert (agent.kind, agent.status, agent.hostname) == ("agent", "pending", None)
    assert agent.facts["hostname"] == "web-01" and agent.facts["ip_addresses"] == ["10.0.7.21"]
    assert audit_actions(services, agent.id) == ["register", "enroll"]
    # Nothing is minted while pending.
    assert services.agents.certificates(agent.id) == []


def test_pending_then_approved_bundle_once_then_404(client: TestClient, services: Services) -> None:
    payload, token = enroll(client)
    r = poll(client, token)
    assert r.status_code == 202
    assert r.json() == {"status": "pending", "poll_interval_seconds": 60}

    services.agents.approve(Actor.cli(), payload["machine_id"])
    r = poll(client, token)
    assert r.status_code == 200
    bundle = r.json()
    assert set(bundle) == {"ca_crt", "server_crt", "chain", "not_after", "manager_addresses", "mtls_url"}
    assert bundle["ca_crt"] == services.authority.ca_pem()
    assert bundle["chain"] == bundle["server_crt"] + bundle["ca_crt"]
    assert bundle["mtls_url"] == "https://testserver:8443"
    cert = x509.load_pem_x509_certificate(bundle["server_crt"].encode())
    assert bundle["not_after"] == cert.not_valid_after_utc.isoformat().replace("+00:00", "Z")
    assert r.headers["cache-control"] == "no-store"

    again = poll(client, token)
    assert again.status_code == 404
    assert again.json() == poll(client, "never-issued-token").json()  # one answer for both: no oracle


def test_certificate_is_built_from_the_record_not_the_csr(client: TestClient, services: Services) -> None:
    """A CSR asking for extra SANs, CA:true, code signing and the manager's identity gets the server's profile."""
    private = key()
    greedy = csr_pem(private, greedy=True)
    assert x509.load_pem_x509_csr(greedy.encode()).extensions  # the CSR really asks for all of it
    greedy_payload, greedy_token = enroll(client, body(private_key=private, hostname="db-8", csr_pem=greedy))
    services.agents.approve(Actor.cli(), greedy_payload["machine_id"], hostname="Db-8-Renamed")
    cert = x509.load_pem_x509_certificate(poll(client, greedy_token).json()["server_crt"].encode())

    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "db-8-renamed"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["db-8-renamed", "db-8-renamed.lab.example.com"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.7.21")]
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == []
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == private.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=30) <= lifetime <= dt.timedelta(days=30, minutes=10)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(services.authority.ca_pem().encode()))
    agent = services.agents.resolve(greedy_payload["machine_id"])
    serial = services.agents.certificates(agent.id)[0].serial
    assert serial == f"{cert.serial_number:032x}"
    with services.db.read() as s:
        issued = s.scalars(select(AuditEvent).where(AuditEvent.action == "cert_issue")).one()
    assert issued.details["serial"] == serial


def test_rejected_poll_is_403_and_reenroll_is_409(client: TestClient, services: Services) -> None:
    payload, token = enroll(client)
    services.agents.reject(Actor.cli(), payload["machine_id"], "not ours")
    r = poll(client, token)
    assert r.status_code == 403
    assert "rejected" in r.json()["detail"]
    again = client.post("/api/v1/enroll", json=body(payload["machine_id"]))
    assert again.status_code == 409
    assert "purge" in again.json()["detail"]


def test_purge_kills_every_credential_and_the_host_may_start_over(client: TestClient, services: Services) -> None:
    payload, token = enroll(client)
    agent = services.agents.approve(Actor.cli(), payload["machine_id"])
    serial = services.agents.certificates(agent.id)[0].serial
    services.agents.purge(Actor.cli(), payload["machine_id"])

    assert poll(client, token).status_code == 404
    with services.db.read() as s:
        row = s.get(AgentCertificate, serial)
        assert row is not None and row.revoked_at is not None and row.device_id is None
        assert s.scalars(select(Enrollment)).all() == []
    crl = x509.load_der_x509_crl(client.get("/api/v1/pki/crl").content)
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None
    pem_crl = x509.load_pem_x509_crl(client.get("/api/v1/pki/crl.pem").content)
    assert pem_crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None

    _, new_token = enroll(client, body(payload["machine_id"]))
    fresh = services.agents.resolve(payload["machine_id"])
    assert fresh.id != agent.id and fresh.status == "pending"
    assert poll(client, new_token).status_code == 202


def test_a_pending_enrollment_expires(client: TestClient, services: Services, clock: ManualClock) -> None:
    payload, token = enroll(client)
    clock.advance(hours=167)
    assert services.agents.expire() == 0
    assert poll(client, token).status_code == 202
    clock.advance(hours=2)
    assert poll(client, token).status_code == 404  # dead at once, before the job runs
    assert services.agents.expire() == 1
    with pytest.raises(Exception, match="no agent"):
        services.agents.resolve(payload["machine_id"])
    _, again = enroll(client, body(payload["machine_id"]))
    assert poll(client, again).status_code == 202


def test_an_unpicked_bundle_expires_and_its_certificate_is_revoked(
    client: TestClient, services: Services, clock: ManualClock
) -> None:
    payload, token = enroll(client)
    agent = services.agents.approve(Actor.cli(), payload["machine_id"])
    clock.advance(hours=169)
    assert services.agents.expire() == 1
    assert poll(client, token).status_code == 404
    assert all(c.revoked_at is not None for c in services.agents.certificates(agent.id))


def test_two_hosts_racing_with_one_machine_id_make_one_enrollment(client: TestClient, services: Services) -> None:
    mid = machine_id()
    statuses: list[int] = []
    barrier = threading.Barrier(6)

    def go() -> None:
        payload = body(mid)
        barrier.wait()
        statuses.append(client.post("/api/v1/enroll", json=payload).status_code)

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [202, 409, 409, 409, 409, 409]
    with services.db.read() as s:
        assert len(s.scalars(select(Enrollment)).all()) == 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"unexpected": 1}, "unexpected"),
        ({"machine_id": "not-a-machine-id"}, "machine_id"),
        ({"machine_id": "0" * 32}, "machine_id"),
        ({"hostname": "bad host; rm -rf /"}, "hostname"),
        ({"ip_addresses": ["127.0.0.1"]}, "ip_addresses"),
        ({"ip_addresses": ["10.0.0.300"]}, "ip_addresses"),
        ({"ip_addresses": [f"10.0.0.{i}" for i in range(40)]}, "ip_addresses"),
        ({"os": {"id": "debian\x1b[2J"}}, "os"),
        ({"csr_pem": "not a csr"}, "csr_pem"),
        ({"csr_pem": csr_pem(key()) + csr_pem(key())}, "csr_pem"),
        ({"csr_pem": csr_pem(key("p384"))}, "csr_pem"),
        ({"csr_pem": csr_pem(key("rsa1024"))}, "csr_pem"),
    ],
)
def test_malformed_enrollments_are_400_naming_the_field(
    client: TestClient, services: Services, change: dict[str, Any], field: str
) -> None:
    r = client.post("/api/v1/enroll", json=body(**change))
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert any(field in [str(p) for p in item["loc"]] for item in detail), detail
    assert services.agents.list() == []  # nothing stored


def test_a_csr_whose_signature_does_not_verify_is_refused(client: TestClient) -> None:
    one, other = key("rsa2048"), key("rsa2048")  # RSA signatures have one length: the splice stays well-formed
    good = x509.load_pem_x509_csr(csr_pem(one).encode())
    forged = x509.load_pem_x509_csr(csr_pem(other).encode())
    # The request of one key with the signature of another: the host does not hold the key it names.
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    sig, fake = good.signature, forged.signature
    assert sig in der
    assert len(sig) == len(fake)
    spliced = bytes(der).replace(sig, fake)
    pem = "-----BEGIN CERTIFICATE REQUEST-----\n"
    import base64

    text = base64.encodebytes(spliced).decode()
    r = client.post("/api/v1/enroll", json=body(csr_pem=pem + text + "-----END CERTIFICATE REQUEST-----\n"))
    assert r.status_code == 400
    assert "signature does not verify" in str(r.json()["detail"])


@pytest.mark.parametrize("kind", ["ed25519", "rsa2048"])
def test_allowed_key_types(client: TestClient, services: Services, kind: str) -> None:
    payload, token = enroll(client, body(private_key=key(kind)))
    services.agents.approve(Actor.cli(), payload["machine_id"])
    assert poll(client, token).status_code == 200


def test_an_oversized_body_is_413(client: TestClient) -> None:
    r = client.post("/api/v1/enroll", json=body(csr_pem="x" * 2_000_000))
    assert r.status_code == 413


def test_operators_roles_and_the_agents_api(
    client: TestClient, services: Services, ops: dict[str, str], viewer_token: str
) -> None:
    payload, token = enroll(client)
    viewer = {"Authorization": f"Bearer {viewer_token}"}
    listed = client.get("/api/v1/agents", headers=viewer).json()
    assert [a["machine_id"] for a in listed] == [payload["machine_id"]]
    assert listed[0]["enrollment"] == "pending" and listed[0]["kind"] == "agent"
    assert client.post(f"/api/v1/agents/{payload['machine_id']}/approve", headers=viewer).status_code == 403
    assert client.post(f"/api/v1/agents/{payload['machine_id']}/approve").status_code == 401

    r = client.post(f"/api/v1/agents/{payload['machine_id']}/approve", headers=ops, json={"notes": "rack 4"})
    assert r.status_code == 200
    agent = r.json()
    assert agent["status"] == "approved" and agent["hostname"] == "web-01" and agent["notes"] == "rack 4"
    assert agent["fqdn"] == "web-01.lab.example.com" and agent["addresses"] == ["10.0.7.21"]
    assert len(agent["certificates"]) == 1 and agent["enrollment"] == "approved"
    assert client.post(f"/api/v1/agents/{agent['id']}/reject", headers=ops).status_code == 409

    r = client.post(f"/api/v1/agents/{agent['id']}/revoke", headers=ops)
    assert r.status_code == 200 and r.json()["status"] == "rejected"
    assert r.json()["certificates"][0]["revoked_at"] is not None
    assert poll(client, token).status_code == 403
    assert client.post(f"/api/v1/agents/{agent['id']}/purge", headers=ops).status_code == 204
    assert client.get(f"/api/v1/agents/{agent['id']}", headers=ops).status_code == 404
    assert audit_actions(services, agent["id"])[-4:] == ["reject", "cert_revoke", "delete", "purge"]


def test_the_ca_is_made_once_and_its_key_sealed(make_client: Any) -> None:
    from ktizo.pki.sealing import generate_key

    client, services = make_client(secret_key=generate_key())
    pem = client.get("/api/v1/pki/ca.pem")
    assert pem.status_code == 200 and pem.headers["content-type"].startswith("application/x-pem-file")
    cert = x509.load_pem_x509_certificate(pem.content)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    der = cert.public_bytes(serialization.Encoding.DER)
    assert services.authority.fingerprint() == "sha256:" + hashlib.sha256(der).hexdigest()
    with services.db.read() as s:
        row = s.get(Authority, 1)
        assert row is not None
        assert "PRIVATE KEY" not in row.key  # sealed at rest
    assert client.get("/api/v1/pki/ca.pem").content == pem.content
    assert b"PRIVATE" not in client.get("/api/v1/pki/ca.pem").content


def test_client_cert_header_counts_only_from_a_trusted_proxy(make_client: Any) -> None:
    """RFC 9440: behind a TLS-terminating proxy Ktizo reads the client's certificate from Client-Cert, and only
    when the proxy is in KTIZO_TRUSTED_PROXIES; anyone else sending the header gets nothing from it."""
    import base64

    client, services = make_client(trusted_proxies=["10.0.0.0/24"])
    payload, token = enroll(client)
    services.agents.approve(Actor.cli(), payload["machine_id"])
    pem = poll(client, token).json()["server_crt"]
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    header = {"Client-Cert": ":" + base64.b64encode(der).decode() + ":"}

    r = client.post("/api/v1/agent/checkin", json={"facts": {"cpu": {"logical_cpus": 4}}}, headers=header)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "approved"
    untrusted = TestClient(client.app, client=("192.0.2.7", 5000))
    r = untrusted.post("/api/v1/agent/checkin", json={"facts": {}}, headers=header)
    assert r.status_code == 403
    assert "client certificate" in r.json()["detail"]


def test_enrollment_is_rate_limited_per_address(make_client: Any) -> None:
    """The new-machine budget counts agents too: an address that brought its share this minute gets 429."""
    client, _services = make_client(new_devices_per_minute=2)
    enroll(client)
    enroll(client)
    r = client.post("/api/v1/enroll", json=body())
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert "too many new machines" in r.json()["detail"]


def test_the_enrollment_doors_survive_fuzzing(client: TestClient, services: Services) -> None:
    """Schemathesis on the enrollment and agent doors alone, with more cases than the whole-API run: no 5xx, every
    answer as documented (400, 409, 413, 429 included)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import checks

    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    doors = [
        op.ok()
        for op in schema.get_all_operations()
        if op.ok().path.startswith(("/api/v1/enroll", "/api/v1/agent/", "/api/v1/pki/", "/api/enroll", "/api/sites"))
    ]
    assert len(doors) >= 9
    failures = []
    for operation in doors:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
        )
        def fuzz(case: Any) -> None:
            case.call_and_validate(
                checks=[
                    checks.not_a_server_error,
                    checks.status_code_conformance,
                    checks.content_type_conformance,
                    checks.response_schema_conformance,
                ]
            )

        try:
            fuzz()
        except Exception as exc:
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n\n".join(failures)


def test_the_crl_number_is_derived_and_grows(client: TestClient, services: Services, clock: ManualClock) -> None:
    """The CRL's number is derived (no counter to bump on every fetch of a door without credentials): two fetches
    get the same number, a revocation and a reissue each a higher one."""
    from cryptography.x509 import CRLNumber

    def number() -> int:
        crl = x509.load_der_x509_crl(client.get("/api/v1/pki/crl").content)
        return crl.extensions.get_extension_for_class(CRLNumber).value.crl_number

    first = number()
    assert number() == first
    payload, _ = enroll(client)
    services.agents.approve(Actor.cli(), payload["machine_id"])
    clock.advance(seconds=1)
    services.agents.revoke(Actor.cli(), payload["machine_id"])
    revoked = number()
    assert revoked > first
    clock.advance(hours=13)  # past the reissue window
    assert number() > revoked


def test_a_refused_second_enrollment_is_counted(client: TestClient, services: Services, clock: ManualClock) -> None:
    # On the test's clock: refusals are counted per minute, and three must not straddle two.
    payload, _ = enroll(client)
    for _ in range(3):
        assert client.post("/api/v1/enroll", json=body(payload["machine_id"])).status_code == 409
    with services.db.read() as s:
        [row] = s.scalars(select(Refusal).where(Refusal.action == "enroll_refused")).all()
        assert (row.subject, row.count) == (payload["machine_id"], 3)
