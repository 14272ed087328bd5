"""Activation sparsity (TEAL / WINA) on the Meta-World VLA's action-token head, judged in closed loop.

    MUJOCO_GL=egl OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/vla_teal.py [--episodes 25]
        [--part all|closed_loop|timing] [--arms ...]

The token policy (backbone -> 16 greedy action tokens from a 4-block causal head, unrolled in one
graph, batch 1) is lowered to ONNX Runtime (1 thread) in these arms:
  plain           the shipped plain artifact (no passes)
  teal<p>         sparsify_activations method teal: every linear input of the token head zeroed where
                  |x| <= the p-quantile of |x| on the calibration run (256 training observations)
  wina<p>         the same, scored |x_i| * ||W[:, i]||_2 (WINA)
  teal40_greedy   TEAL's greedy allocation: per-layer sparsities on a 0.2 grid (to 0.8) with a
                  FLOPs-weighted mean of 0.4, from each layer's measured output error on the
                  calibration run (16 layers x 4 levels = 64 replays)
Closed loop (6 Meta-World tasks x --episodes seeded evaluation episodes): eager PyTorch acts,
then every arm acts in its own closed loop from the same seeds. FLOPs of the head's linears: dense
(what ORT runs: the masks do not skip work) and ideal (what a kernel skipping the zeroed weight
columns would spend, TEAL's GEMV). Timing: the first 12 policy-call observations of two held-out
demonstration episodes per task replayed through every arm and eager, alternating in rotating
order each round, medians over rounds. Writes benchmarks/results/vla_teal.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MUJOCO_GL", "egl")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import pared  # noqa: E402
from pared.analysis.cost import profile_graph  # noqa: E402
from pared.backends.executor import Executor  # noqa: E402
from pared.ir.capture import capture  # noqa: E402
from pared.workloads import get_workload, torch_callable  # noqa: E402
from vla_efficient import run_parts, write_parts  # noqa: E402
from vla_speculative import say  # noqa: E402

HEAD = ["head.blocks.**"]


def teal(p: float, method: str = "teal", allocation: str = "uniform") -> list:
    o = {"sparsity": p, "method": method, "layers": HEAD, "allocation": allocation}
    return [{"sparsify_activations": dict(o, step=0.2, max_sparsity=0.8) if allocation == "greedy" else o}]


ARMS = {"plain": [], "teal25": teal(0.25), "teal40": teal(0.4), "teal50": teal(0.5), "wina40": teal(0.4, "wina"),
        "wina50": teal(0.5, "wina"), "teal40_greedy": teal(0.4, allocation="greedy")}
DEFAULT = list(ARMS)


def head_flops(program) -> int:
    (name,) = program.graphs
    return sum(r.flops for r in profile_graph(program.graphs[name].module, name).regions
               if r.path.startswith("head.blocks.") and r.path.count(".") == 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=25)
    ap.add_argument("--tasks", default=None, help="comma-separated tasks (default: all six)")
    ap.add_argument("--arms", nargs="*", default=DEFAULT, choices=sorted(ARMS))
    ap.add_argument("--repeats", type=int, default=7, help="timing rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calibration", type=int, default=256, help="calibration observations")
    ap.add_argument("--part", choices=("all", "closed_loop", "timing"), default="all")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "vla_teal.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    wl = get_workload("vla_metaworld", head="tokens", decoder="unrolled", episodes=a.episodes, tasks=a.tasks,
                      calibration_steps=a.calibration)
    model = wl.build()
    example, calib = wl.example_inputs(), wl.calibration()
    work = tempfile.mkdtemp(prefix="pared-vla-teal-")
    ex: dict[str, Executor] = {}
    flops, decisions = {}, {}
    for name in a.arms:
        say(f"building {name}")
        opt = pared.optimize(model, example, target="cpu", calibration=calib, bench_repeats=0, holdout=[],
                             pipeline=ARMS[name], allow_fidelity_loss=True)
        ex[name] = Executor(opt.save(os.path.join(work, name)), threads=a.threads)
        rec = opt.program.records.get("ActivationSparsityDecisions")
        dense = head_flops(opt.program)
        linears = sum(x.flops for x in rec.layers) if rec else None
        flops[name] = {"head_graph": dense, "head_linears_dense": linears,
                       "head_linears_ideal": sum(x.ideal_flops for x in rec.layers) if rec else None}
        decisions[name] = None if rec is None else {
            "method": rec.method, "sparsity": rec.sparsity, "lowering": rec.lowering, "layers": len(rec.layers),
            "allocation": rec.allocation, "per_layer": {x.layer: x.calibrated_sparsity for x in rec.layers},
            "ideal_flops_ratio": round(rec.ideal_flops_ratio, 4),
            "thresholds_median": round(statistics.median(x.threshold for x in rec.layers), 5)}
        say(f"  {flops[name]}")
    base = head_flops(capture(model, example))             # the unmasked head, whichever arms ran
    for f in flops.values():
        if base:
            f["head_graph_ratio"] = round(f["head_graph"] / base, 4)
        if f["head_linears_ideal"]:
            f["head_ideal_ratio"] = round((base - f["head_linears_dense"] + f["head_linears_ideal"]) / base, 4)
    eager = torch_callable(model)

    write_parts(a, run_parts(a, wl, ex, eager), {n: ARMS[n] for n in a.arms}, flops, decisions,
                what="VLA action-token head (16 greedy tokens unrolled, batch 1), sparsify_activations (TEAL / "
                     "WINA masks on the head's linear inputs): closed-loop success, head FLOPs dense vs ideal, "
                     "per-call latency (ORT CPU)",
                calibration=f"{a.calibration} training-demonstration observations")

if __name__ == "__main__":
    sys.exit(main())
