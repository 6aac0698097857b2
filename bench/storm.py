#!/usr/bin/env python3
"""Boot storm against `ktizo serve` (1 and 2 workers, SQLite or PostgreSQL), measured beside the bare ASGI ceiling
(bench/ceiling.py) serving the same bytes on the same core in the same run.

Two parts, both against servers this script starts on a database it fills (and drops, for PostgreSQL):

* **doors**: each boot door in a closed loop, wrk on one core (``-t1 -c100``) and the server pinned to the other:
  approved config downloads (Talos's query form), pending polls (long poll off), iPXE scripts and OAuth token polls
  (closed-loop polling of 1,000 pending flows: RFC 8628's slow_down answer). The same wrk script then runs
  against the ceiling app answering with the body Ktizo answered, pinned to the same core: requests/s,
  p50/p95/p99, errors, and the ratio to the ceiling.
* **machines**: N simulated Talos machines powering on within ``--ramp`` seconds, each as Talos does it (a fresh
  connection per request): its iPXE script, then its config. A share is approved already and downloads at once;
  the others are new (first contact: pending, held by the long poll). With ``--oauth`` every machine uses the
  OAuth device flow instead (a device code, then token polls every 5 s, then the download with its token). Once
  all new machines are waiting, the script approves them through the API, and every held request must answer
  with the config: approval-to-config latency, per-kind latency percentiles, errors.

    python bench/storm.py                                  # doors and machines, SQLite, 1,000 registered
    python bench/storm.py --registered 100000              # the same with 100,000 machines in the registry
    python bench/storm.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres
    python bench/storm.py --part machines --machines 5000 --ramp 1 --workers 2

Needs wrk and taskset (apt-get install wrk util-linux). Figures swing with the machine: the ratio to the ceiling
measured in the same run is the figure to compare."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from config_storm import mac_for, pct, talos_get, uuid_for

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
FIXTURES = ROOT / "tests" / "fixtures" / "talos"
GRANT = "urn:ietf:params:oauth:grant-type:device_code"
SAMPLE = 1000  # machines each door cycles through (of the registered ones)

WRK_SCRIPT = """
local paths = {}
local method, ctype = "%(method)s", "%(ctype)s"
for line in io.lines("%(paths)s") do paths[#paths + 1] = line end
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) i = 0; unexpected = 0 end
function request()
  i = i %% #paths + 1
  if method == "POST" then
    return wrk.format("POST", "/token", {["Content-Type"] = ctype}, paths[i])
  end
  return wrk.format("GET", paths[i])
end
function response(status, headers, body)
  if status ~= %(expected)d then unexpected = unexpected + 1 end
end
function done(summary, latency, requests)
  local u = 0
  for _, t in ipairs(threads) do u = u + t:get("unexpected") end
  local e = summary.errors
  io.write(string.format('RESULT {"requests": %%d, "seconds": %%f, "p50": %%f, "p95": %%f, "p99": %%f, ' ..
    '"errors": %%d, "unexpected": %%d}\\n', summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1e3, latency:percentile(95) / 1e3, latency:percentile(99) / 1e3,
    e.connect + e.read + e.write + e.timeout, u))
end
"""


def tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if found is None:
        sys.exit(f"{name} is not installed: apt-get install {package}")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ktizo", *args], env=env, input=stdin, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.exit(f"ktizo {' '.join(args)} failed: {done.stderr}")
    return done.stdout


def device_documents(first: int, count: int, status: str) -> str:
    docs = []
    for i in range(first, first + count):
        name = f"node-{i:06d}"
        spec = f"  mac_address: {mac_for(i)}\n  status: {status}\n"
        if status == "approved":
            spec += f"  hostname: {name}\n  ip_address: 10.{64 + ((i >> 16) & 63)}.{(i >> 8) & 255}.{i & 255}/8\n"
        docs.append(f"apiVersion: ktizo.dev/v1\nkind: Device\nmetadata: {{name: {name}}}\nspec:\n{spec}")
    return "---\n".join(docs)


@dataclass
class World:
    env: dict[str, str]
    token: str
    registered: int  # approved machines 0 … registered-1
    pending: range  # pending machines, pre-registered


@contextmanager
def world(args: argparse.Namespace) -> Iterator[World]:
    with tempfile.TemporaryDirectory(prefix="ktizo-storm-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KTIZO_")}
        env.update(KTIZO_DATA_DIR=f"{tmp}/data", KTIZO_LOG_LEVEL="warning", KTIZO_NEW_DEVICES_PER_MINUTE="0")
        env.update(KTIZO_LONG_POLL_PER_ADDRESS="100000")
        dropped = None
        if args.database_url:
            name = f"ktizo_storm_{os.getpid()}"
            admin = args.database_url
            subprocess.run(
                [tool("psql", "postgresql-client"), _libpq(admin), "-qc", f"CREATE DATABASE {name}"], check=True
            )
            dropped = (admin, name)
            parts = urllib.parse.urlsplit(admin)
            env["KTIZO_DATABASE_URL"] = urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))
        try:
            say("preparing: schema, admin token, base configs")
            cli(env, "db", "upgrade")
            cli(env, "users", "create", "bench", "--role", "admin", "--password-stdin", stdin="benchmark-password\n")
            token = cli(env, "tokens", "create", "bench").strip()
            for role in ("controlplane", "worker"):
                cli(env, "cluster", "import-base", role, str(FIXTURES / f"{role}.yaml"))
            pending = range(args.registered, args.registered + SAMPLE)
            source = Path(tmp) / "devices.yaml"
            source.write_text(
                device_documents(0, args.registered, "approved")
                + "---\n"
                + device_documents(pending.start, len(pending), "pending")
            )
            say(f"preparing: {args.registered:,} approved and {len(pending):,} pending machines (ktizo apply)")
            t0 = time.perf_counter()
            cli(env, "apply", "-q", "-f", str(source))
            say(f"  applied in {time.perf_counter() - t0:.1f} s")
            yield World(env, token, args.registered, pending)
        finally:
            if dropped:
                subprocess.run(
                    [
                        tool("psql", "postgresql-client"),
                        _libpq(dropped[0]),
                        "-qc",
                        f"DROP DATABASE IF EXISTS {dropped[1]}",
                    ],
                    check=False,
                )


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextmanager
def serving(w: World, workers: int, cores: str, **env: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            tool("taskset", "util-linux"),
            "-c",
            cores,
            sys.executable,
            "-m",
            "ktizo",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--mtls-port",
            "0",
            "--workers",
            str(workers),
        ],
        env={**w.env, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("ktizo serve did not start")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def ceiling(status: int, content_type: str, body: bytes, core: str) -> Iterator[str]:
    port = free_port()
    with tempfile.NamedTemporaryFile(suffix=".body") as f:
        f.write(body)
        f.flush()
        proc = subprocess.Popen(
            [
                tool("taskset", "util-linux"),
                "-c",
                core,
                sys.executable,
                str(BENCH / "ceiling.py"),
                "--port",
                str(port),
                "--body-file",
                f.name,
                "--status",
                str(status),
                "--content-type",
                content_type,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(150):
                try:
                    httpx.get(url, timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            proc.wait(10)


# -- doors ------------------------------------------------------------------------------------------------------


@dataclass
class Door:
    name: str
    lines: list[str]  # paths, or form bodies for POST /token
    expected: int
    method: str = "GET"


def talos_path(i: int) -> str:
    query = {"mac": mac_for(i), "uuid": uuid_for(i), "serial": f"SN{i:08d}"}
    return "/api/v1/config/download?" + urllib.parse.urlencode(query)


async def _bind(url: str, paths: list[str], method: str = "GET", forms: list[dict[str, str]] | None = None) -> list:
    """Each machine's first request once (the UUID and serial it reports are bound then), before measuring."""
    sem = asyncio.Semaphore(32)
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:

        async def one(k: int) -> httpx.Response:
            async with sem:
                if forms is not None:
                    return await c.post(paths[k], data=forms[k])
                return await c.get(paths[k])

        return await asyncio.gather(*(one(k) for k in range(len(paths))))


def doors(w: World, url: str) -> list[Door]:
    sample = random.Random(1).sample(range(w.registered), min(SAMPLE, w.registered))
    approved = [talos_path(i) for i in sample]
    pending = [talos_path(i) for i in w.pending]
    ipxe = [f"/api/v1/boot/ipxe?mac={urllib.parse.quote(mac_for(i))}&arch=x86_64&platform=efi" for i in w.pending]
    asyncio.run(_bind(url, approved + pending))
    # Binding bumped each machine's revision, so its rendered config is cold again: a second round renders it,
    # and the measured run is the steady state (docs/benchmarks.md gives a cold render's cost apart).
    asyncio.run(_bind(url, approved))
    return [
        Door("approved config download", approved, 200),
        Door("pending poll (long poll off)", pending, 403),
        Door("iPXE script", ipxe, 200),
    ]


def token_door(w: World, url: str) -> Door:
    """On a server with the OAuth device flow on (KTIZO_OAUTH_ENABLED): every config needs its token then."""
    forms = [{"client_id": "ktizo", "mac": mac_for(i), "uuid": uuid_for(i), "serial": f"SN{i:08d}"} for i in w.pending]
    codes = asyncio.run(_bind(url, ["/device/code"] * len(forms), forms=forms))
    tokens = [
        urllib.parse.urlencode({"client_id": "ktizo", "grant_type": GRANT, "device_code": r.json()["device_code"]})
        for r in codes
    ]
    return Door("OAuth token poll (slow_down)", tokens, 400, method="POST")


def wrk(url: str, door: Door, seconds: float, connections: int, core: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        paths, script = Path(tmp) / "paths", Path(tmp) / "door.lua"
        paths.write_text("\n".join(door.lines) + "\n")
        script.write_text(
            WRK_SCRIPT
            % {
                "method": door.method,
                "ctype": "application/x-www-form-urlencoded",
                "paths": paths,
                "expected": door.expected,
            }
        )
        out = subprocess.run(
            [
                tool("taskset", "util-linux"),
                "-c",
                core,
                tool("wrk", "wrk"),
                "-t1",
                f"-c{connections}",
                f"-d{seconds}s",
                "-s",
                str(script),
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    result: dict[str, float] = json.loads(line[len("RESULT ") :])
    result["rps"] = result["requests"] / result["seconds"]
    return result


def sample_answer(url: str, door: Door) -> tuple[int, str, bytes]:
    if door.method == "POST":
        r = httpx.post(
            f"{url}/token", content=door.lines[0], headers={"content-type": "application/x-www-form-urlencoded"}
        )
    else:
        r = httpx.get(f"{url}{door.lines[0]}")
    return r.status_code, r.headers.get("content-type", "text/plain"), r.content


def run_doors(args: argparse.Namespace, w: World) -> None:
    rows = []
    for workers in args.workers:
        cores = "0" if workers == 1 else "0,1"
        for oauth in (False, True):
            env = {"KTIZO_LONG_POLL_SECONDS": "0", "KTIZO_OAUTH_ENABLED": str(oauth).lower()}
            with serving(w, workers, cores, **env) as url:
                say(f"doors: {workers} worker(s) on core(s) {cores}; binding each machine's first request")
                for door in [token_door(w, url)] if oauth else doors(w, url):
                    status, kind, body = sample_answer(url, door)
                    got = wrk(url, door, args.seconds, args.connections, "1")
                    with ceiling(status, kind, body, "0") as bare:
                        top = wrk(bare, door, args.seconds, args.connections, "1")
                    rows.append((workers, door.name, got, top))
                    say(f"  {door.name}: {got['rps']:,.0f} req/s vs ceiling {top['rps']:,.0f}")
    print(
        f"\n## doors ({args.registered:,} registered, {args.database}, wrk -t1 -c{args.connections} -d{args.seconds}s)"
    )
    print("| workers | door | req/s | p50 ms | p95 ms | p99 ms | errors | ceiling req/s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for workers, name, got, top in rows:
        errors = int(got["errors"] + got["unexpected"])
        print(
            f"| {workers} | {name} | {got['rps']:,.0f} | {got['p50']:.1f} | {got['p95']:.1f} | {got['p99']:.1f} "
            f"| {errors} | {top['rps']:,.0f} | {got['rps'] / top['rps']:.0%} |"
        )


# -- machines ---------------------------------------------------------------------------------------------------


@dataclass
class Kind:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    def add(self, seconds: float, ok: bool) -> None:
        self.latencies.append(seconds)
        self.errors += not ok


@dataclass
class Storm:
    kinds: dict[str, Kind] = field(default_factory=dict)
    approved_at: dict[int, float] = field(default_factory=dict)
    waiting: set[int] = field(default_factory=set)
    woken: list[float] = field(default_factory=list)  # approval to config, held machines
    unfinished: int = 0

    def kind(self, name: str) -> Kind:
        return self.kinds.setdefault(name, Kind())


async def timed(storm: Storm, name: str, host: str, port: int, path: str, ok: set[int], timeout: float) -> int:
    t0 = time.perf_counter()
    try:
        status, _ms = await talos_get(host, port, path, timeout)
    except (TimeoutError, OSError, ValueError, IndexError):
        status = 0
    storm.kind(name).add(time.perf_counter() - t0, status in ok)
    return status


async def post_form(host: str, port: int, path: str, form: dict[str, str], timeout: float) -> tuple[int, bytes]:
    body = urllib.parse.urlencode(form).encode()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Go-http-client/1.1\r\nConnection: close\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        data = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


async def machine(storm: Storm, host: str, port: int, i: int, kind: str, at: float, timeout: float) -> None:
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    ipxe = f"/api/v1/boot/ipxe?mac={urllib.parse.quote(mac_for(i))}&arch=x86_64&platform=efi"
    await timed(storm, "iPXE script", host, port, ipxe, {200}, timeout)
    if kind == "approved":
        await timed(storm, "approved download", host, port, talos_path(i), {200}, timeout)
        return
    if kind == "oauth":
        t0 = time.perf_counter()
        form = {"client_id": "ktizo", "mac": mac_for(i), "uuid": uuid_for(i), "serial": f"SN{i:08d}"}
        try:
            status, body = await post_form(host, port, "/device/code", form, timeout)
        except (TimeoutError, OSError):
            status, body = 0, b""
        storm.kind("device code").add(time.perf_counter() - t0, status == 200)
        if status != 200:
            return
        code = json.loads(body)["device_code"]
        storm.waiting.add(i)
        while True:
            await asyncio.sleep(5.0)
            t0 = time.perf_counter()
            try:
                status, body = await post_form(
                    host, port, "/token", {"client_id": "ktizo", "grant_type": GRANT, "device_code": code}, timeout
                )
            except (TimeoutError, OSError):
                status, body = 0, b""
            pending = status == 400 and b"authorization_pending" in body
            storm.kind("token poll").add(time.perf_counter() - t0, status == 200 or pending)
            if status == 200:
                token = json.loads(body)["access_token"]
                break
            if not pending:
                return
        t0 = time.perf_counter()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            f"GET {talos_path(i)} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = await reader.read(-1)
        writer.close()
        storm.kind("download with token").add(time.perf_counter() - t0, data.startswith(b"HTTP/1.1 200"))
        return
    storm.waiting.add(i)
    status = await timed(storm, "held poll (until approved)", host, port, talos_path(i), {200}, timeout + 15)
    if status == 200 and i in storm.approved_at:
        storm.woken.append(time.monotonic() - storm.approved_at[i])
    storm.waiting.discard(i)


async def approve_all(url: str, token: str, storm: Storm, machines: list[int], concurrency: int = 16) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as c:
        ids: dict[str, int] = {}
        offset = 0
        while True:
            page = (
                await c.get("/api/v1/devices", params={"status": "pending", "limit": 10000, "offset": offset})
            ).json()
            ids.update({d["mac_address"]: d["id"] for d in page})
            if len(page) < 10000:
                break
            offset += 10000
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with sem:
                body = {"hostname": f"new-{i:06d}", "role": "worker"}
                r = await c.post(f"/api/v1/devices/{ids[mac_for(i)]}/approve", json=body)
                storm.approved_at[i] = time.monotonic()
                r.raise_for_status()

        await asyncio.gather(*(one(i) for i in machines if mac_for(i) in ids))


async def storm_run(args: argparse.Namespace, w: World, url: str, run: int) -> Storm:
    storm = Storm()
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port or 80
    rng = random.Random(2)
    n = args.machines
    n_approved = int(n * args.approved_share)
    approved = rng.sample(range(w.registered), min(n_approved, w.registered))
    first = 10_000_000 + 1_000_000 * run  # new machines: never seen by an earlier run on this database
    new = list(range(first, first + n - len(approved)))
    if args.oauth:  # every machine uses the device flow: a Ktizo with it on serves no config without its token
        kinds = dict.fromkeys([*approved, *new], "oauth")
    else:
        kinds = dict.fromkeys(approved, "approved") | dict.fromkeys(new, "new")
    now = time.monotonic()
    tasks = [
        asyncio.create_task(machine(storm, host, port, i, kind, now + rng.uniform(0, args.ramp), args.timeout))
        for i, kind in kinds.items()
    ]
    deadline = now + args.ramp + 30
    waiting = len(new) + (len(approved) if args.oauth else 0)
    while len(storm.waiting) < waiting and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    say(f"  {len(storm.waiting):,} new machines waiting; approving them through the API")
    await approve_all(url, w.token, storm, new)
    _done, pending = await asyncio.wait(tasks, timeout=args.timeout + 15)
    for task in pending:
        task.cancel()
    storm.unfinished = len(pending)
    return storm


def run_machines(args: argparse.Namespace, w: World) -> None:
    for run, workers in enumerate(args.workers):
        env = {"KTIZO_LONG_POLL_SECONDS": str(args.timeout), "KTIZO_OAUTH_ENABLED": str(args.oauth).lower()}
        with serving(w, workers, "0" if workers == 1 else "0,1", **env) as url:
            say(f"machines: {args.machines:,} within {args.ramp:g} s against {workers} worker(s)")
            t0 = time.perf_counter()
            storm = asyncio.run(storm_run(args, w, url, run))
            took = time.perf_counter() - t0
        requests = sum(len(k.latencies) for k in storm.kinds.values())
        print(
            f"\n## machines: {args.machines:,} Talos machines within {args.ramp:g} s, {workers} worker(s), "
            f"{args.registered:,} registered, {args.database} ({requests:,} requests in {took:.1f} s, "
            f"{storm.unfinished} unfinished)"
        )
        print("| request | count | p50 ms | p95 ms | p99 ms | errors |")
        print("|---|---|---|---|---|---|")
        for name, k in storm.kinds.items():
            ms = [x * 1e3 for x in k.latencies]
            print(f"| {name} | {len(ms):,} | {pct(ms, 50):.1f} | {pct(ms, 95):.1f} | {pct(ms, 99):.1f} | {k.errors} |")
        woken = [x * 1e3 for x in storm.woken]
        if woken:
            print(
                f"| approval → config (held machines) | {len(woken):,} | {pct(woken, 50):.1f} | "
                f"{pct(woken, 95):.1f} | {pct(woken, 99):.1f} | |"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("doors", "machines", "both"), default="both")
    p.add_argument("--registered", type=int, default=1000, help="approved machines in the registry")
    p.add_argument("--database-url", help="a PostgreSQL server (its database is only used to CREATE a fresh one)")
    p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2], help="e.g. 1,2")
    p.add_argument("--seconds", type=int, default=10, help="wrk's run per door")
    p.add_argument("--connections", type=int, default=100)
    p.add_argument("--machines", type=int, default=5000)
    p.add_argument("--ramp", type=float, default=1.0, help="the machines power on within this many seconds")
    p.add_argument("--approved-share", type=float, default=0.5)
    p.add_argument("--oauth", action="store_true", help="machines use the OAuth device flow (token polls every 5 s)")
    p.add_argument("--timeout", type=float, default=30.0, help="also the long poll")
    args = p.parse_args()
    args.database = "PostgreSQL" if args.database_url else "SQLite"
    with world(args) as w:
        if args.part in ("doors", "both"):
            run_doors(args, w)
        if args.part in ("machines", "both"):
            run_machines(args, w)


if __name__ == "__main__":
    main()
