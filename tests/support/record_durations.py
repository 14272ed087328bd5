"""Write tests/durations.json from the "slowest N durations" sections of pytest logs (run with
--durations=N), which tests/conftest.py reads to start the slowest tests first:

    .venv/bin/python tests/support/record_durations.py LOG [LOG ...]

A test's setup, call and teardown times are added; a test found in several logs keeps its
largest total. Tests below 5 s are left out (their order does not matter)."""
from __future__ import annotations

import json
import os
import re
import sys

LINE = re.compile(r"^\s*([\d.]+)s (setup|call|teardown)\s+(\S+)\s*$")
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "durations.json")
MIN_S = 5.0


def parse(path: str) -> dict[str, float]:
    got: dict[str, float] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = LINE.match(line)
            if m:
                got[m.group(3)] = got.get(m.group(3), 0.0) + float(m.group(1))
    return got


def main(paths: list[str]) -> None:
    if not paths:
        sys.exit(__doc__)
    merged: dict[str, float] = {}
    for p in paths:
        for node, s in parse(p).items():
            merged[node] = max(merged.get(node, 0.0), s)
    kept = {n: round(s, 1) for n, s in sorted(merged.items(), key=lambda kv: -kv[1]) if s >= MIN_S}
    tmp = OUT + ".part"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(kept, f, indent=1)
        f.write("\n")
    os.replace(tmp, OUT)
    print(f"{OUT}: {len(kept)} tests")


if __name__ == "__main__":
    main(sys.argv[1:])
