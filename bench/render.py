#!/usr/bin/env python3
"""Render benchmark: configs for N approved devices spread over groups with patches.

Measures, in-process on a fresh SQLite database:
  cold  — the first render of each device (base → group patches → device patch → its fields, YAML dump);
  warm  — rendering again (served from the cache);
  serve — the whole boot-path decision for an approved device (`BootService.answer`: the device lookup,
          the snapshot check and the cached render), i.e. the server time of a config download minus HTTP;
  invalidation — after changing one group's patch, how many renders miss the cache (only that group's).

    python bench/render.py                       # 10,000 devices, 10 groups
    python bench/render.py --devices 2000 --groups 4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import insert

from ktizo.app import build_services
from ktizo.db.migrate import upgrade
from ktizo.db.models import Device
from ktizo.services.boot import Claim
from ktizo.services.context import Actor
from ktizo.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SECRETS = ROOT / "tests" / "fixtures" / "talos" / "secrets.yaml"


def pct(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(p * 10) - 1]


def report(name: str, seconds: list[float]) -> None:
    ms = [s * 1e3 for s in seconds]
    print(
        f"{name:<14} n={len(ms):>6}  mean {statistics.fmean(ms):7.3f} ms  p50 {pct(ms, 50):7.3f}  "
        f"p95 {pct(ms, 95):7.3f}  p99 {pct(ms, 99):7.3f}  max {max(ms):7.3f}"
    )


def mac_for(i: int) -> str:
    return "52:54:" + ":".join(f"{(i >> shift) & 255:02x}" for shift in (24, 16, 8, 0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--groups", type=int, default=10)
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ktizo-render-"))
    settings = Settings(data_dir=tmp / "data")
    services = build_services(settings)
    upgrade(services.db)
    admin = Actor.system()
    cluster = services.cluster
    cluster.import_secrets(admin, SECRETS.read_bytes())
    cluster.update(
        admin,
        {
            "cluster_name": "bench",
            "endpoint": "https://bench:6443",
            "kubernetes_version": "1.33.0",
            "gateway": "10.0.0.1",
            "nameservers": ["10.0.0.2", "10.0.0.3"],
        },
    )
    cluster.generate(admin)
    for g in range(args.groups):
        patch = (
            f"machine:\n  nodeLabels:\n    rack: r{g}\n  kubelet:\n    extraArgs:\n      max-pods: '{100 + g}'\n"
            f"---\napiVersion: v1alpha1\nkind: TimeSyncConfig\nntp:\n  servers: [ntp{g}.example]\n"
        )
        services.groups.create(
            admin, {"name": f"rack-{g}", "priority": g, "selector": {"rack": f"r{g}"}, "patch": patch}
        )
    rows = [
        {
            "mac_address": mac_for(i),
            "status": "approved",
            "role": "controlplane" if i % 100 == 0 else "worker",
            "hostname": f"node-{i:05d}",
            "ip_address": f"10.{(i >> 8) & 255}.{i & 255}.10/8",
            "notes": "",
            "source": "manual",
            "facts": {},
            "labels": {"rack": f"r{i % args.groups}"},
            "patch": "machine:\n  install:\n    disk: /dev/nvme0n1\n" if i % 7 == 0 else None,
            "extra_nics": [],
            "revision": 1,
        }
        for i in range(args.devices)
    ]
    with services.db.write() as s:
        s.execute(insert(Device), rows)
    with services.db.read() as s:
        from sqlalchemy import select

        devices = list(s.scalars(select(Device).order_by(Device.id)))
    print(
        f"{args.devices} approved devices in {args.groups} groups with patches "
        f"(1 in 7 with its own patch, 1 in 100 a control plane), Talos {services.source.snapshot().talos_version}"
    )

    renderer = services.renderer
    snap = services.source.snapshot()
    cold, warm = [], []
    for d in devices:
        t0 = time.perf_counter()
        renderer.render(d, snap)
        cold.append(time.perf_counter() - t0)
    for d in devices:
        t0 = time.perf_counter()
        renderer.render(d, snap)
        warm.append(time.perf_counter() - t0)
    report("cold render", cold)
    report("warm render", warm)

    serve = []
    for d in devices[: min(len(devices), 5000)]:
        claim = Claim(mac=d.mac_address, source_ip="127.0.0.1")
        t0 = time.perf_counter()
        answer = services.boot.answer(claim)
        serve.append(time.perf_counter() - t0)
        assert answer.body is not None
    report("warm serve", serve)

    before = renderer.cache.misses
    services.groups.update(admin, "rack-0", {"patch": "machine:\n  nodeLabels:\n    rack: r0-new\n"})
    snap = services.source.snapshot()
    for d in devices:
        renderer.render(d, snap)
    in_group = sum(1 for d in devices if d.labels.get("rack") == "r0")
    print(
        f"invalidation   after changing group rack-0: {renderer.cache.misses - before} re-renders "
        f"for {in_group} devices in that group (of {len(devices)})"
    )
    services.db.dispose()


if __name__ == "__main__":
    main()
