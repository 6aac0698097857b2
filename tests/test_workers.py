"""``ktizo serve --workers 2``, the real command: requests spread over two processes behave as if one served them.
An approval made through one process (or the CLI, which is neither) answers the config requests every worker
holds; the new-machine budget is one budget; /metrics counts every worker's requests; a worker that dies is
replaced while the other serves on, and SIGTERM stops them all."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from ktizo.db.models import Device
from ktizo.domain.devices import Role
from ktizo.domain.users import UserRole
from ktizo.services.context import Actor
from ktizo.services.queries import DeviceQuery
from tests.agents.test_mtls import Server, start
from tests.support import TALOS_FIXTURES, TALOS_HEADERS, bearer, make_token, talos_url

pytestmark = pytest.mark.slow

WORKERS = 2


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def machines(server: Server) -> list[Device]:
    return server.services.devices.list(DeviceQuery())[0]


def until(what: Callable[[], bool], timeout: float = 30.0, message: str = "timed out") -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


def stop(server: Server) -> int:
    server.proc.send_signal(signal.SIGTERM)
    try:
        return server.proc.wait(30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
        raise AssertionError(f"ktizo serve did not stop on SIGTERM:\n{server.log.read_text()}") from None
    finally:
        server.services.db.dispose()


@pytest.fixture
def serve(tmp_path: Path, database_url: str) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def run(**env: str) -> Server:
        server = start(tmp_path / f"ktizo-{len(started)}", database_url, "--workers", str(WORKERS), **env)
        started.append(server)
        until(lambda: len(children(server.proc.pid)) == WORKERS, message="the workers did not start")
        return server

    yield run
    for server in started:
        if server.proc.poll() is None:
            stop(server)


def cli(server: Server, *args: str) -> str:
    env = {**os.environ, "KTIZO_DATA_DIR": str(server.log.parent / "cli"), "KTIZO_DATABASE_URL": server.services.db.url}
    done = subprocess.run([sys.executable, "-m", "ktizo", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def held_download(url: str, mac: str, answers: dict[str, httpx.Response]) -> threading.Thread:
    def fetch() -> None:
        with httpx.Client(timeout=60) as client:  # a connection of its own: the kernel picks its worker
            answers[mac] = client.get(f"{url}{talos_url(mac=mac)}", headers=TALOS_HEADERS)

    thread = threading.Thread(target=fetch)
    thread.start()
    return thread


def test_an_approval_anywhere_answers_the_requests_every_worker_holds(serve: Callable[..., Server]) -> None:
    server = serve(KTIZO_LONG_POLL_SECONDS="45")
    services = server.services
    for role in Role:
        services.cluster.put_base(Actor.system(), role, (TALOS_FIXTURES / f"{role}.yaml").read_bytes())
    token = make_token(services, "ops", UserRole.ADMIN)
    macs = [f"52:54:00:77:00:{i:02x}" for i in range(8)]
    answers: dict[str, httpx.Response] = {}
    threads = [held_download(server.url, mac, answers) for mac in macs]
    until(lambda: len(machines(server)) == len(macs), message="the machines were not registered")
    time.sleep(1.0)  # registered, then held: each request now waits in the worker that took it
    assert not answers  # held, not answered pending

    devices = {d.mac_address: d for d in machines(server)}
    through_api, through_cli = macs[:4], macs[4:]
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for i, mac in enumerate(through_api):
            r = client.post(
                f"/api/v1/devices/{devices[mac].id}/approve",
                json={"hostname": f"api-{i}", "role": "worker"},
                headers=bearer(token),
            )
            assert r.status_code == 200, r.text
    for i, mac in enumerate(through_cli):  # the CLI is no worker: only the database can tell them
        cli(server, "devices", "approve", mac, "--hostname", f"cli-{i}", "--role", "worker")
    for thread in threads:
        thread.join(40)  # well inside the 45 s long poll: answered by the approval, not by its end
    assert sorted(answers) == sorted(macs)
    for i, mac in enumerate(through_api):
        assert answers[mac].status_code == 200, answers[mac].text
        assert re.search(rf"hostname: api-{i}\b", answers[mac].text)
    for i, mac in enumerate(through_cli):
        assert answers[mac].status_code == 200, answers[mac].text
        assert re.search(rf"hostname: cli-{i}\b", answers[mac].text)

    # Every worker's requests, whichever worker answers the scrape: 8 downloads, and now 20 malformed ones.
    for _ in range(20):
        with httpx.Client(timeout=10) as client:
            assert client.get(f"{server.url}{talos_url(mac='not-a-mac')}").status_code == 400
    for _ in range(4):
        with httpx.Client(timeout=10) as client:
            metrics = client.get(f"{server.url}/metrics").text
        counts = re.findall(
            r'^ktizo_http_request_duration_seconds_count\{method="GET",route="/api/v1/config/download",'
            r'status_class="(\dxx)"\} (\S+)$',
            metrics,
            re.M,
        )
        assert {k: float(v) for k, v in counts} == {"2xx": 8.0, "4xx": 20.0}, metrics
        assert re.search(r"^ktizo_config_downloads_total (\S+)$", metrics, re.M).group(1) == "8.0"  # type: ignore[union-attr]
    assert stop(server) == 0


def test_the_workers_share_one_new_machine_budget(serve: Callable[..., Server]) -> None:
    server = serve(KTIZO_NEW_DEVICES_PER_MINUTE="5", KTIZO_LONG_POLL_SECONDS="0")
    statuses = []
    for i in range(12):
        with httpx.Client(timeout=10) as client:  # new connections: spread over both workers
            statuses.append(client.get(f"{server.url}{talos_url(mac=f'52:54:00:78:00:{i:02x}')}").status_code)
    assert sorted(statuses) == [403] * 5 + [429] * 7
    assert len(machines(server)) == 5


def test_a_dead_worker_is_replaced_and_sigterm_stops_them_all(serve: Callable[..., Server]) -> None:
    server = serve(KTIZO_LONG_POLL_SECONDS="0")
    before = children(server.proc.pid)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    until(lambda: len(children(server.proc.pid) - {victim}) == WORKERS, message="the dead worker was not replaced")
    after = children(server.proc.pid)
    assert victim not in after and len(after & before) == WORKERS - 1
    for i in range(10):  # answered all along, whichever worker the kernel hands each connection to
        until(lambda: httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200)
        with httpx.Client(timeout=10) as client:
            assert client.get(f"{server.url}{talos_url(mac=f'52:54:00:79:00:{i:02x}')}").status_code == 403
    assert "exited with status -9: starting it again" in server.log.read_text()
    assert stop(server) == 0
    assert not children(server.proc.pid)
    for pid in after:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
