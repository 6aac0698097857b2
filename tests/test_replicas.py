"""Replicas: two ``ktizo serve`` processes (replica A on 127.0.0.1, replica B on 127.0.0.2, as on two hosts) on one
PostgreSQL, with Debian's nginx running the shipped deploy/nginx/ktizo.conf in front of both as the load balancer.

What an operator running several replicas must be able to count on: an approval made through one replica answers
the config request another one holds, at once; machines knocking at both replicas at the same moment are each one
row; each background job's work (webhook deliveries, expiry) is done once, not once per replica; a password
lockout earned on one replica holds on the other; and a replica killed in the middle of a boot storm loses no
approval it acknowledged while the other goes on serving.

The test's clients connect from 127.0.0.3 (a machine's download in the storm from an address of its own), so that
the address Ktizo records is visibly the client's: nginx reaches both replicas from 127.0.0.1, the one trusted
proxy, and passes the client's address in X-Forwarded-For."""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select, update

from ktizo.db.models import AuditEvent, Device, Event, WebhookDelivery
from ktizo.db.types import utcnow
from ktizo.domain.devices import DeviceStatus, Role
from ktizo.domain.users import UserRole
from ktizo.services.context import Actor
from ktizo.services.devices import DeviceQuery
from ktizo.services.queries import AuditQuery
from ktizo.services.registry import Services
from ktizo.services.users import LOGIN_FAILURES_PER_USER
from ktizo.talos import load_documents
from tests.support import TALOS_FIXTURES, TALOS_HEADERS, bearer, make_token, talos_url
from tests.test_nginx_proxy import SHIPPED, nginx_binary, web_certificate
from tests.webhook_receiver import Receiver

pytestmark = [pytest.mark.slow, pytest.mark.postgres_only]
log = logging.getLogger(__name__)

A_HOST, B_HOST = "127.0.0.1", "127.0.0.2"  # two replicas, as on two hosts
PROXY = "127.0.0.1"  # the address nginx reaches both replicas from (the kernel's source for 127.0.0.0/8)
CLIENT = "127.0.0.3"  # the test's operators and machines connect from here
LONG_POLL = 30  # seconds a pending machine's config request is held (KTIZO_LONG_POLL_SECONDS)
PASSWORD = "correct horse battery staple"


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def until(what: Callable[[], bool], timeout: float, message: Callable[[], str]) -> None:
    """Wait for ``what``; the timeout is how long to wait before calling the test a failure, not a speed bound."""
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(message())
        time.sleep(0.05)


@dataclass
class Replica:
    """One ``ktizo serve`` process, listening on its own address as it would on its own host."""

    name: str
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """How nginx's $upstream_addr names it."""
        return f"{self.host}:{self.port}"

    def client(self, local: str = CLIENT, timeout: float = LONG_POLL + 10) -> httpx.Client:
        """A client talking to this replica directly (not through nginx), from ``local``."""
        transport = httpx.HTTPTransport(local_address=local)
        return httpx.Client(base_url=self.url, transport=transport, timeout=timeout)

    def held(self) -> int:
        """Config requests this process holds open now (its own ``ktizo_held_long_polls`` gauge)."""
        with self.client() as c:
            text = c.get("/metrics").text
        found = re.search(r"^ktizo_held_long_polls (\S+)$", text, re.M)
        assert found is not None, text[:2000]
        return int(float(found.group(1)))

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def launch(name: str, host: str, data: Path, database_url: str) -> Replica:
    """``ktizo serve`` on ``host``, started without waiting for it (both replicas start at once, as a fleet of
    hosts booted together would)."""
    port = free_port(host)
    data.mkdir(parents=True)
    env = {
        **os.environ,
        "KTIZO_DATA_DIR": str(data / "server"),
        "KTIZO_DATABASE_URL": database_url,
        "KTIZO_LONG_POLL_SECONDS": str(LONG_POLL),
        "KTIZO_TRUSTED_PROXIES": f"{PROXY}/32",
        "KTIZO_LAST_SEEN_INTERVAL": "0",
        "PYTHONUNBUFFERED": "1",
    }
    log = data / "serve.log"
    cmd = [sys.executable, "-m", "ktizo", "serve", "--host", host, "--port", str(port), "--mtls-port", "0"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Replica(name=name, host=host, port=port, proc=proc, log=log)


def wait_serving(replica: Replica) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if replica.proc.poll() is not None:
            raise AssertionError(f"replica {replica.name} exited at start:\n{replica.output()}")
        try:
            with replica.client(timeout=1) as c:
                if c.get("/healthz").status_code == 200:
                    return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"replica {replica.name} did not start:\n{replica.output()}")


def render(tmp: Path, replicas: list[Replica], tls_port: int, mtls_port: int) -> Path:
    """The shipped file with its upstream holding every replica and its other EDIT values replaced by the test's
    ports and paths, included from a wrapper that keeps nginx's pid, logs and temp files in ``tmp`` and logs which
    replica answered each request (``$upstream_addr``)."""
    web = tmp / "web"
    _cert, _key, ca = web_certificate(web)
    # The mTLS server (agents' door) is not what these tests are about; it gets the operators' certificate so that
    # the shipped file is run whole, unchanged but for the EDIT values.
    tls = tmp / "tls"
    tls.mkdir()
    (tls / "listener.pem").write_bytes((web / "server.pem").read_bytes())
    (tls / "listener.key.pem").write_bytes((web / "server.key.pem").read_bytes())
    values = {
        "server 127.0.0.1:8000;": " ".join(f"server {r.address};" for r in replicas),
        "listen 443 ssl;": f"listen 127.0.0.1:{tls_port} ssl;",
        "listen 8443 ssl;": f"listen 127.0.0.1:{mtls_port} ssl;",
        "/etc/ssl/ktizo/": f"{web}/",
        "/var/lib/ktizo/tls/": f"{tls}/",
        "/etc/nginx/ktizo-agent-ca.pem": str(ca),
    }
    text = SHIPPED.read_text()
    for placeholder, value in values.items():
        assert placeholder in text, f"{SHIPPED} no longer has {placeholder!r}: update this test's rendering"
        text = text.replace(placeholder, value)
    directives = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert not re.search(r"/etc/|/var/|\b443\b|\b8443\b", directives), "a path or port the test does not control"
    prefix = tmp / "nginx"
    prefix.mkdir()
    site = prefix / "ktizo.conf"
    site.write_text(text)
    temp = " ".join(
        f"{kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    wrapper = prefix / "nginx.conf"
    wrapper.write_text(
        f"daemon off;\nmaster_process off;\nworker_processes 1;\npid {prefix}/nginx.pid;\n"
        f"error_log {prefix}/error.log info;\nevents {{ worker_connections 1024; }}\n"
        "http {\n"
        '    log_format replicas \'$msec $remote_addr "$request" $status "$upstream_addr" "$upstream_status"\';\n'
        f"    access_log {prefix}/access.log replicas;\n    {temp}\n    include {site};\n}}\n"
    )
    return wrapper


@dataclass(frozen=True)
class Logged:
    """One line of nginx's access log: when, the request, its status, and the replica(s) nginx tried, in order."""

    at: float
    request: str
    status: int
    upstreams: tuple[str, ...]


@dataclass
class Stack:
    a: Replica
    b: Replica
    url: str  # nginx's https server
    web_ca: Path
    access_log: Path
    nginx_log: Path
    services: Services  # the test's own view of the shared database
    ops: dict[str, str]  # an operator's bearer token

    def lb(self, local: str = CLIENT, timeout: float = LONG_POLL + 10) -> httpx.Client:
        """A client of nginx's https server (the load balancer), connecting from ``local``."""
        context = ssl.create_default_context(cafile=str(self.web_ca))
        transport = httpx.HTTPTransport(verify=context, local_address=local)
        return httpx.Client(base_url=self.url, transport=transport, timeout=timeout)

    def logged(self) -> list[Logged]:
        lines = []
        pattern = re.compile(r'^(\S+) \S+ "([^"]*)" (\d+) "([^"]*)" "[^"]*"$')
        for line in self.access_log.read_text().splitlines():
            found = pattern.match(line)
            assert found is not None, line
            at, request, status, upstreams = found.groups()
            tried = tuple(u.strip() for u in re.split(r"[,:] (?=\d)", upstreams) if u.strip() and u != "-")
            lines.append(Logged(float(at), request, int(status), tried))
        return lines

    def device(self, mac: str) -> Device:
        return self.services.devices.resolve(mac)

    def errors(self) -> str:
        """The exceptions the replicas logged (a traceback's last line), counted."""
        found = Counter(
            f"replica {replica.name}: {line}"
            for replica in (self.a, self.b)
            for line in replica.output().splitlines()
            if re.match(r"^[a-z_.]+\.[A-Za-z]+(Error|Detected|Exception)\b", line)
        )
        return "\n".join(f"{n} x {line}" for line, n in found.items())

    def logs(self) -> str:
        return (
            f"--- replica A ---\n{self.a.output()[-4000:]}\n--- replica B ---\n{self.b.output()[-4000:]}\n"
            f"--- nginx ---\n{self.nginx_log.read_text()[-4000:]}"
        )


@pytest.fixture
def make_stack(tmp_path: Path, database_url: str, services: Services) -> Iterator[Callable[[], Stack]]:
    """``make_stack()``: both replicas on the test's PostgreSQL schema, started at once, and nginx in front of them;
    a worker base config in the database (both replicas render from it) and an operator's token. A test seeds
    the database first when the replicas' start matters to it (the expiry job runs at every start)."""
    replicas: list[Replica] = []
    nginx: list[subprocess.Popen[bytes]] = []

    def make() -> Stack:
        binary = nginx_binary()
        services.cluster.put_base(Actor.cli(), Role.WORKER, (TALOS_FIXTURES / "worker.yaml").read_bytes())
        ops = bearer(make_token(services, "ops", UserRole.OPERATOR))
        replicas.append(launch("A", A_HOST, tmp_path / "a", database_url))
        replicas.append(launch("B", B_HOST, tmp_path / "b", database_url))
        for replica in replicas:
            wait_serving(replica)
        a, b = replicas
        tls_port, mtls_port = free_port("127.0.0.1"), free_port("127.0.0.1")
        conf = render(tmp_path, [a, b], tls_port, mtls_port)
        prefix = conf.parent
        args = [binary, "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "error.log")]
        check = subprocess.run([*args, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, f"nginx -t refused the rendered deploy/nginx/ktizo.conf:\n{check.stderr}"
        out = prefix / "nginx.out"
        with out.open("wb") as sink:
            nginx.append(subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT))
        until(
            lambda: _listening("127.0.0.1", tls_port) or nginx[0].poll() is not None,
            15,
            lambda: "nginx did not start",
        )
        assert nginx[0].poll() is None, f"nginx exited:\n{out.read_text()}\n{(prefix / 'error.log').read_text()}"
        return Stack(
            a=a,
            b=b,
            url=f"https://127.0.0.1:{tls_port}",
            web_ca=tmp_path / "web" / "ca.pem",
            access_log=prefix / "access.log",
            nginx_log=prefix / "error.log",
            services=services,
            ops=ops,
        )

    try:
        yield make
    finally:
        for proc in nginx:
            proc.send_signal(signal.SIGQUIT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for replica in replicas:
            replica.stop()


@dataclass
class Call:
    """An HTTP request made in a thread (a machine's config request, held or not); when it was answered."""

    response: httpx.Response | None = None
    error: BaseException | None = None
    answered_at: float | None = None
    thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()

    def join(self, timeout: float = LONG_POLL + 15) -> httpx.Response:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the request was never answered"
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


def in_thread(request: Callable[[], httpx.Response], start: threading.Barrier | None = None) -> Call:
    call = Call()

    def run() -> None:
        try:
            if start is not None:
                start.wait(10)
            call.response = request()
        except BaseException as exc:
            call.error = exc
        finally:
            call.answered_at = time.monotonic()

    call.thread = threading.Thread(target=run, daemon=True)
    call.thread.start()
    return call


def talos_get(client_of: Callable[[], httpx.Client], mac: str) -> Callable[[], httpx.Response]:
    """A config request as Talos makes it, on a connection of its own."""

    def get() -> httpx.Response:
        with client_of() as c:
            return c.get(talos_url(mac=mac), headers=TALOS_HEADERS)

    return get


def hostname_in(response: httpx.Response) -> str:
    docs = {d.get("kind", "v1alpha1"): d for d in load_documents(response.content)}
    return str(docs["HostnameConfig"]["hostname"])


def mac(n: int) -> str:
    return f"52:54:00:7e:{n // 256:02x}:{n % 256:02x}"


def test_an_approval_through_a_answers_the_download_b_holds_within_a_second(make_stack: Callable[[], Stack]) -> None:
    """The operator clicks Approve on replica A while the machine's config request waits on replica B: the machine
    gets its config at once, not after its long poll or Talos's backoff."""
    stack = make_stack()
    machine = mac(1)
    held = in_thread(talos_get(stack.b.client, machine))
    until(lambda: stack.b.held() == 1, 10, lambda: f"B never held the request: {held}\n{stack.logs()}")
    device = stack.device(machine)
    assert (device.status, device.first_ip) == (DeviceStatus.PENDING.value, CLIENT)
    assert stack.a.held() == 0

    with stack.a.client() as c:
        sent = time.monotonic()
        r = c.post(f"/api/v1/devices/{device.id}/approve", json={"hostname": "node-via-a"}, headers=stack.ops)
        approved = time.monotonic()
    assert r.status_code == 200, r.text
    response = held.join()
    assert response.status_code == 200, response.text
    assert hostname_in(response) == "node-via-a"
    assert held.answered_at is not None
    latency = held.answered_at - approved
    log.info(
        "wake-up across replicas: %.0f ms after A's answer (%.0f ms after the approval was sent)",
        latency * 1000,
        (held.answered_at - sent) * 1000,
    )
    # A correctness bound on the cross-replica wake-up (PostgreSQL NOTIFY at A's commit reaching B's listener), as
    # the issue demands it, not a performance benchmark. Without any wake-up B would answer when its 30 s long
    # poll ends; without the NOTIFY, at its safety-net look at the database (every second while it holds one).
    assert latency < 1.0, f"B answered {latency:.3f} s after the approval through A"
    assert stack.b.held() == 0
    assert stack.device(machine).last_config_download is not None


def knock_at_once(stack: Stack, machines: list[str], per_machine: int, names: str) -> list[tuple[str, int, str]]:
    """``per_machine`` first contacts of each of ``machines`` let go at the same moment through nginx; checked,
    then approved (hostnames ``{names}-N``); returns the answers that were neither a config nor 403 pending."""
    start = threading.Barrier(len(machines) * per_machine)
    calls = {m: [in_thread(talos_get(stack.lb, m), start) for _ in range(per_machine)] for m in machines}
    every = [c for cs in calls.values() for c in cs]
    # All requests arrived: each one is answered (superseded by a newer one for its machine) or held by a replica.
    until(
        lambda: sum(not c.done for c in every) == stack.a.held() + stack.b.held(),
        20,
        lambda: f"{sum(not c.done for c in every)} unanswered, held {stack.a.held()} + {stack.b.held()}",
    )
    with stack.services.db.read() as s:
        rows = Counter(s.scalars(select(Device.mac_address).where(Device.mac_address.in_(machines))))
        ids = select(Device.id).where(Device.mac_address.in_(machines))
        registered = Counter(
            s.scalars(
                select(AuditEvent.device_id).where(AuditEvent.action == "register", AuditEvent.device_id.in_(ids))
            )
        )
    assert rows == dict.fromkeys(machines, 1), rows
    assert sorted(registered.values()) == [1] * len(machines), registered
    for m in machines:
        device = stack.device(m)
        assert (device.status, device.first_ip) == (DeviceStatus.PENDING.value, CLIENT)

    with stack.lb() as c:
        for n, m in enumerate(machines):
            approve = f"/api/v1/devices/{stack.device(m).id}/approve"
            r = c.post(approve, json={"hostname": f"{names}-{n}"}, headers=stack.ops)
            assert r.status_code == 200, r.text
    failed: list[tuple[str, int, str]] = []
    for n, m in enumerate(machines):
        answers = [c.join() for c in calls[m]]
        assert any(r.status_code == 200 for r in answers), (m, [(r.status_code, r.text) for r in answers])
        for r in answers:
            if r.status_code == 200:
                assert hostname_in(r) == f"{names}-{n}"
            elif r.status_code == 403:
                assert r.text.strip() == "Device not approved. Current status: pending"
            else:
                failed.append((m, r.status_code, r.text))
    return failed


def test_machines_knocking_at_both_replicas_at_once_are_each_one_row(make_stack: Callable[[], Stack]) -> None:
    """A boot storm's first contacts, spread by nginx over both replicas, arrive for the same machines at the same
    moment: each machine is one pending row (one `register` in the audit log), every request is answered (held,
    or told it is pending), none fails; once approved, the held ones get their configs from either replica.
    Up to three bursts of 5 machines x 12 requests (a storm is many bursts); the first with a failure ends it."""
    stack = make_stack()
    failed: list[tuple[str, int, str]] = []
    sent = 0
    for burst in range(3):
        machines = [mac(100 + 10 * burst + n) for n in range(5)]
        failed = knock_at_once(stack, machines, 12, f"race{burst}")
        sent += 5 * 12
        if failed:
            break
    # nginx's round robin spread the storm over both replicas.
    answered_by = Counter(entry.upstreams[-1] for entry in stack.logged() if "/api/v1/config/download" in entry.request)
    assert set(answered_by) == {stack.a.address, stack.b.address}, answered_by
    assert sum(answered_by.values()) == sent
    # Talos would retry a 5xx (after its backoff), but a machine knocking is not an error: none may fail.
    assert not failed, (
        f"{len(failed)} of {5 * 12} first contacts of burst {burst + 1} failed: {failed}\n{stack.errors()}"
    )


def test_each_job_is_done_once_with_both_replicas_running(make_stack: Callable[[], Stack], services: Services) -> None:
    """Both replicas run the background jobs: a webhook subscriber gets every event exactly once (one delivery
    row and one request each, though both replicas dispatch and deliver), and machines that waited too long are
    expired once (one `expire` in the audit log each, though both replicas expire at start)."""
    receiver = Receiver()
    try:
        services.webhooks.create(Actor.system(), "all", receiver.url, ["*"], secret="s3cret-s3cret-s3cret")
        stale = [services.devices.register(mac(200 + n), "10.0.0.9")[0].id for n in range(10)]
        with services.db.write() as s:  # discovered two days ago and never approved (the timeout is 24 h)
            s.execute(update(Device).where(Device.id.in_(stale)).values(first_seen=utcnow() - dt.timedelta(days=2)))
        stack = make_stack()

        def remaining() -> int:
            with services.db.read() as s:
                return int(s.scalar(select(func.count()).select_from(Device).where(Device.id.in_(stale))) or 0)

        until(lambda: remaining() == 0, 15, lambda: f"{remaining()} stale machines never expired\n{stack.logs()}")
        made = 12
        with stack.lb() as c:  # events while both run: machines pre-registered, approved and configured
            for n in range(made):
                r = c.post("/api/v1/devices", json={"mac_address": mac(300 + n)}, headers=stack.ops)
                assert r.status_code == 201, r.text
                r = c.post(
                    f"/api/v1/devices/{r.json()['id']}/approve", json={"hostname": f"job-{n}"}, headers=stack.ops
                )
                assert r.status_code == 200, r.text
                r = c.get(talos_url(mac=mac(300 + n)), headers=TALOS_HEADERS)
                assert r.status_code == 200 and hostname_in(r) == f"job-{n}", r.text

        def tally() -> tuple[int, Counter[str]]:
            with services.db.read() as s:
                events = int(s.scalar(select(func.count()).select_from(Event)) or 0)
                statuses = Counter(s.scalars(select(WebhookDelivery.status)))
            return events, statuses

        def settled() -> bool:
            events, statuses = tally()
            downloads = len(services.audit.list(AuditQuery(action="config_download"))[0])
            return downloads == made and statuses == {"delivered": events}

        until(settled, 30, lambda: f"{tally()}\n{stack.logs()}")
        time.sleep(4.5)  # two more rounds of each replica's webhook job (every 2 s): nothing more may arrive
        events, statuses = tally()
        # 10 discovered + 10 expired, 12 created + 12 approved + 12 configs downloaded
        assert events == 10 + 10 + 3 * made and statuses == {"delivered": events}
        counts = receiver.by_delivery()
        assert len(counts) == events and set(counts.values()) == {1}, counts
        assert len(receiver.requests) == events
        with services.db.read() as s:
            expired = Counter(s.scalars(select(AuditEvent.device_id).where(AuditEvent.action == "expire")))
        assert expired == dict.fromkeys(stale, 1), expired
    finally:
        receiver.stop()


def test_a_lockout_made_on_a_holds_on_b(make_stack: Callable[[], Stack], services: Services) -> None:
    """Someone guessing the admin's password through replica A is locked out; going to replica B (directly or
    through nginx) does not buy them new guesses, even with the right password. The real administrator at another
    address still signs in, through B."""
    stack = make_stack()
    services.users.create(Actor.system(), "root", UserRole.ADMIN, PASSWORD)
    with stack.a.client() as c:
        for _ in range(LOGIN_FAILURES_PER_USER):
            r = c.post("/api/v1/auth/login", json={"username": "root", "password": "wrong"})
            assert r.status_code == 401, r.text
        assert c.post("/api/v1/auth/login", json={"username": "root", "password": PASSWORD}).status_code == 429

    def refused(r: httpx.Response) -> None:
        assert r.status_code == 429, r.text
        assert r.json()["detail"].startswith("too many failed sign-ins from this address; try again in")
        assert 14 * 60 < int(r.headers["Retry-After"]) <= 15 * 60 + 1

    with stack.b.client() as c:
        refused(c.post("/api/v1/auth/login", json={"username": "root", "password": PASSWORD}))
    with stack.lb() as c:  # nginx names the client (127.0.0.3) to whichever replica answers
        for _ in range(4):
            refused(c.post("/api/v1/auth/login", json={"username": "root", "password": PASSWORD}))
    logins = [e.upstreams[-1] for e in stack.logged() if "/api/v1/auth/login" in e.request]
    assert set(logins) == {stack.a.address, stack.b.address}, logins
    with stack.b.client(local="127.0.0.4") as c:
        r = c.post("/api/v1/auth/login", json={"username": "root", "password": PASSWORD})
        assert r.status_code == 200, r.text
        assert c.get("/api/v1/auth/me", headers=bearer(r.json()["access_token"])).json()["username"] == "root"


@dataclass
class Boot:
    """A machine of the storm: asks for its config through nginx, as Talos does, until it gets it."""

    attempts: list[str] = field(default_factory=list)
    config: httpx.Response | None = None


def boot_until_configured(stack: Stack, machine: str, local: str, boot: Boot, deadline: float) -> httpx.Response:
    while time.monotonic() < deadline:
        try:
            with stack.lb(local=local) as c:
                r = c.get(talos_url(mac=machine), headers=TALOS_HEADERS)
        except httpx.TransportError as exc:
            boot.attempts.append(type(exc).__name__)
        else:
            boot.attempts.append(str(r.status_code))
            if r.status_code == 200:
                boot.config = r
                return r
        time.sleep(0.2)
    raise AssertionError(f"{machine} never got its config: {boot.attempts}")


def test_killing_a_mid_storm_loses_no_approval_and_b_goes_on(make_stack: Callable[[], Stack]) -> None:
    """A boot storm held by both replicas, an operator's tool approving the machines one by one through nginx, and
    replica A's host dies (SIGKILL) in the middle: every approval the tool was told succeeded is in the database;
    an approval in flight to A may fail, and the tool tries it again, now answered by B; every machine gets its
    config (nginx hands the config requests A held on to B); B goes on answering."""
    stack = make_stack()
    count = 30
    machines = [mac(400 + n) for n in range(count)]
    deadline = time.monotonic() + 45
    boots = {m: Boot() for m in machines}
    calls = {
        m: in_thread(functools.partial(boot_until_configured, stack, m, f"127.0.1.{10 + n}", boots[m], deadline))
        for n, m in enumerate(machines)
    }
    until(
        lambda: stack.a.held() + stack.b.held() == count,
        20,
        lambda: f"held {stack.a.held()} + {stack.b.held()} of {count}: {boots}\n{stack.logs()}",
    )
    assert stack.a.held() > 0 and stack.b.held() > 0  # both replicas hold part of the storm
    ids = {m: stack.device(m).id for m in machines}

    acknowledged: list[str] = []  # approvals answered 2xx
    earlier: list[str] = []  # retried approvals answered "already approved": an earlier try went through
    failed: list[str] = []  # tries that got no answer, or nginx's 502: tried again
    third = threading.Event()

    def approve_all() -> httpx.Response:
        with stack.lb(timeout=10) as c:
            for n, m in enumerate(machines):
                while True:
                    try:
                        r = c.post(
                            f"/api/v1/devices/{ids[m]}/approve", json={"hostname": f"storm-{n}"}, headers=stack.ops
                        )
                    except httpx.TransportError as exc:
                        failed.append(f"{m}: {exc!r}")
                    else:
                        if 200 <= r.status_code < 300:
                            acknowledged.append(m)
                            break
                        if r.status_code == 409 and "already approved" in r.text:
                            earlier.append(m)
                            break
                        assert r.status_code in (502, 504), (m, r.status_code, r.text)
                        failed.append(f"{m}: {r.status_code}")
                    time.sleep(0.1)
                if len(acknowledged) == count // 3:
                    third.set()
            return c.get("/healthz")

    approver = in_thread(approve_all)
    assert third.wait(20), f"the approvals never got a third of the way: {approver}"
    killed_at = time.time()
    stack.a.proc.send_signal(signal.SIGKILL)
    assert stack.a.proc.wait(10) == -signal.SIGKILL

    assert approver.join(40).status_code == 200
    configs = {m: call.join(50) for m, call in calls.items()}
    log.info(
        "killed A after %d approvals; %d tries failed and were retried %s; %d retries found the approval already "
        "made; machines that asked more than once: %d",
        count // 3,
        len(failed),
        failed,
        len(earlier),
        sum(1 for b in boots.values() if len(b.attempts) > 1),
    )
    by_id = {d.mac_address: d for d in stack.services.devices.list(DeviceQuery(limit=1000))[0]}
    for m in acknowledged:  # no approval that was acknowledged is lost
        assert by_id[m].status == DeviceStatus.APPROVED.value, (m, by_id[m].status)
    assert sorted(acknowledged + earlier) == sorted(machines)
    for n, m in enumerate(machines):
        device = by_id[m]
        assert (device.status, device.hostname) == (DeviceStatus.APPROVED.value, f"storm-{n}")
        assert configs[m].status_code == 200 and hostname_in(configs[m]) == f"storm-{n}", boots[m]

    # B goes on: directly, and through nginx, which sends everything to B now.
    with stack.b.client() as c:
        assert c.get("/healthz").status_code == 200
    with stack.lb() as c:
        for _ in range(4):
            assert c.get("/healthz").status_code == 200
    logged = stack.logged()
    # Config requests A held when it died: nginx read no answer from A and asked B (a GET may be sent again).
    handed_on = [e for e in logged if "/api/v1/config/download" in e.request and len(e.upstreams) > 1]
    assert handed_on and {e.upstreams for e in handed_on} == {(stack.a.address, stack.b.address)}, handed_on
    assert {e.status for e in handed_on} == {200}
    after = [e for e in logged if e.at > killed_at + 0.5 and e.status < 500]
    assert after and {e.upstreams[-1] for e in after} == {stack.b.address}, after
    # The approvals after the kill were B's: two thirds were still to make (all may be done within the half second
    # above, so they are looked for from the kill itself). One in flight may have been A's; one A made but could not
    # acknowledge was found "already approved" on B.
    approved_by_b = [
        e
        for e in logged
        if e.request.startswith("POST")
        and " /api/v1/devices/" in e.request
        and e.at > killed_at
        and e.status < 300
        and e.upstreams[-1] == stack.b.address
    ]
    assert len(approved_by_b) >= count - count // 3 - 1 - len(earlier), (approved_by_b, earlier)
