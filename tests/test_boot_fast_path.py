"""The boot path's fast lanes, as a booting machine and an operator notice them.

* ``BootDoors`` answers Talos's config download beneath FastAPI: a machine gets the same status, bytes,
  Content-Type and refusal text whichever of the two answered, the metrics file its requests under the route's
  label, and a client that hung up is not recorded as having downloaded anything.
* ``DownloadLog`` writes the delivered downloads in batches: every download of a boot storm has its audit row and
  marks its machine installed, and a batch with a machine that is gone still records the others.
* ``FastQuery`` reads the boot row straight from SQLite: it gives what SQLAlchemy gives, and never a stale row.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.types import Message, Receive, Scope, Send

from ktizo.api.boot_doors import BootDoors
from ktizo.app import build_services, create_app
from ktizo.app.asgi import KtizoApp
from ktizo.db.batch import execute_many, table_of
from ktizo.db.models import ConfigState, Device, Event
from ktizo.domain.devices import IDENTITY_REFUSED
from ktizo.services import download_log
from ktizo.services.audit import AuditEntry, AuditQuery
from ktizo.services.boot import _BY_MAC, _BY_UUID, Claim
from ktizo.services.context import Actor
from ktizo.services.download_log import Download, DownloadLog
from ktizo.services.queries import DeviceChanges
from ktizo.services.registry import Services
from ktizo.settings import Settings
from tests import factories
from tests.support import TALOS_HEADERS, talos_url

DOWNLOAD = "/api/v1/config/download"
LATENCY = "ktizo_http_request_duration_seconds_count"


def downloads(services: Services, device_id: int) -> list[AuditEntry]:
    """The device's ``config_download`` rows in the audit log, as an operator lists them."""
    return services.audit.list(AuditQuery(device_id=device_id, action="config_download", limit=1000))[0]


def approve(services: Services, mac: str, n: int, **fields: Any) -> Device:
    """An approved worker with a name and address of its own (two approved machines never share either)."""
    return factories.approved(
        services, mac, hostname=f"node-{n:03d}", ip_address=f"10.0.5.{n % 250 + 1}/24", role="worker", **fields
    )


# -- the same request, answered by BootDoors and by the FastAPI route --------------------------------------------


@dataclass(frozen=True)
class Seen:
    """What a machine (and a load balancer in front of it) notices of an answer; Server-Timing's value aside."""

    status: int
    content_type: str | None
    body: bytes
    headers: frozenset[str]
    retry_after: bool

    @classmethod
    def of(cls, r: httpx.Response) -> Seen:
        names = frozenset(r.headers.keys())
        return cls(r.status_code, r.headers.get("content-type"), r.content, names, "retry-after" in names)

    @property
    def text(self) -> str:
        return self.body.decode()


def without_doors(app: FastAPI) -> FastAPI:
    """``app`` as ``create_app`` built it, minus BootDoors: every config download goes to the FastAPI route."""
    assert isinstance(app, KtizoApp) and isinstance(app.boot_doors, BootDoors), "create_app puts BootDoors in front"
    app.boot_doors = None
    return app


@dataclass
class Pair:
    """Two apps over one database, as two replicas would be: ``doors`` as ``create_app`` builds it, and ``route``
    without BootDoors. ``fast`` lists the query strings BootDoors answered itself."""

    doors_app: FastAPI
    route_app: FastAPI
    doors: TestClient
    route: TestClient
    services: Services  # the doors app's
    route_services: Services
    fast: list[bytes] = field(default_factory=list)

    def app(self, door: str) -> FastAPI:
        return self.doors_app if door == "doors" else self.route_app

    def get(self, door: str, url: str, ip: str | None = None) -> Seen:
        """GET ``url`` as Talos sends it, through ``door``, from 10.0.0.9 or ``ip``."""
        client = self.doors if door == "doors" else self.route
        if ip is not None:  # a client of its own, as tests/test_new_device_budget.py does for another address
            client = TestClient(self.app(door), client=(ip, 40000))
        return Seen.of(client.get(url, headers=TALOS_HEADERS))


@pytest.fixture
def pair(settings: Settings, bases: object, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pair]:
    settings = settings.model_copy(update={"new_devices_per_minute": 8})
    answered: list[bytes] = []
    download = BootDoors._download

    async def noted(self: BootDoors, scope: Scope, receive: Receive, send: Send, started: float) -> int | None:
        status = await download(self, scope, receive, send, started)
        if status is not None:
            answered.append(scope["query_string"])
        return status

    monkeypatch.setattr(BootDoors, "_download", noted)
    with ExitStack() as stack:
        doors_services, route_services = build_services(settings), build_services(settings)
        stack.callback(doors_services.db.dispose)
        stack.callback(route_services.db.dispose)
        doors_app = create_app(settings, doors_services)
        route_app = without_doors(create_app(settings, route_services))
        doors = stack.enter_context(TestClient(doors_app, client=("10.0.0.9", 40000)))
        route = stack.enter_context(TestClient(route_app, client=("10.0.0.9", 40000)))
        yield Pair(doors_app, route_app, doors, route, doors_services, route_services, answered)


@dataclass(frozen=True)
class Machine:
    """One machine's identity, as a case of the comparison makes it (each case has machines of its own)."""

    n: int

    @property
    def mac(self) -> str:
        return f"52:54:00:5a:{self.n // 256:02x}:{self.n % 256:02x}"

    @property
    def uuid(self) -> str:
        return f"4c4c4544-0042-3510-8051-{self.n:012x}"

    @property
    def serial(self) -> str:
        return f"SN-{self.n}"

    def url(self, **values: str) -> str:
        """The URL Talos builds for this machine, with ``values`` added or instead of its own."""
        return talos_url(**{"mac": self.mac, "uuid": self.uuid, "serial": self.serial, **values})


Setup = Callable[[Services, Machine], str]  # makes the machine's state, returns the request's URL


def _approved(services: Services, m: Machine) -> str:
    approve(services, m.mac, m.n, uuid=m.uuid, serial=m.serial)
    return m.url()


def _approved_then(url: Callable[[Machine], str]) -> Setup:
    def setup(services: Services, m: Machine) -> str:
        _approved(services, m)
        return url(m)

    return setup


def _pending(services: Services, m: Machine) -> str:
    factories.pending(services, m.mac, uuid=m.uuid, serial=m.serial)
    return m.url()


def _rejected(services: Services, m: Machine) -> str:
    device = factories.approved(services, m.mac, uuid=m.uuid, serial=m.serial)
    services.devices.reject(Actor.system(), device.id)
    return m.url()


def _known_by_uuid(services: Services, m: Machine) -> str:
    device = services.devices.create(Actor.system(), DeviceChanges(uuid=m.uuid, hostname=f"by-uuid-{m.n}"))
    services.devices.approve(Actor.system(), device.id, DeviceChanges())
    return f"{DOWNLOAD}?uuid={m.uuid}"


def _over_budget(services: Services, m: Machine) -> str:
    for i in range(8):  # KTIZO_NEW_DEVICES_PER_MINUTE=8 machines from this address already (known ones pass)
        factories.pending(services, f"52:54:00:5b:00:{i:02x}", source_ip=BUDGET_IP)
    return m.url()


def _nothing(url: str) -> Setup:
    return lambda _services, _m: url


BUDGET_IP = "10.0.0.77"


@dataclass(frozen=True)
class Case:
    name: str
    setup: Setup
    status: int
    fast: bool  # BootDoors answers it itself (else it hands it to the route)
    text: str | None = None  # the whole refusal, when the case is about its words
    new_machine: bool = False  # each door meets a machine never seen: one for each
    ip: str | None = None


CASES = [
    Case("approved", _approved, 200, True),
    Case("approved-known-by-uuid-only", _known_by_uuid, 200, True),
    Case("pending", _pending, 403, True, "Device not approved. Current status: pending\n"),
    Case("rejected", _rejected, 403, True, "Device not approved. Current status: rejected\n"),
    Case(
        "another-uuid",
        _approved_then(lambda m: talos_url(mac=m.mac, uuid="11111111-2222-3333-4444-555555555555", serial=m.serial)),
        403,
        True,
        IDENTITY_REFUSED + "\n",
    ),
    Case("uuid-left-out", _approved_then(lambda m: talos_url(mac=m.mac)), 403, True, IDENTITY_REFUSED + "\n"),
    Case("unknown-mac", lambda _s, m: m.url(hostname="new-one"), 403, True, new_machine=True),
    Case("unknown-uuid-only", lambda _s, m: f"{DOWNLOAD}?uuid={m.uuid}", 403, True, new_machine=True),
    Case("over-the-new-machine-budget", _over_budget, 429, True, new_machine=True, ip=BUDGET_IP),
    Case("malformed-mac", _nothing(f"{DOWNLOAD}?mac=zz:zz"), 400, True),
    Case("placeholders-only", _nothing(talos_url(mac="${mac}", uuid="${uuid}", serial="${serial}")), 400, True),
    Case("no-identity", _nothing(DOWNLOAD), 400, True),
    Case("blank-mac", _nothing(f"{DOWNLOAD}?mac="), 400, True),
    Case("mac-at-the-limit", _nothing(f"{DOWNLOAD}?mac={'a' * 64}"), 400, True),
    Case("mac-over-the-limit", _nothing(f"{DOWNLOAD}?mac={'a' * 65}"), 422, False),
    Case("uuid-at-the-limit", _approved_then(lambda m: talos_url(mac=m.mac, uuid="1" * 64)), 400, True),
    Case("uuid-over-the-limit", _approved_then(lambda m: talos_url(mac=m.mac, uuid="1" * 65)), 422, False),
    Case("serial-at-the-limit", _approved_then(lambda m: m.url(serial="S" * 256)), 400, True),
    Case("serial-over-the-limit", _approved_then(lambda m: m.url(serial="S" * 257)), 422, False),
    Case("hostname-at-the-limit", _approved_then(lambda m: m.url(hostname="h" * 256)), 200, True),
    Case("hostname-over-the-limit", _approved_then(lambda m: m.url(hostname="h" * 257)), 422, False),
    Case("repeated-mac", _approved_then(lambda m: f"{m.url()}&mac={m.mac}"), 200, False),
    Case("repeated-empty-hostname", _approved_then(lambda m: f"{m.url()}&hostname=&hostname="), 200, False),
    Case("unknown-parameter", _approved_then(lambda m: f"{m.url()}&code=%24%7Bcode%7D"), 200, False),
]


def registered(services: Services, m: Machine, url: str) -> tuple[object, ...] | None:
    """What an operator sees of a machine the request registered, in terms of what it claimed."""
    with services.db.read() as s:
        found = s.scalars(select(Device).where((Device.mac_address == m.mac) | (Device.uuid == m.uuid))).all()
    if not found:
        return None
    [device] = found
    return (
        device.status,
        device.source,
        device.kind,
        device.role,
        device.mac_address == m.mac,
        device.uuid == m.uuid,
        device.serial == (m.serial if "serial=" in url else None),
        device.facts,
        device.last_ip,
        device.first_ip,
        device.installed_at,
    )


def test_a_machine_gets_the_same_answer_from_either_door(pair: Pair) -> None:
    """For each device state, the same request through BootDoors and through the FastAPI route: the same status,
    bytes, Content-Type, headers and refusal text; a first contact registers the same machine; and what BootDoors
    does not take (a value over the route's limit, a repeated or unknown parameter) is the route's to answer."""
    diverged: dict[str, tuple[Seen, Seen]] = {}
    for i, case in enumerate(CASES):
        m = Machine(2 * i + 1)
        url = case.setup(pair.services, m)
        before = len(pair.fast)
        via_doors = pair.get("doors", url, case.ip)
        assert len(pair.fast) - before == int(case.fast), f"{case.name}: answered by the wrong door"
        if case.new_machine:  # the route's request names a machine of its own, never seen either
            other = Machine(2 * i + 2)
            route_url = case.setup(pair.route_services, other)
            via_route = pair.get("route", route_url, case.ip)
            assert registered(pair.services, m, url) == registered(pair.services, other, route_url), case.name
        else:
            via_route = pair.get("route", url, case.ip)
        assert len(pair.fast) - before == int(case.fast), f"{case.name}: the route app has no fast path"
        if via_doors != via_route:
            diverged[case.name] = (via_doors, via_route)
        assert via_doors.status == case.status, f"{case.name}: {via_doors.text}"
        if case.text is not None:
            assert via_doors.text == case.text, case.name
    assert diverged == {}


def test_what_each_answer_looks_like(pair: Pair) -> None:
    """The shapes Talos and its operators rely on, from BootDoors: YAML with its length, plain-text refusals,
    Retry-After on a 429, and the timing header on both."""
    m = Machine(201)
    config = pair.get("doors", _approved(pair.services, m))
    assert (config.status, config.content_type) == (200, "application/yaml")
    assert m.mac in config.text and "node-201" in config.text
    assert {"content-length", "content-type", "server-timing"} <= config.headers
    refused = pair.get("doors", f"{DOWNLOAD}?mac=zz:zz")
    assert (refused.status, refused.content_type) == (400, "text/plain; charset=utf-8")
    assert "not a MAC address" in refused.text and "server-timing" in refused.headers
    busy = pair.get("doors", _over_budget(pair.services, Machine(202)), BUDGET_IP)
    assert busy.status == 429 and busy.retry_after
    assert busy.text.startswith(f"too many new machines from {BUDGET_IP} in the last minute (8)")
    assert len(pair.fast) == 3  # all three answered by BootDoors itself


IPXE = "/api/v1/boot/ipxe"


def ipxe_url(m: Machine, extra: str = "", **values: str) -> str:
    facts = {"mac": m.mac, "uuid": m.uuid, "serial": m.serial, "manufacturer": "Dell Inc.", "arch": "x86_64"}
    return f"{IPXE}?" + "&".join(f"{k}={v}" for k, v in (facts | values).items()) + extra


def _ipxe_rejected(services: Services, m: Machine) -> str:
    device = factories.pending(services, m.mac)
    services.devices.reject(Actor.system(), device.id)
    return ipxe_url(m)


def _ipxe_installed(services: Services, m: Machine) -> str:
    services.devices.set_installed(Actor.system(), approve(services, m.mac, m.n).id, True)
    return ipxe_url(m)


def _ipxe_again(url: Callable[[Machine], str]) -> Setup:
    def setup(services: Services, m: Machine) -> str:
        factories.pending(services, m.mac, uuid=m.uuid, serial=m.serial)
        return url(m)

    return setup


IPXE_CASES: list[tuple[str, Setup, bool]] = [  # name, setup, a machine of its own for each door
    ("new-machine", lambda _s, m: ipxe_url(m), True),
    ("new-machine-no-facts", lambda _s, m: f"{IPXE}?mac={m.mac}", True),
    ("known-nothing-new", _ipxe_again(ipxe_url), False),
    ("known-new-facts", _ipxe_again(lambda m: ipxe_url(m, product="PowerEdge R660")), False),
    ("another-uuid", _ipxe_again(lambda m: ipxe_url(m, uuid="11111111-2222-3333-4444-555555555555")), False),
    ("rejected", _ipxe_rejected, False),
    ("installed", _ipxe_installed, False),
    ("arm64", lambda _s, m: ipxe_url(m, arch="arm64"), True),
    ("no-talos-build", lambda _s, m: ipxe_url(m, arch="riscv64"), True),
    ("placeholders", lambda _s, m: ipxe_url(m, uuid="${uuid}", serial="${serial}"), True),
    ("percent-encoded-mac", lambda _s, m: ipxe_url(m, mac=m.mac.replace(":", "%3A")), True),
    ("repeated-mac", lambda _s, m: ipxe_url(m, f"&mac={m.mac}"), True),
    ("value-over-256", lambda _s, m: ipxe_url(m, product="P" * 300), True),
    ("hostile-mac", _nothing(f"{IPXE}?mac=%0Achain%20http://evil"), False),
    ("no-query", _nothing(IPXE), False),
]


def test_an_ipxe_machine_gets_the_same_script_from_either_door(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """iPXE's per-machine script through BootDoors and through the FastAPI route: the same status, headers and
    script (each door's new machine of its own, its MAC the only difference), the same machine registered, and the
    base URL taken from the request's Host as Starlette takes it."""
    answered: list[bytes] = []
    ipxe = BootDoors._ipxe

    async def noted(self: BootDoors, scope: Scope, send: Send) -> int | None:
        status = await ipxe(self, scope, send)
        if status is not None:
            answered.append(scope["query_string"])
        return status

    monkeypatch.setattr(BootDoors, "_ipxe", noted)
    host = {"host": "ktizo.lab:8080"}
    diverged = {}
    for i, (name, setup, own) in enumerate(IPXE_CASES):
        m, other = Machine(1001 + 2 * i), Machine(1002 + 2 * i)
        url = setup(pair.services, m)
        via_doors = Seen.of(pair.doors.get(url, headers=host))
        assert len(answered) == i + 1, f"{name}: not answered by BootDoors"
        route_url = setup(pair.route_services, other) if own else url
        via_route = Seen.of(pair.route.get(route_url, headers=host))
        assert len(answered) == i + 1, f"{name}: the route app has no fast path"
        if own:
            assert registered(pair.services, m, url) == registered(pair.services, other, route_url), name
            via_route = Seen(
                via_route.status,
                via_route.content_type,
                via_route.body.replace(other.mac.replace(":", "%3A").encode(), m.mac.replace(":", "%3A").encode()),
                via_route.headers,
                via_route.retry_after,
            )
        if via_doors != via_route:
            diverged[name] = (via_doors, via_route)
        assert (via_doors.status, via_doors.content_type) == (200, "text/plain; charset=utf-8"), name
        assert via_doors.text.startswith("#!ipxe\n"), name
    assert diverged == {}
    booted = Seen.of(pair.doors.get(ipxe_url(Machine(1999)), headers=host))
    assert "kernel http://ktizo.lab:8080/assets/talos/" in booted.text


# -- metrics -------------------------------------------------------------------------------------------------------


def latency_counts(client: TestClient) -> dict[tuple[str, str], float]:
    """``ktizo_http_request_duration_seconds_count`` of the config download (or of no route at all) by status
    class, and the downloads counter, as Prometheus scrapes them."""
    client.app.state.metrics.state.cache_seconds = 0  # type: ignore[attr-defined]  # every scrape reads afresh
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name == LATENCY and s.labels.get("route") in (DOWNLOAD, "unmatched"):
                counts[(s.labels["route"], s.labels["status_class"])] = s.value
            if s.name == "ktizo_config_downloads_total":
                counts[("downloads", "")] = s.value
    return counts


def test_metrics_count_config_downloads_under_the_route_either_way(pair: Pair) -> None:
    """Prometheus sees the config downloads under ``/api/v1/config/download``, once each, with their status
    class, whichever door answered: no ``unmatched`` route, no double count, the downloads counter moved."""
    m = Machine(301)
    urls = [
        _approved(pair.services, m),  # 200, answered by BootDoors
        f"{m.url()}&code=%24%7Bcode%7D",  # 200, handed to the route
        f"{DOWNLOAD}?mac=52:54:00:5c:00:01",  # 403 pending (first contact)
        f"{DOWNLOAD}?mac=52:54:00:5c:00:01",  # 403 pending
        f"{DOWNLOAD}?mac=zz:zz",  # 400
    ]
    seen: dict[str, dict[tuple[str, str], float]] = {}
    for door, client in (("doors", pair.doors), ("route", pair.route)):
        before = latency_counts(client)
        for url in urls:
            pair.get(door, url)
        after = latency_counts(client)
        seen[door] = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    assert len(pair.fast) == 4  # all but the one with an unknown parameter came through BootDoors
    assert seen["doors"] == {(DOWNLOAD, "2xx"): 2, (DOWNLOAD, "4xx"): 3, ("downloads", ""): 2}
    assert seen["route"] == seen["doors"]


# -- a client that hung up -----------------------------------------------------------------------------------------


async def asgi_get(app: FastAPI, url: str, *, hung_up: bool) -> list[Message]:
    """One GET straight to the ASGI app, as uvicorn makes it; with ``hung_up`` the client closed its connection
    once the request was sent (uvicorn then answers every ``receive`` with ``http.disconnect``)."""
    path, _, query = url.partition("?")
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"ktizo"), (b"user-agent", b"Go-http-client/1.1")],
        "client": ("10.0.0.9", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    sent: list[Message] = []
    body_sent = False
    never = asyncio.Event()

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if not hung_up:
            await never.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def test_a_client_that_hung_up_is_not_recorded_as_a_download(pair: Pair) -> None:
    """A machine (or a scanner) that closed its connection before the config went out gets nothing, and the
    operator sees no download and no installed machine, on either door; one that stays gets it, recorded."""
    for door, client, n in (("doors", pair.doors, 401), ("route", pair.route, 402)):
        m = Machine(n)
        url = _approved(pair.services, m)
        device = pair.services.devices.resolve(m.mac)
        assert client.portal is not None
        before = len(pair.fast)
        abandoned = client.portal.call(partial(asgi_get, pair.app(door), url, hung_up=True))
        assert len(pair.fast) - before == (1 if door == "doors" else 0)
        assert abandoned == [], door
        assert downloads(pair.services, device.id) == []
        after = pair.services.devices.get(device.id)
        assert (after.installed_at, after.last_config_download) == (None, None), door

        answered = client.portal.call(partial(asgi_get, pair.app(door), url, hung_up=False))
        assert [msg["type"] for msg in answered] == ["http.response.start", "http.response.body"]
        assert answered[0]["status"] == 200 and m.mac.encode() in answered[1]["body"]
        [row] = downloads(pair.services, device.id)
        assert row.details["bytes"] == len(answered[1]["body"])
        assert pair.services.devices.get(device.id).installed_at is not None


# -- DownloadLog: a boot storm's downloads, written in batches ---------------------------------------------------


def subscribe_to_downloads(services: Services) -> None:
    """A webhook that wants ``config.downloaded``: only then are download events written to the outbox."""
    services.webhooks.create(Actor.system(), "downloads", "http://127.0.0.1:9/hook", ["config.downloaded"])


def test_every_download_of_a_boot_storm_is_recorded(settings: Settings, services: Services, bases: object) -> None:
    """200 approved machines fetch their configs at once: each gets its config, each has one audit row with its
    revision and byte count, one ``config.downloaded`` event, and is marked installed with the address it used."""
    n = 200
    subscribe_to_downloads(services)
    macs = [f"52:54:00:5d:{i // 256:02x}:{i % 256:02x}" for i in range(n)]
    ids = {mac: approve(services, mac, i).id for i, mac in enumerate(macs)}
    revisions = {mac: services.devices.get(ids[mac]).revision for mac in macs}
    app = create_app(settings, services)

    async def storm() -> tuple[list[httpx.Response], dict[tuple[str, str], float]]:
        transport = httpx.ASGITransport(app=app, client=("10.3.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://ktizo") as client:
            answers = await asyncio.gather(*(client.get(talos_url(mac=mac), headers=TALOS_HEADERS) for mac in macs))
            app.state.metrics.state.cache_seconds = 0
            scraped = await client.get("/metrics")
        counts = {
            (s.name, s.labels.get("status_class", "")): s.value
            for family in text_string_to_metric_families(scraped.text)
            for s in family.samples
            if s.name in (LATENCY, "ktizo_config_downloads_total") and s.labels.get("route", DOWNLOAD) == DOWNLOAD
        }
        return list(answers), counts

    answers, counts = asyncio.run(storm())
    assert [r.status_code for r in answers] == [200] * n
    assert counts == {(LATENCY, "2xx"): n, ("ktizo_config_downloads_total", ""): n}
    rows = services.audit.list(AuditQuery(action="config_download", limit=10 * n))[0]
    by_device = {row.device_id: row for row in rows}
    assert len(rows) == len(by_device) == n
    for mac, answer in zip(macs, answers, strict=True):
        row = by_device[ids[mac]]
        assert mac.encode() in answer.content
        assert (row.device_mac, row.actor_type, row.source_ip) == (mac, "device", "10.3.0.1")
        assert row.details == {"role": "worker", "revision": revisions[mac], "bytes": len(answer.content)}
        device = services.devices.get(ids[mac])
        assert device.last_config_download is not None and device.installed_at == device.last_config_download
        assert device.last_ip == "10.3.0.1"
    with services.db.read() as s:
        events = s.scalars(select(Event.device_id).where(Event.event == "config.downloaded")).all()
    assert Counter(events) == Counter(ids.values())
    # The storm was written in batches (rows of one batch share their time): what this test is about.
    assert len({row.at for row in rows}) < n


def _download_of(services: Services, mac: str, size: int) -> Download:
    """The record the boot path makes of a config handed to ``mac``, from the row it decided on."""
    answer = services.boot.decide(Claim(mac=mac, source_ip="10.4.0.1"))
    assert answer.download is not None, answer.error
    return Download(answer.download.device, answer.download.source_ip, size)


def record_all(services: Services, records: Sequence[Download]) -> list[BaseException | None]:
    """Record ``records`` as the requests of one turn of the event loop do: they make one batch."""
    log = DownloadLog(services.db)

    async def gathered() -> list[BaseException | None]:
        return await asyncio.gather(*(log.record(r) for r in records), return_exceptions=True)

    return asyncio.run(gathered())


def test_a_batch_with_a_deleted_machine_still_records_the_others(services: Services, bases: object) -> None:
    """A machine deleted between its answer and the batch's write: the others are recorded and marked installed,
    and the deleted machine stays deleted. Its delivery is kept in the audit log (the audit log keeps a deleted
    device's history; ``device_id`` is not a foreign key), so the write never fails for it."""
    subscribe_to_downloads(services)
    macs = [f"52:54:00:5e:00:{i:02x}" for i in range(3)]
    devices = [approve(services, mac, 100 + i) for i, mac in enumerate(macs)]
    records = [_download_of(services, mac, 1000 + i) for i, mac in enumerate(macs)]
    services.devices.delete(Actor.system(), devices[1].id)
    assert record_all(services, records) == [None, None, None]
    for device, size in ((devices[0], 1000), (devices[2], 1002)):
        [row] = downloads(services, device.id)
        assert row.details["bytes"] == size
        assert services.devices.get(device.id).installed_at is not None
    with services.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Device).where(Device.id == devices[1].id)) == 0
    [gone] = downloads(services, devices[1].id)
    assert (gone.device_mac, gone.details["bytes"]) == (macs[1], 1001)
    with services.db.read() as s:
        told = s.scalars(select(Event.event).where(Event.device_id == devices[1].id).order_by(Event.id)).all()
    assert told[-2:] == ["device.deleted", "config.downloaded"]  # webhooks hear of the delivery after the deletion


def failing_batch(services: Services, monkeypatch: pytest.MonkeyPatch) -> tuple[list[Device], list[Download]]:
    """Four approved machines' downloads, and a write that fails on a constraint whenever the third one is in it.
    Simulated: nothing in today's schema makes this write fail (see above), but ``_write_or_split`` is for it."""
    macs = [f"52:54:00:5f:00:{i:02x}" for i in range(4)]
    devices = [approve(services, mac, 120 + i) for i, mac in enumerate(macs)]
    records = [_download_of(services, mac, 2000 + i) for i, mac in enumerate(macs)]
    bad = devices[2].id
    real = download_log.write_downloads

    def failing_for_bad(batch: Sequence[Download], s: Session) -> None:
        real(batch, s)  # the statements run, then the constraint fails: the savepoint must undo them
        if any(d.device["id"] == bad for d in batch):
            raise IntegrityError("INSERT INTO audit_events …", {}, Exception("simulated constraint violation"))

    monkeypatch.setattr(download_log, "write_downloads", failing_for_bad)
    return devices, records


def test_a_batch_that_fails_on_a_constraint_still_records_the_others(
    services: Services, bases: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The others of a batch whose write fails for one machine are recorded once each and marked installed; the
    failing one leaves no trace (no audit row, not installed), and nobody's request fails for it."""
    subscribe_to_downloads(services)
    devices, records = failing_batch(services, monkeypatch)
    assert record_all(services, records) == [None] * 4
    for device, record in zip(devices, records, strict=True):
        rows = downloads(services, device.id)
        if device is devices[2]:
            assert rows == []
            assert services.devices.get(device.id).installed_at is None
        else:
            assert [r.details["bytes"] for r in rows] == [record.size]
            assert services.devices.get(device.id).installed_at is not None
    with services.db.read() as s:
        events = s.scalars(select(Event.device_id).where(Event.event == "config.downloaded")).all()
    assert Counter(events) == Counter(d.id for d in devices if d is not devices[2])


def test_a_batch_written_one_by_one_is_counted_once_per_recorded_download(
    settings: Settings, services: Services, bases: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prometheus's ``ktizo_config_downloads_total`` says how many downloads were recorded: a batch retried one by
    one after a constraint failure counts the three recorded, not the attempts that were rolled back."""
    app = create_app(settings, services)  # its metrics count what the log writes
    _devices, records = failing_batch(services, monkeypatch)
    assert record_all(services, records) == [None] * 4
    assert len(services.audit.list(AuditQuery(action="config_download"))[0]) == 3
    with TestClient(app) as client:
        assert latency_counts(client)[("downloads", "")] == 3


# -- FastQuery: the boot row read straight from SQLite ----------------------------------------------------------


def _full(services: Services) -> Device:
    """A machine with a value of every kind in every column the boot query reads."""
    uuid = "4c4c4544-0042-3510-8051-000000000140"
    device = approve(services, "52:54:00:60:00:01", 140, uuid=uuid, serial="SN 0140/A")
    seen = dt.datetime(2031, 2, 3, 4, 5, 6, 789012, tzinfo=dt.UTC)
    with services.db.write() as s:
        s.execute(
            update(Device)
            .where(Device.id == device.id)
            .values(
                last_seen=seen,
                last_ip="10.6.0.1",
                lease_ip="10.6.0.2",
                facts={"reported_hostname": "nœud-1", "nested": {"list": [1, 2.5, None, True, "x"]}},
                labels={"rack": "r1", "zone": "é"},
                patch="machine:\n  install:\n    wipe: true\n",
                install_disk="/dev/nvme0n1",
                extra_nics=[{"mac": "52:54:00:60:00:02", "addresses": ["10.9.0.5/24"], "gateway": "10.9.0.1"}],
            )
        )
    return services.devices.get(device.id)


def test_the_fast_read_gives_what_sqlalchemy_gives(services: Services, bases: object) -> None:
    """The boot row read raw from SQLite has, column for column, the values and types SQLAlchemy's row has (UTC
    datetimes, JSON, statuses, NULLs); on PostgreSQL there is no raw read and the boot path uses SQLAlchemy."""
    full = _full(services)
    bare = factories.pending(services, "52:54:00:60:00:03")  # NULL uuid, serial, hostname, lease…
    by_uuid = services.devices.create(Actor.system(), DeviceChanges(uuid="4c4c4544-0042-3510-8051-000000000141"))
    fast_mac, fast_uuid = services.boot._by_mac, services.boot._by_uuid  # what BootService._find reads with
    if services.db.dialect != "sqlite":
        assert (fast_mac, fast_uuid) == (None, None)
        assert services.db.fast_query(_BY_MAC) is None
        return
    assert fast_mac is not None and fast_uuid is not None
    lookups: list[tuple[Any, dict[str, str]]] = [
        (_BY_MAC, {"mac": full.mac_address or ""}),
        (_BY_MAC, {"mac": bare.mac_address or ""}),
        (_BY_UUID, {"uuid": by_uuid.uuid or ""}),
    ]
    with services.db.read_engine.connect() as conn:
        for stmt, params in lookups:
            theirs = conn.execute(stmt, params).first()
            ours = (fast_mac if stmt is _BY_MAC else fast_uuid).first(**params)
            assert theirs is not None and ours is not None
            names = [str(key) for key in theirs._mapping]
            assert list(ours._mapping) == names
            for name in names:
                a, b = getattr(ours, name), getattr(theirs, name)
                assert (type(a), a) == (type(b), b), name
            assert ours._mapping == dict(theirs._mapping)
            assert tuple(ours) == tuple(theirs)
        assert fast_mac.first(mac="52:54:00:60:00:ff") is None
        assert fast_uuid.first(uuid=full.uuid or "") is None  # known by UUID only when it has no MAC
    row = fast_mac.first(mac=full.mac_address or "")
    assert row is not None
    assert row.last_seen == dt.datetime(2031, 2, 3, 4, 5, 6, 789012, tzinfo=dt.UTC)
    assert row.facts["nested"] == {"list": [1, 2.5, None, True, "x"]}
    assert (row.status, row.lease_ip, row.config_revision) == ("approved", "10.6.0.2", config_revision(services))
    with pytest.raises(AttributeError):
        _ = row.no_such_column


def config_revision(services: Services) -> int:
    with services.db.read() as s:
        revision = s.scalar(select(ConfigState.revision).where(ConfigState.id == 1))
    assert revision is not None
    return revision


def test_a_committed_write_is_seen_by_the_next_boot_read(services: Services, bases: object) -> None:
    """An operator's approval, committed through the ordinary session, is what the machine's very next request
    is decided on (no stale snapshot), also read from a thread whose raw connection read the row before it."""
    mac = "52:54:00:61:00:01"
    device = factories.pending(services, mac)
    claim = Claim(mac=mac, source_ip="10.0.0.9")
    raw = services.db.dialect == "sqlite"
    assert (services.boot._by_mac is not None) == raw  # the raw read on SQLite, SQLAlchemy on PostgreSQL
    with ThreadPoolExecutor(max_workers=1) as reader:  # one thread: on SQLite, one raw connection for all reads

        def boot_row() -> tuple[str, int]:
            row = reader.submit(services.boot._find, claim).result()
            assert row is not None
            return row.status, row.revision

        assert boot_row() == ("pending", device.revision)
        assert services.boot.decide(claim).status == "pending"
        approved = services.devices.approve(Actor.system(), device.id, DeviceChanges(hostname="seen-at-once"))
        assert boot_row() == ("approved", approved.revision)
        answer = services.boot.decide(claim)
        assert answer.error is None and answer.body is not None and b"seen-at-once" in answer.body
        renamed = services.devices.update(Actor.system(), device.id, DeviceChanges(hostname="renamed"))
        assert boot_row() == ("approved", renamed.revision)
        assert b"renamed" in (services.boot.decide(claim).body or b"")
        services.devices.reject(Actor.system(), device.id)
        assert boot_row()[0] == "rejected"
        assert services.boot.decide(claim).status == "rejected"


@pytest.mark.parametrize(
    "raw",
    [
        b"mac=52%3A54%3A00%3A00%3A00%3A01&uuid=00000000-0000-4000-8000-000000000001&serial=SN1",
        b"mac=a+b&&uuid=&serial",
        b"mac=%E2%82%AC&hostname=x%2By",
        b"=x",
        b"mac=1&mac=2",
        b"foo=1",
        b";mac=1",
        b"mac=%zz",
        b"hostname=a=b",
        b"m%61c=52:54:00:00:00:01",
        b"mac=" + b"a" * 65,
    ],
)
def test_the_fast_door_reads_a_query_as_parse_qsl_does(raw: bytes) -> None:
    """The fast door's own query parser takes exactly what FastAPI's route would take, read the same way."""
    from urllib.parse import parse_qsl

    from ktizo.api.boot_doors import LIMITS, _query

    expected: dict[str, str] | None = {}
    for key, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
        if expected is None or key not in LIMITS or len(value) > LIMITS[key] or key in expected:
            expected = None
            break
        expected[key] = value
    assert _query(raw) == expected


def test_execute_many_writes_what_sqlalchemy_writes(services: Services) -> None:
    """The batched writes' straight path to sqlite3 stores each value as SQLAlchemy would (dates, JSON,
    booleans), and a row that leaves a column's Python-side default to the statement still gets it."""
    at = dt.datetime(2026, 12, 3, 10, 0, 0, 123456, tzinfo=dt.UTC)
    row = {
        "at": at,
        "event": "machine.config_downloaded",
        "action": "config_download",
        "device_id": 7,
        "actor": "10.0.0.9",
        "actor_type": "device",
        "payload": {"machine": {"mac_address": "52:54:00:00:00:07"}, "n": [1, 2], "ok": True},
        "webhooks_pending": True,
        "gitops_pending": False,
    }
    table = table_of(Event)
    with services.db.write() as s:
        execute_many(s, insert(table), [{**row, "actor": "raw"}])
        s.execute(insert(table), [{**row, "actor": "sqlalchemy"}])
        execute_many(s, insert(table), [{k: v for k, v in row.items() if k != "at"} | {"actor": "defaulted"}])
    with services.db.read() as s:
        found = {e.actor: e for e in s.scalars(select(Event).where(Event.device_id == 7))}
    raw, reference = found["raw"], found["sqlalchemy"]
    assert (raw.at, raw.payload, raw.webhooks_pending, raw.gitops_pending) == (
        reference.at,
        reference.payload,
        reference.webhooks_pending,
        reference.gitops_pending,
    )
    assert raw.at == at and found["defaulted"].at is not None


def test_download_events_nobody_takes_are_not_written(services: Services, bases: object) -> None:
    """With no webhook that wants ``config.downloaded`` a download is audited but adds no outbox row (the
    dispatcher would clear it for nobody); lifecycle events GitOps takes are always written."""
    device = approve(services, "52:54:00:5c:00:01", 1)
    with services.db.write() as s:
        download_log.write_downloads([_download_of(services, device.mac_address, 100)], s)
    assert len(downloads(services, device.id)) == 1
    with services.db.read() as s:
        told = s.scalars(select(Event.event).where(Event.device_id == device.id)).all()
    assert "config.downloaded" not in told and "device.approved" in told
