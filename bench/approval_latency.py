#!/usr/bin/env python3
"""How long from an operator's approval to the machine having its config, in each mode.

  long-poll — Talos's plain GET is held open by Ktizo (KTIZO_LONG_POLL_SECONDS) and answered on approval;
  oauth     — Talos's OAuth2 device flow: it polls /token every `interval` s, then downloads with the token;
  backoff   — neither: Talos retries on its own schedule (0, 1, 3, 7 … 4095 s, shared/research/talos.md §1.6),
              computed for approvals after a given wait (no server needed).

Each mode approves N machines at random moments through the API and measures, per machine, the time from the
moment the operator's approval request is sent to the config download's last byte.

    python bench/approval_latency.py --machines 20
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import httpx

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "tests" / "fixtures" / "talos"


def start(port: int, data: Path, extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    base = data / "templates" / "base"
    base.mkdir(parents=True)
    for role in ("controlplane", "worker"):
        shutil.copyfile(EXAMPLES / f"{role}.yaml", base / f"{role}.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KTIZO_")}
    # All machines come from 127.0.0.1: lift the per-address budget of new machines.
    env.update(KTIZO_DATA_DIR=str(data), KTIZO_LOG_LEVEL="warning", KTIZO_NEW_DEVICES_PER_MINUTE="0", **extra)
    run = [sys.executable, "-m", "ktizo"]
    subprocess.run([*run, "db", "upgrade"], env=env, check=True, capture_output=True)
    subprocess.run(
        [*run, "users", "create", "bench", "--role", "admin", "--password-stdin"],
        env=env,
        check=True,
        capture_output=True,
        input=b"benchmark-password\n",
    )
    token = subprocess.run(
        [*run, "tokens", "create", "bench"], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    proc = subprocess.Popen(
        [*run, "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return proc, token
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("server did not start")


def mac(i: int) -> str:
    return f"52:54:00:aa:{(i >> 8) & 255:02x}:{i & 255:02x}"


def config_url(i: int) -> str:
    return "/api/v1/config/download?" + urlencode(
        sorted({"mac": mac(i), "uuid": f"00000000-0000-4000-8000-{i:012x}"}.items())
    )


def long_poll(url: str, token: str, n: int) -> list[float]:
    results: list[float] = []
    approved_at: dict[int, float] = {}
    admin = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, timeout=10) as c:
        for i in range(n):  # registered first; a first config request would itself be held
            c.post("/api/v1/devices/register", json={"mac_address": mac(i)})
        ids = {d["mac_address"]: d["id"] for d in c.get("/api/v1/devices", headers=admin).json()}

    def machine(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while True:
                r = c.get(config_url(i), headers={"Connection": "close"})
                if r.status_code == 200:
                    results.append(time.perf_counter() - approved_at[i])
                    return

    threads = [threading.Thread(target=machine, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    with httpx.Client(base_url=url, timeout=10) as c:
        for i in random.sample(range(n), n):
            time.sleep(random.uniform(0.05, 0.3))
            approved_at[i] = time.perf_counter()
            c.post(f"/api/v1/devices/{ids[mac(i)]}/approve", json={"hostname": f"lp-{i}"}, headers=admin)
    for t in threads:
        t.join(timeout=120)
    return results


def oauth(url: str, token: str, n: int) -> list[float]:
    results: list[float] = []
    codes: dict[int, str] = {}
    approved_at: dict[int, float] = {}
    ready = threading.Barrier(n + 1)
    admin = {"Authorization": f"Bearer {token}"}

    def machine(i: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            grant = c.post("/device/code", data={"client_id": "ktizo", "mac": mac(i), "uuid": "", "serial": ""}).json()
            codes[i] = grant["user_code"]
            ready.wait()
            interval = grant["interval"]
            while True:
                time.sleep(interval)  # what golang.org/x/oauth2 does between polls
                r = c.post(
                    "/token",
                    data={
                        "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
                        "device_code": grant["device_code"],
                        "client_id": "ktizo",
                    },
                )
                body = r.json()
                if r.status_code == 200:
                    cfg = c.get(config_url(i), headers={"Authorization": f"Bearer {body['access_token']}"})
                    assert cfg.status_code == 200, cfg.text
                    results.append(time.perf_counter() - approved_at[i])
                    return
                if body.get("error") == "slow_down":
                    interval += 5

    threads = [threading.Thread(target=machine, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    ready.wait()
    with httpx.Client(base_url=url, timeout=10) as c:
        for i in random.sample(range(n), n):
            time.sleep(random.uniform(0.05, 0.5))
            approved_at[i] = time.perf_counter()
            r = c.post(f"/api/v1/device-codes/{codes[i]}/approve", json={"hostname": f"oa-{i}"}, headers=admin)
            r.raise_for_status()
    for t in threads:
        t.join(timeout=120)
    return results


def backoff_delays(waits: list[float]) -> list[tuple[float, float]]:
    """For an approval after `wait` seconds of refusals, how long until Talos asks again (mean jitter 0.5 s)."""
    attempts, t, n = [], 0.0, 0
    while t < 3 * 3600:
        attempts.append(t)
        n += 1
        t += (2**n - 1) // 2 + 0.5
    return [(w, min(a for a in attempts if a >= w) - w) for w in waits]


def show(name: str, values: list[float]) -> None:
    values = sorted(values)
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    print(
        f"{name:<10} n={len(values):>3}  p50 {q[49] * 1e3:8.1f} ms  p95 {q[94] * 1e3:8.1f} ms  "
        f"max {values[-1] * 1e3:8.1f} ms"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--machines", type=int, default=20)
    p.add_argument("--port", type=int, default=18790)
    args = p.parse_args()
    random.seed(1)
    for mode, extra in (
        ("long-poll", {"KTIZO_LONG_POLL_SECONDS": "60"}),
        ("oauth", {"KTIZO_OAUTH_ENABLED": "true", "KTIZO_LONG_POLL_SECONDS": "0"}),
    ):
        tmp = Path(tempfile.mkdtemp(prefix="ktizo-latency-"))
        proc, token = start(args.port, tmp / "data", extra)
        try:
            url = f"http://127.0.0.1:{args.port}"
            show(
                mode, long_poll(url, token, args.machines) if mode == "long-poll" else oauth(url, token, args.machines)
            )
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
            shutil.rmtree(tmp, ignore_errors=True)
    for wait, delay in backoff_delays([10, 60, 300, 600, 1200, 2400, 3600]):
        print(f"backoff    approved after {wait:>5.0f} s of waiting: next request {delay:7.1f} s later")


if __name__ == "__main__":
    main()
