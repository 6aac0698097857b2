#!/usr/bin/env python3
"""Patch benchmark: saving a group whose patch is 256 KiB (the size limit) of keyed-list items.

Each run does what saving a group does (``check_patch_on_bases``): ``load_patch``, then ``apply_patches`` and
``check_patch_result`` on the base of each role. The bases are Talos's example configs (tests/fixtures/talos)
with a few NICs, as an operator's base may have; the patch fills the size limit with what Talos merges by key,
in the shapes that used to rescan the list for every item:

  machine.network.interfaces          new NICs by name and by deviceSelector, and more items for the same
                                      names and selectors (merged into the first), with vlans by vlanId
  cluster.apiServer.admissionControl  plugins by name, new and repeated
  $patch: delete                      a second document deleting NICs of the first by name, adding them back

    python bench/patch.py              # median of 5 runs
    python bench/patch.py --runs 9 --kib 128
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, cast

from ktizo.domain.devices import Role
from ktizo.services.groups import check_patch_on_bases
from ktizo.services.render import BaseConfig, ConfigSource, Snapshot
from ktizo.talos import load_patch
from ktizo.talos.yamlio import load_documents

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "talos"


class Bases:
    """The part of ConfigSource that check_patch_on_bases uses: a base per role."""

    def __init__(self) -> None:
        self.bases = {}
        for role in Role:
            documents = load_documents((FIXTURES / f"{role.value}.yaml").read_bytes())
            machine = next(doc for doc in documents if "kind" not in doc)["machine"]
            machine.setdefault("network", {})["interfaces"] = [
                {"interface": f"eno{i}", "dhcp": True} for i in range(1, 5)
            ]
            self.bases[role] = BaseConfig(role=role, documents=documents, version_key="bench", source="file")

    def base(self, snap: Any, role: Role) -> BaseConfig:
        return self.bases[role]


def build_patch(limit: int) -> tuple[str, dict[str, int]]:
    """A strategic patch of at most ``limit`` bytes, and how many items of each kind it has."""
    interfaces: list[str] = []
    admission: list[str] = []
    deletions: list[str] = []
    readded: list[str] = []
    first = ("machine:\n  network:\n    interfaces:\n", "cluster:\n  apiServer:\n    admissionControl:\n")
    # A second document deletes NICs the first one added, by name, and adds some back.
    second = "---\nmachine:\n  network:\n    interfaces:\n"
    size = sum(map(len, first)) + len(second)
    n = 0
    while True:
        chunk = [(interfaces, f"      - {{interface: eth{4 * n + k}, mtu: {1500 + k}}}\n") for k in range(4)]
        selector = f"{{hardwareAddr: '52:54:{n >> 8 & 255:02x}:{n & 255:02x}:*'}}"
        chunk.append((interfaces, f"      - {{deviceSelector: {selector}, dhcp: true}}\n"))
        chunk.append((interfaces, f"      - {{interface: eth{n}, vlans: [{{vlanId: {n % 400 + 1}, mtu: 1400}}]}}\n"))
        chunk.append((interfaces, f"      - {{deviceSelector: {selector}, mtu: 9000}}\n"))
        chunk.append((admission, f"      - {{name: Plugin{n % 900}, configuration: {{limit: {n}}}}}\n"))
        if n % 8 == 5:
            chunk.append((deletions, f"      - {{interface: eth{4 * n + 2}, $patch: delete}}\n"))
            chunk.append((readded, f"      - {{interface: eth{4 * n + 2}, dhcp: false}}\n"))
        grow = sum(len(line) for _, line in chunk)
        if size + grow > limit:
            break
        for bucket, line in chunk:
            bucket.append(line)
        size += grow
        n += 1
    text = first[0] + "".join(interfaces) + first[1] + "".join(admission) + second + "".join(deletions + readded)
    counts = {
        "interface items": len(interfaces) + len(readded),
        "admission plugins": len(admission),
        "deletions": len(deletions),
    }
    return text, counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--kib", type=int, default=256, help="patch size in KiB (the limit is 256)")
    args = p.parse_args()

    text, counts = build_patch(args.kib * 1024)
    data = text.encode()
    source = cast(ConfigSource, Bases())
    snap = cast(Snapshot, None)
    roles = list(Role)
    print(
        f"patch: {len(data)} bytes ({len(data) / 1024:.1f} KiB), "
        + ", ".join(f"{count} {name}" for name, count in counts.items())
        + f"; checked on the {' and '.join(role.value for role in roles)} bases"
    )
    loads, checks, totals = [], [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        patch = load_patch(data)
        t1 = time.perf_counter()
        check_patch_on_bases(source, snap, roles, [patch])
        t2 = time.perf_counter()
        loads.append(t1 - t0)
        checks.append(t2 - t1)
        totals.append(t2 - t0)
    print(
        f"load+apply+validate: median {statistics.median(totals):.3f} s over {args.runs} runs "
        f"(min {min(totals):.3f}, max {max(totals):.3f}); "
        f"load {statistics.median(loads):.3f} s, apply+validate {statistics.median(checks):.3f} s"
    )


if __name__ == "__main__":
    main()
