#!/usr/bin/env python3
"""Declarative apply benchmark: ``ktizo apply -f`` of N Device documents (pre-registered, approved, each with a
hostname, a static address and labels), on a fresh SQLite database or a fresh PostgreSQL one, through the real CLI
(start-up, YAML parsing, validation, the one transaction). Then the same file again (everything unchanged), an
export, and the export applied back.

    python bench/apply.py                          # 100,000 devices on SQLite
    python bench/apply.py --devices 100000 --postgres postgresql+psycopg://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine, text


def documents(n: int) -> str:
    parts = []
    for i in range(n):
        a, b, c = (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF
        parts.append(
            "apiVersion: ktizo.dev/v1\nkind: Device\n"
            f"metadata: {{name: node-{i:06d}}}\n"
            f"spec:\n  mac_address: 02:00:00:{a:02x}:{b:02x}:{c:02x}\n  hostname: node-{i:06d}\n"
            f"  ip_address: 10.{a + 64}.{b}.{c}/8\n  labels: {{rack: r{i // 40}}}\n  status: approved\n"
        )
    return "---\n".join(parts)


def run(env: dict[str, str], *args: str, stdout: int | None = subprocess.DEVNULL) -> tuple[float, str]:
    start = time.perf_counter()
    # Standard error passes through: a big apply prints its progress there.
    done = subprocess.run(
        [sys.executable, "-m", "ktizo", *args], env=env, stdout=stdout or subprocess.PIPE, text=True, check=False
    )
    took = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"ktizo {' '.join(args)} failed (exit {done.returncode})")
    return took, done.stdout or ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--postgres", metavar="URL", help="a server URL; a scratch database ktizo_bench_apply is made")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ktizo-bench-apply-"))
    env = {**os.environ, "KTIZO_DATA_DIR": str(work / "data")}
    if args.postgres:
        admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("DROP DATABASE IF EXISTS ktizo_bench_apply"))
            conn.execute(text("CREATE DATABASE ktizo_bench_apply"))
        admin.dispose()
        env["KTIZO_DATABASE_URL"] = args.postgres.rsplit("/", 1)[0] + "/ktizo_bench_apply"
    run(env, "db", "upgrade")
    source = work / "devices.yaml"
    source.write_text(documents(args.devices))
    size = source.stat().st_size / 1024 / 1024
    database = "PostgreSQL" if args.postgres else "SQLite"
    print(f"{args.devices} Device documents ({size:.1f} MiB) on {database}")
    first, out = run(env, "apply", "-q", "-f", str(source), stdout=subprocess.PIPE)
    print(f"  first apply (all created):   {first:6.1f} s  {args.devices / first:8.0f} devices/s   {out.strip()}")
    again, out = run(env, "apply", "-q", "-f", str(source), stdout=subprocess.PIPE)
    print(f"  second apply (unchanged):    {again:6.1f} s  {args.devices / again:8.0f} devices/s   {out.strip()}")
    exported = work / "export.yaml"
    start = time.perf_counter()
    with exported.open("w") as sink:
        subprocess.run([sys.executable, "-m", "ktizo", "export", "--kind", "device"], env=env, stdout=sink, check=True)
    took = time.perf_counter() - start
    print(f"  export:                      {took:6.1f} s  ({exported.stat().st_size / 1024 / 1024:.1f} MiB)")
    back, out = run(env, "apply", "-q", "-f", str(exported), stdout=subprocess.PIPE)
    print(f"  export applied back:         {back:6.1f} s  {out.strip()}")


if __name__ == "__main__":
    main()
