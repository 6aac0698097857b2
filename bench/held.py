#!/usr/bin/env python3
"""Held-connection benchmark: one client (or many) holding config requests open against `ktizo serve`.

What a hostile client on the provisioning network can do with the long poll: open connections that each ask for
a pending machine's config and leave them hanging. Measured while they hang: how many the server holds (the rest
are answered at once), whether health checks and approved downloads still get through and how fast, the server's
memory; then all of them hang up at once, and the memory after.

    python bench/held.py                                  # 1,100 connections from one address
    python bench/held.py --connections 3000 --addresses 100   # from 100 loopback addresses (127.0.1.x)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

import httpx

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "tests" / "fixtures" / "talos"


def mac_for(i: int) -> str:
    return "52:54:" + ":".join(f"{(i >> shift) & 255:02x}" for shift in (24, 16, 8, 0))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else float("nan")


def start_server(port: int, data_dir: Path) -> tuple[subprocess.Popen[str], dict[str, str]]:
    base = data_dir / "templates" / "base"
    base.mkdir(parents=True)
    for role in ("controlplane", "worker"):
        shutil.copyfile(EXAMPLES / f"{role}.yaml", base / f"{role}.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KTIZO_")}
    env.update(KTIZO_DATA_DIR=str(data_dir), KTIZO_LOG_LEVEL="warning", KTIZO_NEW_DEVICES_PER_MINUTE="0")
    subprocess.run([sys.executable, "-m", "ktizo", "db", "upgrade"], env=env, check=True, capture_output=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ktizo", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    return proc, env


_watchers: set[asyncio.Future[None]] = set()


async def hold(port: int, mac: str, source: str, answered: list[float], started: float) -> socket.socket | None:
    """Send one config GET and keep the connection; note when (if) the server answers it."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.bind((source, 0))
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        query = urlencode({"mac": mac})
        await loop.sock_sendall(sock, f"GET /api/v1/config/download?{query} HTTP/1.1\r\nHost: k\r\n\r\n".encode())
    except OSError:
        sock.close()
        return None

    async def watch() -> None:
        try:
            if await loop.sock_recv(sock, 1):
                answered.append(time.monotonic() - started)
        except OSError:
            pass

    _watchers.add(task := asyncio.ensure_future(watch()))
    task.add_done_callback(_watchers.discard)
    return sock


async def probe(url: str, path: str, n: int) -> tuple[list[float], int]:
    latencies, failures = [], 0
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(n):
            t = time.perf_counter()
            try:
                r = await client.get(path, headers={"Connection": "close"})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t)
            failures += not ok
    return latencies, failures


async def run(args: argparse.Namespace, url: str, port: int, pid: int, env: dict[str, str]) -> None:
    token = subprocess.run(
        [sys.executable, "-m", "ktizo", "tokens", "create", "bench"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        for i in range(args.connections):  # every held request names a pending machine of its own
            await c.post("/api/v1/devices/register", json={"mac_address": mac_for(i)})
        approved = mac_for(10_000_000)
        await c.post("/api/v1/devices/register", json={"mac_address": approved})
        [dev] = (await c.get("/api/v1/devices", params={"q": approved}, headers=headers)).json()
        await c.post(f"/api/v1/devices/{dev['id']}/approve", json={"hostname": "ok-1"}, headers=headers)
    rss_before = rss_mib(pid)
    sources = [f"127.0.1.{1 + i % args.addresses}" for i in range(args.connections)] if args.addresses > 1 else None
    answered: list[float] = []
    started = time.monotonic()
    # In waves: thousands of connects in the same instant overflow the kernel's accept queue (uvicorn's backlog
    # is 2,048), and what the script then measures is the kernel's SYN retries, not Ktizo.
    socks: list[socket.socket | None] = []
    for low in range(0, args.connections, args.wave):
        socks += await asyncio.gather(
            *(
                hold(port, mac_for(i), sources[i] if sources else "127.0.0.1", answered, started)
                for i in range(low, min(low + args.wave, args.connections))
            )
        )
        await asyncio.sleep(0.5)
    # Wait until the answers stop coming (a few thousand connections take the server seconds to accept and decide;
    # counting too early would call the unanswered ones held).
    seen, quiet_since = -1, time.monotonic()
    while time.monotonic() - quiet_since < 3 and time.monotonic() - started < 60:
        if len(answered) != seen:
            seen, quiet_since = len(answered), time.monotonic()
        await asyncio.sleep(0.2)
    opened = sum(s is not None for s in socks)
    refused_at_once = len(answered)
    health, health_failed = await probe(url, "/healthz", 200)
    config, config_failed = await probe(url, f"/api/v1/config/download?mac={approved}", 100)
    rss_held = rss_mib(pid)
    for s in socks:
        if s is not None:
            s.close()
    await asyncio.sleep(3)
    rss_after = rss_mib(pid)
    print(
        f"connections opened: {opened} from {args.addresses} address(es); answered at once (not held): "
        f"{refused_at_once}; held: {opened - refused_at_once}"
    )
    print(
        f"/healthz while held: {len(health) - health_failed}/{len(health)} ok, "
        f"p50 {statistics.median(health) * 1e3:.1f} ms, p99 {pct(health, 0.99) * 1e3:.1f} ms"
    )
    print(
        f"approved download while held: {len(config) - config_failed}/{len(config)} ok, "
        f"p50 {statistics.median(config) * 1e3:.1f} ms, p99 {pct(config, 0.99) * 1e3:.1f} ms"
    )
    print(
        f"server RSS: {rss_before:.0f} MiB before, {rss_held:.0f} MiB while held, {rss_after:.0f} MiB after all hung up"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1100)
    parser.add_argument("--addresses", type=int, default=1, help="spread over 127.0.1.1 … 127.0.1.N")
    parser.add_argument("--port", type=int, default=18765)
    parser.add_argument("--wave", type=int, default=500, help="connections opened at once, 0.5 s apart")
    args = parser.parse_args()
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the client needs a descriptor per connection too
    with tempfile.TemporaryDirectory() as tmp:
        proc, env = start_server(args.port, Path(tmp) / "data")
        try:
            url = f"http://127.0.0.1:{args.port}"
            for _ in range(200):
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            subprocess.run(
                [sys.executable, "-m", "ktizo", "users", "create", "bench", "--role", "admin", "--password-stdin"],
                input="benchmark-password\n",
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            asyncio.run(run(args, url, args.port, proc.pid, env))
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
