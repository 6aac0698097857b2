#!/usr/bin/env python3
"""Device list page benchmark (issue #5): server time to render /ui/devices with filters applied.

Bulk-inserts N devices (half pending with facts, a third approved with hostnames and IPs, the rest rejected),
signs in through the login form, then requests each scenario's page many times in-process (Starlette's
TestClient: the whole ASGI app with routing, session check, CSRF-ready page, queries and the Jinja2 render;
no socket). Reports p50/p95/p99 per scenario.

    python bench/ui_list.py                                   # 10,000 devices, SQLite (fresh temp dir)
    python bench/ui_list.py --devices 100000 \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test   # a schema of its own, dropped after
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, insert, text

from ktizo.app import build_services, create_app
from ktizo.db.migrate import upgrade
from ktizo.db.models import Device
from ktizo.db.types import utcnow
from ktizo.domain.users import UserRole
from ktizo.services.context import Actor
from ktizo.settings import Settings

warnings.filterwarnings("ignore", message=".*httpx.*")
from fastapi.testclient import TestClient  # noqa: E402 - after the filter: it warns on import

SCHEMA = "ktizo_bench_ui"
PASSWORD = "benchmark password 1"  # noqa: S105 - a throwaway user in a throwaway database


def pct(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def mac_for(i: int) -> str:
    return "52:54:" + ":".join(f"{(i >> shift) & 255:02x}" for shift in (24, 16, 8, 0))


def rows(n: int) -> Iterator[dict[str, object]]:
    now = utcnow()
    for i in range(n):
        status = "pending" if i % 6 < 3 else ("approved" if i % 6 < 5 else "rejected")
        yield {
            "mac_address": mac_for(i),
            "uuid": f"4c4c4544-{i >> 16 & 0xFFFF:04x}-{i & 0xFFFF:04x}-8051-b4c04f4e{i & 0xFFFF:04x}",
            "serial": f"SN{i:07d}",
            "status": status,
            "role": "controlplane" if i % 100 == 0 else "worker",
            "hostname": f"node-{i:06d}" if status == "approved" else None,
            "ip_address": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255 or 1}/8" if status == "approved" else None,
            "notes": "",
            "source": "config_fetch" if i % 2 else "ipxe",
            "facts": {"manufacturer": "Dell Inc.", "product": "PowerEdge R650", "arch": "amd64"} if i % 3 else {},
            "first_seen": now,
            "last_seen": now,
            "last_ip": f"10.1.{(i >> 8) & 255}.{i & 255}",
            "labels": {},
            "extra_nics": [],
            "revision": 1,
        }


@contextmanager
def database(url: str | None) -> Iterator[tuple[Settings, str]]:
    tmp = Path(tempfile.mkdtemp(prefix="ktizo-ui-bench-"))
    if not url:
        yield Settings(data_dir=tmp / "data"), "SQLite (WAL)"
        return
    admin = create_engine(url)
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        conn.execute(text(f"CREATE SCHEMA {SCHEMA}"))
    sep = "&" if "?" in url else "?"
    try:
        yield (
            Settings(data_dir=tmp / "data", database_url=f"{url}{sep}options=-csearch_path%3D{SCHEMA}"),
            "PostgreSQL",
        )
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        admin.dispose()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--requests", type=int, default=200, help="requests per scenario")
    p.add_argument("--database-url", help="PostgreSQL URL (a schema of its own is made and dropped)")
    args = p.parse_args()

    with database(args.database_url) as (settings, label):
        services = build_services(settings)
        upgrade(services.db)
        t0 = time.perf_counter()
        batch: list[dict[str, object]] = []
        with services.db.write() as s:
            for row in rows(args.devices):
                batch.append(row)
                if len(batch) == 5000:
                    s.execute(insert(Device), batch)
                    batch = []
            if batch:
                s.execute(insert(Device), batch)
        if services.db.dialect == "postgresql":
            # What autovacuum does on a live database: planner statistics and the visibility map.
            with services.db.write_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("VACUUM ANALYZE devices"))
        counts = services.devices.counts()
        print(f"{label}: {args.devices:,} devices inserted in {time.perf_counter() - t0:.1f} s; by status {counts}")

        services.users.create(Actor.system(), "bench", UserRole.OPERATOR, PASSWORD)
        client = TestClient(create_app(settings, services))
        nonce = re.search(r'name="nonce" value="([^"]+)"', client.get("/ui/login").text)
        assert nonce is not None
        signed_in = client.post(
            "/ui/login",
            data={"username": "bench", "password": PASSWORD, "nonce": nonce.group(1)},
            follow_redirects=False,
        )
        assert signed_in.status_code == 303, signed_in.text

        last_page = -(-args.devices // 2 // 50)  # the pending tab's last page at 50 a page
        scenarios = {
            "pending, newest first (default view)": "/ui/devices",
            "pending, search MAC fragment": "/ui/devices?status=pending&q=52:54:00:00:1",
            "pending, search serial, sort MAC": "/ui/devices?status=pending&q=sn00012&sort=mac&dir=asc",
            "approved, sort hostname, page 20": "/ui/devices?status=approved&sort=hostname&dir=asc&page=20",
            "all, sort last seen, 200 a page": "/ui/devices?status=all&sort=last_seen&per=200",
            "pending, last page": f"/ui/devices?status=pending&page={last_page}",
            "all, search with no match": "/ui/devices?status=all&q=nothing-matches-this",
            "poll (every 4 s per open page)": "/ui/devices/poll?status=pending&since=2099-01-01T00:00:00%2B00:00",
        }
        print(f"{'scenario':<40} {'p50':>8} {'p95':>8} {'p99':>8}  (ms, {args.requests} requests each)")
        for name, url in scenarios.items():
            for _ in range(5):  # warm the caches and the connection pool
                assert client.get(url).status_code == 200
            times = []
            for _ in range(args.requests):
                t = time.perf_counter()
                r = client.get(url)
                times.append((time.perf_counter() - t) * 1e3)
                assert r.status_code == 200
            print(f"{name:<40} {pct(times, 50):8.1f} {pct(times, 95):8.1f} {pct(times, 99):8.1f}")
        client.close()
        services.db.dispose()


if __name__ == "__main__":
    main()
