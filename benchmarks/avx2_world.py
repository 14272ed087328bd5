"""Run a command on this CPU as an AVX2-only x86 CPU: AVX-512, VNNI and AMX hidden from CPUID
(tests/support/hide_isa.c via pared.testing.hidden_isa_env), so ONNX Runtime, LLVM and torch pick
the kernels such a CPU runs, at this CPU's clock. Results files written inside record the CPU as
the benchmark process saw it ("machine": {"cpu": {"features": ["avx2"], "hidden_by_emulation": ...}}).

    .venv/bin/python benchmarks/avx2_world.py -- .venv/bin/python benchmarks/quant_minilm.py --out ...
"""
from __future__ import annotations

import subprocess
import sys

from pared.testing import AVX2_ONLY, hidden_isa_env


def main() -> int:
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    env, note = hidden_isa_env(AVX2_ONLY)
    if env is None:
        print(f"cannot hide features here: {note}", file=sys.stderr)
        return 1
    print(f"[avx2_world] {note}: {' '.join(args)}", file=sys.stderr, flush=True)
    return subprocess.call(args, env=env)


if __name__ == "__main__":
    sys.exit(main())
