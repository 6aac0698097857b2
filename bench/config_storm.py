#!/usr/bin/env python3
"""Boot-storm benchmark: N Talos machines asking Ktizo for their config at once.

Pending machines poll ``GET /api/v1/config/download`` with Talos's query form and Talos's own retry schedule
(waits of 0, 1, 3, 7, 15 … s plus up to 1 s of jitter, shared/research/talos.md §1.6); approved machines
download their config (and retry the same way on any error). Every request is a new connection with
``Connection: close``, as Talos's HTTP client does. Latency is measured at the client (connect to last byte);
the server's own time per request comes from its ``Server-Timing`` header.

    python bench/config_storm.py                       # starts its own `ktizo serve` on SQLite
    python bench/config_storm.py --pending 1000 --approved 200 --duration 30 --ramp 5
    python bench/config_storm.py --url http://host:8000 --token ktz_…   # an existing server
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import httpx

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "tests" / "fixtures" / "talos"
TALOS_HEADERS = {"User-Agent": "Go-http-client/1.1", "Accept-Encoding": "gzip", "Connection": "close"}


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    server: list[float] = field(default_factory=list)  # the server's own time per request (Server-Timing)
    codes: dict[int, int] = field(default_factory=dict)
    errors: int = 0  # transport errors and unexpected statuses
    configs: int = 0


def mac_for(i: int) -> str:
    return "52:54:" + ":".join(f"{(i >> shift) & 255:02x}" for shift in (24, 16, 8, 0))


def uuid_for(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012x}"


def talos_query(i: int) -> str:
    return "/api/v1/config/download?" + urlencode(
        sorted({"mac": mac_for(i), "uuid": uuid_for(i), "serial": f"SN{i:08d}"}.items())
    )


def talos_wait(attempt: int) -> float:
    """go-retry's exponential schedule with Talos's 1 s units and 1 s jitter."""
    return (2**attempt - 1) // 2 + random.random()


async def talos_get(host: str, port: int, path: str, timeout: float) -> tuple[int, float | None]:
    """One request the way Talos's Go client makes it: a fresh connection, GET, read to EOF, close.

    A bare asyncio client, so that the measuring side (one Python process) keeps up with the server.
    Returns the status and the server's own time from its Server-Timing header (None if absent)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: Go-http-client/1.1\r\n"
            "Accept-Encoding: gzip\r\nConnection: close\r\n\r\n"
        )
        writer.write(request.encode())
        data = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    server_ms = None
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name.lower() == "server-timing" and "dur=" in value:
            server_ms = float(value.split("dur=")[1].split(";")[0].split(",")[0])
    return status, server_ms


async def machine(
    target: tuple[str, int],
    i: int,
    approved: bool,
    stats: Stats,
    start_at: float,
    end_at: float,
    args: argparse.Namespace,
) -> None:
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    attempt = 0
    path = talos_query(i)
    while time.monotonic() < end_at:
        t0 = time.perf_counter()
        try:
            status, server_ms = await talos_get(*target, path, args.timeout)
        except (TimeoutError, OSError, ValueError, IndexError):
            status, server_ms = 0, None
        stats.latencies.append(time.perf_counter() - t0)
        if server_ms is not None:
            stats.server.append(server_ms / 1e3)
        stats.codes[status] = stats.codes.get(status, 0) + 1
        if status != (200 if approved else 403):
            stats.errors += 1
        if approved and status == 200:
            stats.configs += 1
            if not args.closed_loop:
                return  # Talos has its config; it installs and never asks again
        attempt += 1
        if not args.closed_loop:
            wait = talos_wait(attempt)
            if time.monotonic() + wait >= end_at:
                return
            await asyncio.sleep(wait)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=1000, method="inclusive")[int(p * 10) - 1] if len(values) > 1 else values[0]


def start_server(port: int, data_dir: Path, long_poll: float) -> tuple[subprocess.Popen[str], str]:
    base = data_dir / "templates" / "base"
    base.mkdir(parents=True)
    for role in ("controlplane", "worker"):
        shutil.copyfile(EXAMPLES / f"{role}.yaml", base / f"{role}.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KTIZO_")}
    # Long polling holds every pending request open: this benchmark measures answers, so it is off by default.
    env.update(KTIZO_DATA_DIR=str(data_dir), KTIZO_LOG_LEVEL="warning", KTIZO_LONG_POLL_SECONDS=str(long_poll))
    # Every simulated machine comes from 127.0.0.1: the per-address budget of new machines would refuse most.
    env.update(KTIZO_NEW_DEVICES_PER_MINUTE="0")
    subprocess.run([sys.executable, "-m", "ktizo", "db", "upgrade"], env=env, check=True, capture_output=True)
    subprocess.run(
        [sys.executable, "-m", "ktizo", "users", "create", "bench", "--role", "admin", "--password-stdin"],
        input="benchmark-password\n",
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    token = subprocess.run(
        [sys.executable, "-m", "ktizo", "tokens", "create", "bench"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ktizo", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    return proc, token


async def wait_ready(url: str) -> None:
    async with httpx.AsyncClient() as c:
        for _ in range(300):
            try:
                if (await c.get(f"{url}/healthz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("server did not come up")


async def prepare(url: str, token: str, pending: int, approved: int) -> None:
    """Register every machine once (as Talos's first request would) and approve the first `approved`."""
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as c:
        sem = asyncio.Semaphore(32)

        async def first(i: int) -> None:
            async with sem:
                await c.get(talos_query(i))

        await asyncio.gather(*(first(i) for i in range(pending + approved)))
        ids: dict[str, int] = {}
        offset = 0
        while True:
            page = (await c.get("/api/v1/devices", params={"limit": 10000, "offset": offset}, headers=headers)).json()
            ids.update({d["mac_address"]: d["id"] for d in page})
            if len(page) < 10000:
                break
            offset += 10000

        async def approve(i: int) -> None:
            async with sem:
                body = {
                    "hostname": f"node-{i:05d}",
                    "ip_address": f"10.{(i >> 8) & 255}.{i & 255}.10/8",
                    "role": "controlplane" if i % 50 == 0 else "worker",
                }
                r = await c.post(f"/api/v1/devices/{ids[mac_for(i)]}/approve", json=body, headers=headers)
                r.raise_for_status()

        await asyncio.gather(*(approve(i) for i in range(approved)))


async def storm(args: argparse.Namespace, url: str) -> Stats:
    stats = Stats()
    parsed = httpx.URL(url)
    target = (parsed.host, parsed.port or 80)
    n = args.pending + args.approved
    now = time.monotonic()
    end_at = now + args.duration
    await asyncio.gather(
        *(
            machine(target, i, i < args.approved, stats, now + random.uniform(0, args.ramp), end_at, args)
            for i in range(n)
        )
    )
    return stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="Target this server instead of starting one")
    p.add_argument("--token", help="Admin token for --url (to approve the machines)")
    p.add_argument("--port", type=int, default=18765)
    p.add_argument("--pending", type=int, default=1000)
    p.add_argument("--approved", type=int, default=200)
    p.add_argument("--duration", type=float, default=30.0, help="Seconds the storm lasts")
    p.add_argument("--ramp", type=float, default=5.0, help="Machines power on spread over this many seconds")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument(
        "--closed-loop",
        action="store_true",
        help="No Talos backoff: every machine asks again at once (a throughput test)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--long-poll", type=float, default=0.0, help="KTIZO_LONG_POLL_SECONDS for the server it starts")
    args = p.parse_args()
    random.seed(args.seed)

    proc = None
    tmp = None
    url = args.url
    token = args.token
    if url is None:
        tmp = Path(tempfile.mkdtemp(prefix="ktizo-bench-"))
        proc, token = start_server(args.port, tmp / "data", args.long_poll)
        url = f"http://127.0.0.1:{args.port}"
    try:
        asyncio.run(wait_ready(url))
        if not token:
            raise SystemExit("--token is needed with --url")
        t0 = time.perf_counter()
        asyncio.run(prepare(url, token, args.pending, args.approved))
        print(
            f"prepared {args.pending + args.approved} machines ({args.approved} approved) "
            f"in {time.perf_counter() - t0:.1f} s"
        )
        t0 = time.perf_counter()
        stats = asyncio.run(storm(args, url))
        elapsed = time.perf_counter() - t0
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    lat = stats.latencies
    print(
        f"machines: {args.pending} pending + {args.approved} approved, ramp {args.ramp:g} s, "
        f"duration {args.duration:g} s, {'closed loop' if args.closed_loop else 'Talos backoff'}"
    )
    print(f"requests: {len(lat)} in {elapsed:.1f} s = {len(lat) / elapsed:.0f} req/s")
    print(
        f"latency ms: p50 {pct(lat, 50) * 1e3:.1f}  p95 {pct(lat, 95) * 1e3:.1f}  p99 {pct(lat, 99) * 1e3:.1f}  "
        f"max {max(lat) * 1e3:.1f}"
    )
    srv = stats.server
    if srv:
        print(
            f"server time ms: p50 {pct(srv, 50) * 1e3:.2f}  p95 {pct(srv, 95) * 1e3:.2f}  "
            f"p99 {pct(srv, 99) * 1e3:.2f}  max {max(srv) * 1e3:.2f}"
        )
    print(f"status codes: {dict(sorted(stats.codes.items()))}")
    print(f"configs delivered: {stats.configs}/{args.approved}   errors: {stats.errors}")
    if stats.errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
