"""Timestep buckets under a cache pass, side by side in one process: does choosing the
activation scales by t (4 buckets) cost speed against one bucket?

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/compose_buckets.py [--repeats 9]

Builds the dit_mnist artifacts of examples/pipelines/dit_full.yaml (timestep_quant with
4 buckets chosen by t, then taylor_cache in each) and dit_full_1bucket.yaml (one bucket,
then taylor_cache), and times the workload's task (one DDIM-50 batch of 10, CFG 1.5) with
each, alternating, one thread each, median over rounds. The 4-bucket artifact is
also loaded sharing the weights of shared.weights (one copy in memory, prepacking off:
`pared.load(path, share_weights=True)`), and both artifacts once more with an activation
arena per ONNX Runtime session (`shared_arena=False`: ORT's default, and pared's before the
sessions of a process shared one). Per call, the full steps of the 4-bucket artifact are
timed apart: the first after a bucket switch against the others, both ways (with an arena
each, a switch found the new session's buffers out of cache; backends/onnxruntime/runtime.py).
Fidelity is measured by
`pared bench` (benchmarks/results/dit_full.json, dit_full_1bucket.json); this script
answers only the speed question. Writes benchmarks/results/compose_buckets.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))

import torch  # noqa: E402

import pared  # noqa: E402
from pared.backends.executor import Executor  # noqa: E402
from pared.bench import write_results  # noqa: E402
from pared.fidelity import side_by_side  # noqa: E402
from pared.pipeline import build_passes, load_pipeline  # noqa: E402
from pared.workloads import EXAMPLES, get_workload  # noqa: E402

PIPELINES = {"4_buckets": "dit_full.yaml", "1_bucket": "dit_full_1bucket.yaml"}


def full_steps_ms(ex: Executor, task, rounds: int) -> dict:
    """Median ms of the full steps (graphs `*.full`) of `rounds` tasks: those whose bucket differs
    from the previous full step's (a switch) and the others."""
    calls: list[tuple[str, float]] = []

    def timed(name, graph):
        def run(arrays):
            t0 = time.perf_counter()
            out = graph(arrays)
            calls.append((name, time.perf_counter() - t0))
            return out
        return run
    plain = dict(ex.graphs)
    ex.graphs.update({n: timed(n, g) for n, g in plain.items()})
    try:
        for _ in range(rounds):
            task()
    finally:
        ex.graphs.update(plain)
    switch, same, last = [], [], None
    for name, dt in calls:
        if not name.endswith(".full"):
            continue
        bucket = name.rsplit(".", 2)[-2]
        (switch if last is not None and bucket != last else same).append(dt * 1e3)
        last = bucket
    return {"after_switch": statistics.median(switch), "others": statistics.median(same),
            "switches_per_task": len(switch) / rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "compose_buckets.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    wl = get_workload("dit_mnist")
    model, example, calib = wl.build(), wl.example_inputs(), wl.calibration()
    runs, graphs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, file in PIPELINES.items():
            print(f"building {label} ({file})", flush=True)
            spec = load_pipeline(os.path.join(EXAMPLES, "pipelines", file))
            opt = pared.optimize(model, example, target=spec.target, pipeline=build_passes(spec), calibration=calib,
                                 bench_repeats=0, allow_fidelity_loss=True)
            path = opt.save(os.path.join(tmp, label))
            ex = Executor(path, threads=1)
            graphs[label] = len(opt.program.graphs)
            runs[label] = (lambda ex=ex: wl.task(ex, ex.reset))
            own = Executor(path, threads=1, shared_arena=False)
            runs[f"{label}_own_arenas"] = (lambda ex=own: wl.task(ex, ex.reset))
            if label == "4_buckets":
                executors = {"shared_arena": ex, "own_arenas": own}
                shared = Executor(path, threads=1, share_weights=True)
                runs["4_buckets_shared_weights"] = (lambda ex=shared: wl.task(ex, ex.reset))
        print(f"timing, {a.repeats} alternating rounds", flush=True)
        timing = side_by_side(runs, repeats=a.repeats, warmup=1)
        print("timing the full steps of 4_buckets", flush=True)
        steps = {k: full_steps_ms(ex, lambda ex=ex: wl.task(ex, ex.reset), a.repeats) for k, ex in executors.items()}
    med = timing["median_s"]
    out = {"what": "dit_mnist: timestep_quant 4 buckets vs 1 bucket, each then taylor_cache N=4; one DDIM-50 "
                   "batch of 10 per call, alternating, 1 thread",
           "repeats": a.repeats, "graphs": graphs, "timing": timing,
           "four_over_one": med["4_buckets"] / med["1_bucket"],
           "shared_weights_over_one": med["4_buckets_shared_weights"] / med["1_bucket"],
           "shared_weights_over_own": med["4_buckets_shared_weights"] / med["4_buckets"],
           "own_arenas_four_over_one": med["4_buckets_own_arenas"] / med["1_bucket_own_arenas"],
           "full_steps_ms_4_buckets": steps}
    print(f"4 buckets {med['4_buckets'] * 1e3:.1f} ms, 1 bucket {med['1_bucket'] * 1e3:.1f} ms: "
          f"{out['four_over_one']:.3f}x the time; 4 buckets sharing one copy of the weights "
          f"{med['4_buckets_shared_weights'] * 1e3:.1f} ms ({out['shared_weights_over_one']:.3f}x); an arena per "
          f"session: {med['4_buckets_own_arenas'] * 1e3:.1f} vs {med['1_bucket_own_arenas'] * 1e3:.1f} ms "
          f"({out['own_arenas_four_over_one']:.3f}x)", flush=True)
    for k, v in steps.items():
        print(f"4 buckets, {k}: full step after a bucket switch {v['after_switch']:.1f} ms, others "
              f"{v['others']:.1f} ms", flush=True)
    write_results(a.json, out)


if __name__ == "__main__":
    main()
