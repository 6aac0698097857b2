"""deploy/nginx/ktizo.conf, the very file operators copy, run by Debian's nginx in front of a real ``ktizo serve``:
the real ktizo-agent enrolls through nginx's https server and checks in through its mTLS server; nginx refuses
clients without a certificate of the agent CA; a client cannot forge Client-Cert or its own address through either
server; and Ktizo records the client's address, not nginx's."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ktizo.domain.devices import DeviceStatus
from ktizo.services.context import Actor
from ktizo.settings import Settings
from tests.agents.test_mtls import Host, Server, enrolled, foreign_client, free_port, start

pytestmark = pytest.mark.slow

SHIPPED = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "ktizo.conf"
CLIENT = "127.0.0.2"  # the test's clients connect from here; nginx reaches Ktizo from 127.0.0.1


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.fail(
            "nginx is not installed: this test runs Debian's nginx in front of ktizo serve. "
            "scripts/test installs it (APT_PACKAGES); by hand: apt-get install nginx"
        )
    return found


def _pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def web_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """The operator's certificate for the https server (its own CA, as a company CA would be): cert, key, CA."""
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Operators' CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ktizo.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True)
    cert, keyfile, cafile = directory / "server.pem", directory / "server.key.pem", directory / "ca.pem"
    cert.write_bytes(_pem(leaf) + _pem(ca))
    keyfile.write_bytes(_pem(key))
    cafile.write_bytes(_pem(ca))
    return cert, keyfile, cafile


def render(tmp_path: Path, ktizo_port: int, tls_port: int, mtls_port: int, data_dir: Path, agent_ca: Path) -> Path:
    """The shipped file with its EDIT values replaced by the test's ports and paths, included from a wrapper that
    keeps nginx's pid, logs and temp files in tmp_path."""
    web = tmp_path / "web"
    values = {
        "server 127.0.0.1:8000;": f"server 127.0.0.1:{ktizo_port};",
        "listen 443 ssl;": f"listen 127.0.0.1:{tls_port} ssl;",
        "listen 8443 ssl;": f"listen 127.0.0.1:{mtls_port} ssl;",
        "/etc/ssl/ktizo/": f"{web}/",
        "/var/lib/ktizo/tls/": f"{data_dir}/tls/",
        "/etc/nginx/ktizo-agent-ca.pem": str(agent_ca),
    }
    text = SHIPPED.read_text()
    for placeholder, value in values.items():
        assert placeholder in text, f"{SHIPPED} no longer has {placeholder!r}: update this test's rendering"
        text = text.replace(placeholder, value)
    directives = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert not re.search(r"/etc/|/var/|\b443\b|\b8443\b", directives), "a path or port the test does not control"
    site = tmp_path / "nginx" / "ktizo.conf"
    site.parent.mkdir()
    site.write_text(text)
    prefix = site.parent
    wrapper = prefix / "nginx.conf"
    temp = " ".join(
        f"{kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    wrapper.write_text(
        f"daemon off;\nmaster_process off;\nworker_processes 1;\npid {prefix}/nginx.pid;\n"
        f"error_log {prefix}/error.log info;\nevents {{ worker_connections 64; }}\n"
        f"http {{\n    access_log {prefix}/access.log;\n    {temp}\n    include {site};\n}}\n"
    )
    return wrapper


@dataclass
class Stack:
    ktizo: Server
    tls_url: str
    mtls_url: str
    web_ca: Path
    tmp: Path

    def operator_client(self) -> httpx.Client:
        """An https client of the web server, connecting from CLIENT."""
        transport = httpx.HTTPTransport(
            verify=ssl.create_default_context(cafile=str(self.web_ca)), local_address=CLIENT
        )
        return httpx.Client(base_url=self.tls_url, transport=transport, timeout=10)

    def agent_client(self, host: Host) -> httpx.Client:
        """An agent of the mTLS server: Ktizo's CA as its only trust root, its certificate presented."""
        transport = httpx.HTTPTransport(verify=host.context(), local_address=CLIENT)
        return httpx.Client(base_url=self.mtls_url, transport=transport, timeout=10)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture
def stack(tmp_path: Path, database_url: str) -> Iterator[Stack]:
    binary = nginx_binary()
    tls_port, mtls_port = free_port(), free_port()
    mtls_url = f"https://127.0.0.1:{mtls_port}"
    ktizo = start(
        tmp_path / "ktizo",
        database_url,
        KTIZO_TRUSTED_PROXIES="127.0.0.1/32",
        KTIZO_MTLS_URL=mtls_url,
        KTIZO_PUBLIC_URL=f"https://127.0.0.1:{tls_port}",
        KTIZO_LONG_POLL_SECONDS="1",
    )
    nginx: subprocess.Popen[bytes] | None = None
    try:
        _cert, _key, web_ca = web_certificate(tmp_path / "web")
        # The agent CA exactly as the docs say to get it: `ktizo pki ca`.
        env = {**os.environ, "KTIZO_DATA_DIR": str(tmp_path / "cli"), "KTIZO_DATABASE_URL": database_url}
        ca = subprocess.run(
            [sys.executable, "-m", "ktizo", "pki", "ca"], env=env, capture_output=True, text=True, check=True
        )
        agent_ca = tmp_path / "agent-ca.pem"
        agent_ca.write_text(ca.stdout)
        port = int(ktizo.url.rsplit(":", 1)[1])
        conf = render(tmp_path, port, tls_port, mtls_port, tmp_path / "ktizo" / "server", agent_ca)
        prefix = conf.parent
        args = [binary, "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "error.log")]
        check = subprocess.run([*args, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, f"nginx -t refused the rendered deploy/nginx/ktizo.conf:\n{check.stderr}"
        log = prefix / "nginx.out"
        with log.open("wb") as out:
            nginx = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while not (_listening(tls_port) and _listening(mtls_port)):
            if nginx.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"nginx did not start:\n{log.read_text()}\n{(prefix / 'error.log').read_text()}")
            time.sleep(0.05)
        yield Stack(
            ktizo=ktizo, tls_url=f"https://127.0.0.1:{tls_port}", mtls_url=mtls_url, web_ca=web_ca, tmp=tmp_path
        )
    finally:
        if nginx is not None:
            nginx.send_signal(signal.SIGQUIT)
            try:
                nginx.wait(10)
            except subprocess.TimeoutExpired:
                nginx.kill()
                nginx.wait()
        ktizo.proc.terminate()
        try:
            ktizo.proc.wait(10)
        except subprocess.TimeoutExpired:
            ktizo.proc.kill()
        ktizo.services.db.dispose()


def agent_command(stack: Stack, home: Path, command: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "ktizo_agent", "--config", str(home / "config.yaml"), "--cert-dir", str(home / "certs"),
        "--whitelist", str(home / "whitelist.yaml"), "--machine-id-file", str(home / "machine-id"),
        "--os-release-file", str(home / "os-release"), "--hostname", "web-07", "--ip-address", "10.0.7.27",
        command, *extra,
    ]  # fmt: skip


def test_the_real_agent_enrolls_over_https_and_checks_in_through_the_mtls_server(stack: Stack) -> None:
    """ktizo-agent, a client we did not write for this test: enrollment through nginx's https server (verified
    with the operators' CA), approval, then a check-in through the mTLS server that Ktizo records as that agent."""
    home = stack.tmp / "host"
    home.mkdir()
    machine_id = "4c4c4544004c4d10804bb4c04f4d3232"
    (home / "machine-id").write_text(machine_id + "\n")
    (home / "os-release").write_text('ID=debian\nVERSION_ID="12"\n')
    services = stack.ktizo.services
    enroll = subprocess.Popen(
        agent_command(
            stack, home, "enroll", stack.tls_url, "--ca-fingerprint", services.authority.fingerprint(),
            "--manager-ca", str(stack.web_ca), "--max-attempts", "30",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not services.agents.list(status=DeviceStatus.PENDING):
            assert enroll.poll() is None, enroll.communicate()
            assert time.monotonic() < deadline, "the agent's enrollment never reached Ktizo through nginx"
            time.sleep(0.1)
        services.agents.approve(Actor.cli(), machine_id)
        _out, err = enroll.communicate(timeout=30)
    finally:
        if enroll.poll() is None:
            enroll.kill()
            enroll.wait()
    assert enroll.returncode == 0, err
    assert stack.mtls_url in (home / "config.yaml").read_text()  # the bundle sent it to nginx's mTLS server
    agent = services.agents.resolve(machine_id)
    assert "checked_in" not in (agent.facts or {})

    checkin = subprocess.run(agent_command(stack, home, "checkin"), capture_output=True, text=True, timeout=30)
    assert checkin.returncode == 0, checkin.stderr
    agent = services.agents.resolve(machine_id)
    assert agent.last_seen is not None
    assert "checked_in" in agent.facts and agent.facts["host"]  # the facts it sent


def test_nginx_refuses_clients_without_a_certificate_of_the_agent_ca(stack: Stack) -> None:
    host = enrolled(stack.ktizo, stack.tmp)
    url = f"{stack.mtls_url}/api/v1/agent/checkin"

    bare = httpx.post(url, json={"facts": {}}, verify=ssl.create_default_context(cafile=str(host.ca)))
    assert bare.status_code == 400
    assert "No required SSL certificate was sent" in bare.text  # nginx's own page: Ktizo never saw it

    cert, keyfile = foreign_client(stack.tmp)
    context = ssl.create_default_context(cafile=str(host.ca))
    context.load_cert_chain(str(cert), str(keyfile))
    foreign = httpx.post(url, json={"facts": {}}, verify=context)
    assert foreign.status_code == 400
    assert "The SSL certificate error" in foreign.text
    # Even with a certificate of the agent CA, the mTLS server passes on the agents' door and nothing else.
    with stack.agent_client(host) as c:
        assert c.get("/api/v1/agents").status_code == 404
    assert "host" not in (stack.ktizo.services.agents.resolve(host.machine_id).facts or {})  # no check-in


def test_a_forged_client_cert_header_gives_no_agent_identity(stack: Stack) -> None:
    """An agent's certificate is public (it is in every handshake), its key is not: a client holding another
    agent's certificate cannot pass it off as its own in Client-Cert, through either server."""
    victim, other = enrolled(stack.ktizo, stack.tmp, "web-01"), enrolled(stack.ktizo, stack.tmp, "web-02")
    services = stack.ktizo.services
    pem = victim.cert.read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    forged = {
        "rfc9440": ":" + base64.b64encode(der).decode() + ":",
        "escaped": urllib.parse.quote(pem, safe="-._~"),
    }
    with stack.operator_client() as c:  # the https server: no client certificate checked there
        for value in forged.values():
            r = c.post("/api/v1/agent/checkin", json={"facts": {"forged": True}}, headers={"Client-Cert": value})
            assert r.status_code == 403, r.text
            assert "needs the agent's client certificate" in r.json()["detail"]
    assert "host" not in (services.agents.resolve(victim.machine_id).facts or {})

    with stack.agent_client(other) as c:  # the mTLS server: nginx's Client-Cert is the one verified
        for value in forged.values():
            r = c.post("/api/v1/agent/checkin", json={"facts": {"who": "web-02"}}, headers={"Client-Cert": value})
            assert r.status_code == 200, r.text
    assert "host" not in (services.agents.resolve(victim.machine_id).facts or {})
    assert services.agents.resolve(other.machine_id).facts["host"] == {"who": "web-02"}


def test_ktizo_sees_the_clients_address_not_nginx(stack: Stack) -> None:
    """Through both servers Ktizo records the address the client connected to nginx from, whatever forwarding
    headers the client made up: a new machine's first address (the new-machine budget counts it), and an agent's
    address, where `ktizo agents probe` will connect."""
    services = stack.ktizo.services
    lies = {"X-Forwarded-For": "203.0.113.9", "Forwarded": "for=203.0.113.10"}
    with stack.operator_client() as c:
        page = c.get("/ui/login")
        assert page.status_code == 200 and "<form" in page.text
        r = c.get("/api/v1/config/download", params={"mac": "52:54:00:aa:bb:07"}, headers=lies)
        assert r.status_code == 403 and "pending" in r.text  # after the (short) long poll, through nginx
    device = services.devices.resolve("52:54:00:aa:bb:07")
    assert device.first_ip == CLIENT

    host = enrolled(stack.ktizo, stack.tmp)
    with stack.agent_client(host) as c:
        r = c.post("/api/v1/agent/checkin", json={"facts": {}, "listen_port": 9443}, headers=lies)
    assert r.status_code == 200, r.text
    agent = services.agents.resolve(host.machine_id)
    assert agent.last_ip == CLIENT
    assert agent.agent_address == f"{CLIENT}:9443"


def test_nginx_waits_longer_than_ktizo_holds_a_config_request() -> None:
    """A pending machine's config request is held KTIZO_LONG_POLL_SECONDS: nginx must not time it out first."""
    held = Settings.model_fields["long_poll_seconds"].default
    timeouts = [int(t) for t in re.findall(r"^\s*proxy_read_timeout (\d+)s;", SHIPPED.read_text(), re.M)]
    assert len(timeouts) == 2 and min(timeouts) > held, timeouts
