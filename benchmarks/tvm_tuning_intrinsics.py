"""What loading only the target's tensor intrinsics (backends/tvm/tuning.load_intrinsics) changes
for MetaSchedule tuning on this host, old way against new, each in a fresh process:

1. the import: TVM's whole package of intrinsics (`import tvm.s_tir.tensor_intrin`, what
   MetaSchedule's TuneContext and each builder worker do) against `load_intrinsics(("x86",))`,
   alternating, --repeats rounds, median;
2. a tuning run: a small MLP (Linear 32->64, ReLU, Linear 64->16; batch 8) built for tvm-cpu with
   `tune: true` and --trials trials from an empty database, with MetaSchedule's default local
   builder (the old way: every worker imports the whole package before each batch, inside the 30 s
   per-candidate timeout) against pared's (only the x86 intrinsics, in the workers' initializer):
   wall time, candidates the builder timed out on, functions tuned.

    .venv/bin/python benchmarks/tvm_tuning_intrinsics.py [--repeats 3] [--trials 8]

Writes benchmarks/results/tvm_tuning_intrinsics.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

IMPORT = """
import time, tvm
t = time.perf_counter()
if {lean}:
    from pared.backends.tvm import tuning
    tuning.load_intrinsics(("x86",))
else:
    import tvm.s_tir.tensor_intrin
print(time.perf_counter() - t)
"""

TUNE = """
import json, sys, time, warnings
import torch
from torch import nn
import pared
from pared.backends.executor import Executor
from pared.backends.tvm import tuning
if not {lean}:      # the old way: MetaSchedule's own builder, the whole package imported where it does
    tuning.load_intrinsics = lambda families: None
    tuning._builder = lambda families: "local"
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
cache = {cache!r}
t = time.perf_counter()
opt = pared.optimize(m, (torch.randn(8, 32),), target="tvm-cpu", pipeline=[], bench_repeats=0, holdout=[],
                     allow_fidelity_loss=True, progress=lambda s: None,
                     backend_options={{"tune": True, "tune_trials": {trials}, "cache_dir": cache, "databases": False}})
path = opt.save(cache + "/art")
wall = time.perf_counter() - t
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    entry = Executor(path).manifest["graphs"]["main"]
print(json.dumps({{"wall_s": round(wall, 1), "build_timeouts": tuning.build_timeouts(tuning.work_dir(cache)),
                  "tuned_functions": entry["schedules"]["tuned_functions"]}}))
"""


def _run(code: str) -> str:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return out.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "tvm_tuning_intrinsics.json"))
    a = ap.parse_args()
    imports: dict[str, list[float]] = {"whole_package": [], "x86_only": []}
    for r in range(a.repeats):
        for arm, lean in (("whole_package", False), ("x86_only", True))[::1 if r % 2 == 0 else -1]:
            imports[arm].append(round(float(_run(IMPORT.format(lean=lean))), 2))
            print(f"import round {r + 1}: {arm} {imports[arm][-1]} s", flush=True)
    tuned = {}
    for arm, lean in (("default_builder", False), ("pared_builder", True)):
        with tempfile.TemporaryDirectory(prefix="pared-tune-") as cache:
            tuned[arm] = json.loads(_run(TUNE.format(lean=lean, cache=cache, trials=a.trials)))
        print(f"tuning, {arm}: {tuned[arm]}", flush=True)
    sys.path.insert(0, os.path.dirname(HERE))
    from pared.bench import write_results
    write_results(a.json, {
        "what": "MetaSchedule tuning on this host: the import of TVM's tensor intrinsics (whole package vs "
                "x86 only; fresh process each, alternating, median) and a tuning run of a small MLP with "
                "MetaSchedule's default builder vs pared's (x86 intrinsics loaded in each worker's initializer)",
        "repeats": a.repeats, "trials": a.trials,
        "import_s": {k: {"median": statistics.median(v), "rounds": v} for k, v in imports.items()},
        "tuning": tuned,
    })
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
