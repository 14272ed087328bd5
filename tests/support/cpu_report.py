"""Sum a PARED_TEST_CPU_LOG file (tests/conftest.py): each worker's wall and CPU time over its
tests, and the tests that left their core idle longest (wall time minus CPU time):

    .venv/bin/python tests/support/cpu_report.py FILE [N]
"""
from __future__ import annotations

import collections
import json
import sys


def summary(path: str, top: int = 25) -> str:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    per_worker = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for r in rows:
        w = per_worker[r["worker"]]
        w[0] += r["wall_s"]
        w[1] += r["cpu_s"]
        w[2] += 1
    out = [f"{len(rows)} tests; wall {sum(r['wall_s'] for r in rows):.0f} s, CPU {sum(r['cpu_s'] for r in rows):.0f} s"]
    for name, (wall, cpu, n) in sorted(per_worker.items()):
        out.append(f"  {name}: {n} tests, wall {wall:.0f} s, CPU {cpu:.0f} s")
    out.append(f"most idle (wall - CPU), top {top}:")
    for r in sorted(rows, key=lambda r: r["cpu_s"] - r["wall_s"])[:top]:
        out.append(f"  {r['wall_s'] - r['cpu_s']:7.1f} s idle  wall {r['wall_s']:7.1f}  CPU {r['cpu_s']:7.1f}  {r['test']}")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(summary(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25))
