"""Ktizo's own mTLS listener, over real TLS handshakes against a real ``ktizo serve`` process: check-in and renewal
with the agent's certificate, revocation checked on every request, foreign and missing client certificates refused
in the handshake (by httpx, and by openssl s_client and curl, clients we did not write), a port in use."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ktizo.app.wiring import build_services
from ktizo.services.context import Actor
from ktizo.services.registry import Services
from ktizo.settings import Settings
from tests.agents.support import body, csr_pem, key

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    mtls_port: int
    services: Services
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Host:
    """An enrolled host's files, as ktizo-agent writes them."""

    dir: Path
    machine_id: str
    bundle: dict[str, Any]

    @property
    def cert(self) -> Path:
        return self.dir / "server.pem"

    @property
    def key(self) -> Path:
        return self.dir / "server.key.pem"

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.cert), str(self.key))
        return context

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.bundle["mtls_url"], verify=self.context(), timeout=10)


def start(tmp_path: Path, database_url: str, *extra: str, **env_over: str) -> Server:
    port, mtls = free_port(), free_port()
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "server"
    env = {
        **os.environ,
        "KTIZO_DATA_DIR": str(data),
        "KTIZO_DATABASE_URL": database_url,
        "KTIZO_ENROLL_POLL_SECONDS": "1",
        "KTIZO_LAST_SEEN_INTERVAL": "0",
        **env_over,
    }
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "ktizo", "serve", "--host", "127.0.0.1", "--port", str(port), "--mtls-port", str(mtls)]
    proc = subprocess.Popen([*cmd, *extra], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ktizo serve exited: {log.read_text()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200 and _listening(mtls):
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    else:
        proc.kill()
        raise AssertionError(f"ktizo serve did not start: {log.read_text()}")
    settings = Settings(data_dir=tmp_path / "cli", database_url=database_url)
    return Server(url=url, mtls_port=mtls, services=build_services(settings), proc=proc, log=log)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture
def server(tmp_path: Path, database_url: str) -> Iterator[Server]:
    srv = start(tmp_path, database_url)
    yield srv
    srv.proc.terminate()
    try:
        srv.proc.wait(10)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
    srv.services.db.dispose()


def enrolled(server: Server, tmp_path: Path, name: str = "web-01") -> Host:
    """Enroll through the door, approve, pick up, and write the files the way the agent does."""
    private = key()
    payload = body(private_key=private, hostname=name)
    r = httpx.post(f"{server.url}/api/v1/enroll", json=payload)
    assert r.status_code == 202, r.text
    token = r.json()["polling_token"]
    server.services.agents.approve(Actor.cli(), payload["machine_id"])
    r = httpx.get(f"{server.url}/api/v1/enroll/status/{token}")
    assert r.status_code == 200, r.text
    bundle = r.json()
    host = Host(dir=tmp_path / name, machine_id=payload["machine_id"], bundle=bundle)
    host.dir.mkdir()
    host.cert.write_text(bundle["server_crt"])
    host.ca.write_text(bundle["ca_crt"])
    host.key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return host


def foreign_client(tmp_path: Path) -> tuple[Path, Path]:
    """A client certificate from a CA Ktizo never heard of, with the same names as a real agent's."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Ktizo agent CA")])  # same name, other key
    now = time.time()
    import datetime as dt

    start_at = dt.datetime.fromtimestamp(now - 60, dt.UTC)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web-01")]))
        .issuer_name(name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start_at)
        .not_valid_after(start_at + dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    cert, keyfile = tmp_path / "foreign.pem", tmp_path / "foreign.key.pem"
    cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, keyfile


def test_bundle_points_at_the_mtls_listener_and_checkin_works(server: Server, tmp_path: Path) -> None:
    host = enrolled(server, tmp_path)
    assert host.bundle["mtls_url"] == f"https://127.0.0.1:{server.mtls_port}"
    assert host.bundle["manager_addresses"] == ["127.0.0.1"]
    with host.client() as c:
        r = c.post("/api/v1/agent/checkin", json={"facts": {"cpu": {"logical_cpus": 8}}, "listen_port": 9443})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "approved"
    agent = server.services.agents.resolve(host.machine_id)
    assert agent.agent_address == "127.0.0.1:9443"
    assert agent.facts["host"] == {"cpu": {"logical_cpus": 8}}
    assert agent.last_seen is not None


def test_the_listener_presents_a_certificate_of_the_agent_ca(server: Server) -> None:
    """The agent pins the CA: the listener's certificate chains to it and names the address agents use."""
    ca = server.services.authority.ca_pem()
    context = ssl.create_default_context(cadata=ca)
    context.check_hostname = True
    with socket.create_connection(("127.0.0.1", server.mtls_port)) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.getpeercert()
                verified = True
        except ssl.SSLError as exc:  # TLS 1.3: the missing client certificate is reported after the handshake
            verified = "CERTIFICATE_VERIFY_FAILED" not in str(exc)
    assert verified


def test_renewal_gives_a_new_certificate_for_a_new_key(server: Server, tmp_path: Path) -> None:
    host = enrolled(server, tmp_path)
    new_key = key()
    with host.client() as c:
        r = c.post("/api/v1/agent/renew", json={"csr_pem": csr_pem(new_key)})
    assert r.status_code == 200, r.text
    new = x509.load_pem_x509_certificate(r.json()["server_crt"].encode())
    old = x509.load_pem_x509_certificate(host.bundle["server_crt"].encode())
    assert new.serial_number != old.serial_number
    assert new.subject == old.subject
    der = serialization.PublicFormat.SubjectPublicKeyInfo
    assert new.public_key().public_bytes(serialization.Encoding.DER, der) == new_key.public_key().public_bytes(
        serialization.Encoding.DER, der
    )
    # The same key again is no renewal.
    same = host.key.read_bytes()
    current = serialization.load_pem_private_key(same, None)
    with host.client() as c:
        r = c.post("/api/v1/agent/renew", json={"csr_pem": csr_pem(current)})
    assert r.status_code == 400
    reasons = [
        c.reason for c in server.services.agents.certificates(server.services.agents.resolve(host.machine_id).id)
    ]
    assert sorted(reasons) == ["enroll", "renew"]


def test_a_revoked_certificate_is_refused_on_the_next_request_and_listed_in_the_crl(
    server: Server, tmp_path: Path
) -> None:
    host = enrolled(server, tmp_path)
    with host.client() as c:
        assert c.post("/api/v1/agent/checkin", json={"facts": {}}).status_code == 200
        server.services.agents.revoke(Actor.cli(), host.machine_id)
        # Same kept-alive connection: revocation is checked per request, not per handshake.
        r = c.post("/api/v1/agent/checkin", json={"facts": {}})
        assert r.status_code == 403
        assert "revoked" in r.json()["detail"]
        assert c.post("/api/v1/agent/renew", json={"csr_pem": csr_pem(key())}).status_code == 403
    serial = x509.load_pem_x509_certificate(host.bundle["server_crt"].encode()).serial_number
    crl = x509.load_der_x509_crl(httpx.get(f"{server.url}/api/v1/pki/crl").content)
    ca = x509.load_pem_x509_certificate(server.services.authority.ca_pem().encode())
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None


def test_a_purged_agent_cannot_check_in(server: Server, tmp_path: Path) -> None:
    host = enrolled(server, tmp_path)
    server.services.agents.purge(Actor.cli(), host.machine_id)
    with host.client() as c:
        assert c.post("/api/v1/agent/checkin", json={"facts": {}}).status_code == 403


def test_a_foreign_ca_or_no_certificate_is_refused_in_the_handshake(server: Server, tmp_path: Path) -> None:
    host = enrolled(server, tmp_path)
    cert, keyfile = foreign_client(tmp_path)
    context = ssl.create_default_context(cafile=str(host.ca))
    context.load_cert_chain(str(cert), str(keyfile))
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        httpx.post(f"{host.bundle['mtls_url']}/api/v1/agent/checkin", json={"facts": {}}, verify=context)
    bare = ssl.create_default_context(cafile=str(host.ca))
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        httpx.post(f"{host.bundle['mtls_url']}/api/v1/agent/checkin", json={"facts": {}}, verify=bare)


@pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("curl") is None, reason="needs openssl and curl")
def test_real_clients_openssl_and_curl(server: Server, tmp_path: Path) -> None:
    """Clients we did not write: curl with the agent's certificate gets in; with a foreign one the handshake fails;
    openssl s_client with a foreign certificate is hung up on without an answer."""
    host = enrolled(server, tmp_path)
    url = f"{host.bundle['mtls_url']}/api/v1/agent/checkin"
    common = ["curl", "-sS", "--cacert", str(host.ca), "-H", "content-type: application/json", "-d", '{"facts": {}}']
    ok = subprocess.run(
        [*common, "--cert", str(host.cert), "--key", str(host.key), url], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert '"status":"approved"' in ok.stdout

    cert, keyfile = foreign_client(tmp_path)
    bad = subprocess.run([*common, "--cert", str(cert), "--key", str(keyfile), url], capture_output=True, text=True)
    assert bad.returncode != 0
    assert "approved" not in bad.stdout

    s_client = subprocess.run(
        [
            "openssl",
            "s_client",
            "-tls1_2",  # the client certificate is judged inside the handshake
            "-connect",
            f"127.0.0.1:{server.mtls_port}",
            "-CAfile",
            str(host.ca),
            "-cert",
            str(cert),
            "-key",
            str(keyfile),
            "-verify_return_error",
        ],
        input="GET /healthz HTTP/1.0\r\n\r\n",
        capture_output=True,
        text=True,
        timeout=20,
    )
    out = s_client.stdout + s_client.stderr
    # The server verifies, refuses and hangs up inside the handshake: no session, no HTTP answer.
    assert s_client.returncode != 0, out
    assert "HTTP/1" not in s_client.stdout
    assert "alert" in out.lower() or "unexpected eof" in out.lower()


def test_a_port_in_use_is_a_clear_error_at_start(tmp_path: Path, database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "KTIZO_DATA_DIR": str(tmp_path / "d"), "KTIZO_DATABASE_URL": database_url}
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "ktizo",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
                "--mtls-port",
                str(port),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert r.returncode == 2
    assert f"cannot open the mTLS listener on 127.0.0.1:{port}" in r.stderr
    assert "--mtls-port 0" in r.stderr


def test_two_agent_processes_with_one_machine_id(server: Server, tmp_path: Path) -> None:
    """Two ktizo-agent processes (a cloned image, say) enroll with one machine-id at once: one enrollment exists,
    the other process is told 409 and what to do; after approval only the first gets the certificate."""
    machine_id_file = tmp_path / "machine-id"
    machine_id_file.write_text(secrets.token_hex(16) + "\n")
    os_release = tmp_path / "os-release"
    os_release.write_text('ID=debian\nVERSION_ID="12"\n')
    fingerprint = server.services.authority.fingerprint()

    def agent(n: int, *extra: str) -> subprocess.Popen[str]:
        home = tmp_path / f"host{n}"
        return subprocess.Popen(
            [
                sys.executable, "-m", "ktizo_agent", "enroll", server.url, "--ca-fingerprint", fingerprint,
                "--config", str(home / "config.yaml"), "--cert-dir", str(home / "certs"),
                "--whitelist", str(home / "whitelist.yaml"), "--machine-id-file", str(machine_id_file),
                "--os-release-file", str(os_release), "--hostname", "web-01", "--ip-address", "10.0.7.21", *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    first, second = agent(1, "--max-attempts", "3"), agent(2, "--max-attempts", "3")
    outcomes = sorted((p.wait(60), p.stderr.read() if p.stderr else "") for p in (first, second))
    (refused, refused_err), (waited, _) = outcomes
    assert (refused, waited) == (1, 5), outcomes  # 409 at once; the other polled 3 times and gave up, pending
    assert "enrollment" in refused_err.lower() and "purge" in refused_err.lower()
    assert len(server.services.agents.list()) == 1
    winner = (
        1
        if (tmp_path / "host1" / "config.yaml").exists()
        and "polling_token" in (tmp_path / "host1" / "config.yaml").read_text()
        else 2
    )

    server.services.agents.approve(Actor.cli(), machine_id_file.read_text().strip())
    done = agent(winner)
    assert done.wait(60) == 0, done.stderr.read() if done.stderr else ""
    assert (tmp_path / f"host{winner}" / "certs" / "server.pem").is_file()
    loser = agent(3 - winner, "--max-attempts", "1")
    assert loser.wait(60) == 1
    assert not (tmp_path / f"host{3 - winner}" / "certs" / "server.pem").exists()


def test_the_lockout_is_shared_by_two_server_processes(tmp_path: Path, database_url: str) -> None:
    """Refused keys counted by one Ktizo process lock the pair out on another one over the same database."""
    one = start(tmp_path / "one", database_url, KTIZO_NEW_DEVICES_PER_MINUTE="0")
    two = start(tmp_path / "two", database_url, KTIZO_NEW_DEVICES_PER_MINUTE="0")
    try:
        one.services.sites.create(Actor.cli(), "fra1")
        cek, _ = one.services.sites.rotate_key(Actor.cli(), "fra1")

        def attempt(server: Server, key_text: str) -> httpx.Response:
            payload = body(hostname="web-01")
            payload.pop("machine_id")
            payload.update(site_code="fra1", enrollment_key=key_text, machine_uid=secrets.token_hex(32))
            return httpx.post(f"{server.url}/api/enroll", json=payload, timeout=20)

        wrong = "cek_" + secrets.token_urlsafe(32)
        assert [attempt(one, wrong).status_code for _ in range(3)] == [401, 401, 401]
        assert [attempt(two, wrong).status_code for _ in range(2)] == [401, 401]
        locked = attempt(one, cek)
        assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
        assert attempt(two, cek).status_code == 429
    finally:
        for server in (one, two):
            server.proc.terminate()
            server.proc.wait(10)
            server.services.db.dispose()
