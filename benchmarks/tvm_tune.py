"""Tune a reference workload's graph for a TVM target from scratch and ship the database.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/tvm_tune.py --workload dit_mnist [--trials 600]
        [--target tvm-cpu] [--no-ship]

The workload's model, lowered with no passes (what `pared bench --workload W --target T`
builds as its plain contender), is tuned by MetaSchedule (backend option `tune: true`,
`tune_trials` total trials, xgboost cost model when pared[tune] is installed) into a fresh
database in a temporary cache directory, so the time is that of tuning from nothing. The
database is then pruned to the best record per task (backends/tvm/tuning.prune) and
written to examples/<workload>/tvm_tuning/<target>/, where every later TVM build of that
target finds it (replay, no measuring). Then the replay is timed: the same graph built
again with the shipped database only, offline.

Writes benchmarks/results/tvm_tuning.json (one entry per workload and target; others kept):
tuning seconds, trials, tasks, records, the tuned/untuned build check, and the replay seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "tvm_tuning.json")


def _build(model, example, target: str, options: dict, out: str):
    import pared
    opt = pared.optimize(model, example, target=target, pipeline=[], backend_options=options, bench_repeats=0,
                         allow_fidelity_loss=True, holdout=[], progress=lambda m: None)
    path = opt.save(out)
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    return path, manifest


def _schedules(manifest: dict) -> dict:
    graphs = manifest.get("graphs", {})
    out = {}
    for g, entry in graphs.items():
        s = entry.get("schedules")
        if s:
            out[g] = s
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", required=True)
    p.add_argument("--target", default="tvm-cpu")
    p.add_argument("--trials", type=int, default=600, help="MetaSchedule trials over all tasks")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-ship", action="store_true", help="tune and report, but do not write the shipped database")
    p.add_argument("--fast-math", action="store_true",
                   help="build with the backend option fast_math (its GELU / softmax functions get tuned)")
    a = p.parse_args()

    import torch

    from pared.backends.tvm import tuning
    from pared.bench import write_results
    from pared.workloads import get_workload

    torch.set_num_threads(a.threads)
    wl = get_workload(a.workload)
    model = wl.build().eval()
    example = tuple(wl.example_inputs())
    extra = {"fast_math": True} if a.fast_math else {}
    work = tempfile.mkdtemp(prefix="pared-tune-")
    try:
        cache = os.path.join(work, "cache")
        print(f"tuning {a.workload} for {a.target}: {a.trials} trials, fresh database in {cache}", flush=True)
        t0 = time.perf_counter()
        _, tuned = _build(model, example, a.target, {"tune": True, "tune_trials": a.trials, "cache_dir": cache,
                                                      "databases": False, **extra}, os.path.join(work, "tuned"))
        tune_s = time.perf_counter() - t0
        print(f"tuned in {tune_s:.0f} s: {_schedules(tuned)}", flush=True)
        src = tuning.work_dir(cache)
        dst = os.path.join(tuning.EXAMPLES, a.workload, "tvm_tuning", a.target)
        ship = dst if not a.no_ship else os.path.join(work, "shipped")
        if os.path.isdir(ship):
            shutil.rmtree(ship)
        pruned = tuning.prune(src, ship)
        size = sum(os.path.getsize(os.path.join(ship, f)) for f in os.listdir(ship))
        print(f"pruned database: {pruned['workloads']} tasks from {pruned['records_before']} records, "
              f"{size / 1024:.0f} KiB in {ship}", flush=True)
        # the replay a user gets: only the shipped database, no tuning, nothing measured
        t0 = time.perf_counter()
        _, replayed = _build(model, example, a.target, {"databases": [ship], **extra}, os.path.join(work, "replayed"))
        replay_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, untuned = _build(model, example, a.target, {"databases": False, **extra},
                            os.path.join(work, "untuned"))
        untuned_s = time.perf_counter() - t0
        print(f"replay build {replay_s:.1f} s ({_schedules(replayed)}); untuned build {untuned_s:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    import tvm
    entry = {"workload": a.workload, "target": a.target, "fast_math": a.fast_math, "trials": a.trials,
             "threads": a.threads,
             "tuning_s": round(tune_s, 1), "replay_build_s": round(replay_s, 1),
             "untuned_build_s": round(untuned_s, 1), "tasks_with_records": pruned["workloads"],
             "records_measured": pruned["records_before"], "database_bytes": size,
             "database": tuning.describe(dst) if not a.no_ship else None,
             "schedules_replayed": _schedules(replayed), "cost_model": tuning.cost_model_name(),
             "tvm": tvm.__version__, "cpu_count": os.cpu_count()}
    old = {}
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            old = json.load(f)
    old.setdefault("runs", {})[f"{a.workload}@{a.target}"] = entry
    old["command"] = "benchmarks/tvm_tune.py --workload W --trials N (per workload)"
    write_results(RESULTS, old)
    print(json.dumps(entry, indent=1))


if __name__ == "__main__":
    sys.exit(main())
