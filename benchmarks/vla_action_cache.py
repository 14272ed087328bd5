"""Action-head caching on the Meta-World VLA's diffusion head, judged in closed loop.

    MUJOCO_GL=egl OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/vla_action_cache.py [--episodes 25]
        [--policy large]

The diffusion policy (backbone + 10 DDIM steps of a 3-block DiT head -> 8 actions, 4 executed)
is built as a pared Denoiser (the steps a steps loop of the Plan) and lowered to ONNX Runtime
(1 thread) in several arms:
  plain_unrolled   the shipped plain artifact: the 10 steps unrolled in one graph
  plain_loop       the same, the steps as a loop of the Plan (what action_cache rewrites)
  interval<N>      action_cache schedule=interval: every attention/MLP sub-block of the head
                   recomputed every N steps, its output reused in between (EfficientVLA)
  bac<M>           action_cache schedule=bac: per sub-block, M update steps picked by BAC's
                   dynamic program over the step-to-step cosine similarity of its output on 64
                   calibration observations (training demonstrations), then Bubbling Union
  bac<M>_nobubble  the same without Bubbling Union
  bac<M>_g2[...]   grouped BAC: the sub-blocks share update steps in 2 groups (merged by the
                   similarity a shared schedule loses), so each call switches among few variants
  bac<M>_g1        one group: every sub-block updates at the same M steps (one reuse variant)
  <arm>_nonarrow   the ablation of action_cache's narrowing (narrow: false): each variant's adaLN
                   linears computed whole, a reused sub-block's shift and scale included
  <arm>_fused      the same pipeline then fuse_calls: the head (variant) and the DDIM update run
                   as one graph per step (11 ORT calls per policy call instead of 22)
  <arm>_shared     the same artifact loaded with share_weights=True: every head variant reads one
                   copy of the weights (ORT's per-session prepacked copies off)

Closed loop (6 Meta-World tasks x --episodes seeded evaluation episodes, as the workload): eager
PyTorch acts, then every arm acts in its own closed loop from the same seeds (diffusion noise from
the same per-episode generator). Success, episode length and agreement with eager are reported.

Timing: the first 12 policy-call observations (every 4th step) of two held-out demonstration
episodes per task are replayed through every arm, arms alternating in rotating order each round;
medians over rounds. `--policy large` runs the same on the larger head (4 blocks of width 256,
examples/vla_metaworld/train_large_head.py) and writes vla_action_cache_large.json. Per call: the whole policy call, and the head's share (every graph but the
encoder, timed around each ORT call; eager: the call minus the backbone alone). Head FLOPs per
call from the graphs the plan ran. Writes benchmarks/results/vla_action_cache.json; `--part`
reruns one part and keeps the other's section.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MUJOCO_GL", "egl")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pared  # noqa: E402
from pared.analysis.cost import trace_flops  # noqa: E402
from pared.backends.executor import Executor  # noqa: E402
from pared.bench import write_results  # noqa: E402
from pared.workloads import get_workload, torch_callable  # noqa: E402
from vla_speculative import _summary, say, time_replay  # noqa: E402

ARMS = {"interval2": {"schedule": "interval", "interval": 2},
        "interval3": {"schedule": "interval", "interval": 3},
        "bac5": {"schedule": "bac", "updates": 5},
        "bac4": {"schedule": "bac", "updates": 4},
        "bac3": {"schedule": "bac", "updates": 3},
        "bac3_nobubble": {"schedule": "bac", "updates": 3, "bubble": 0.0},
        "bac2": {"schedule": "bac", "updates": 2},
        # grouped BAC: the sub-blocks share update steps in 2 groups, so a call switches among few variants
        "bac4_g2": {"schedule": "bac", "updates": 4, "groups": 2},
        "bac4_g2_nobubble": {"schedule": "bac", "updates": 4, "groups": 2, "bubble": 0.0},
        "bac3_g2": {"schedule": "bac", "updates": 3, "groups": 2},
        "bac3_g1": {"schedule": "bac", "updates": 3, "groups": 1},     # one schedule for every sub-block
        # ablation: the variants' adaLN linears computed whole (a reused sub-block's shift and scale too)
        "bac3_g2_nonarrow": {"schedule": "bac", "updates": 3, "groups": 2, "narrow": False},
        "interval5": {"schedule": "interval", "interval": 5}}
#: arms whose pipeline ends with fuse_calls (the head and the DDIM update one graph per step)
FUSED = ["plain_loop_fused", "interval2_fused", "bac4_fused", "bac3_fused", "bac2_fused", "bac3_g2_fused",
         "bac3_g1_fused", "bac3_g2_nonarrow_fused"]
#: arms whose artifact is loaded with share_weights=True: the variants read one copy of the weights
#: (ORT prepacking off) instead of a prepacked copy per variant session
SHARED = ["plain_loop_shared", "interval2_shared", "bac4_shared", "bac3_shared"]
DEFAULT = list(ARMS) + FUSED + SHARED


def pipeline(name: str) -> list:
    name = name[:-len("_shared")] if name.endswith("_shared") else name
    base = name[:-len("_fused")] if name.endswith("_fused") else name
    steps = [] if base == "plain_loop" else [{"action_cache": ARMS[base]}]
    return steps + (["fuse_calls"] if name.endswith("_fused") else [])


class Timed:
    """A graph runtime that adds its time to `acc[key]`."""

    def __init__(self, fn, acc: dict, key: str):
        self.fn, self.acc, self.key = fn, acc, key

    def __call__(self, arrays):
        t0 = time.perf_counter()
        out = self.fn(arrays)
        self.acc[self.key] += time.perf_counter() - t0
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=25)
    ap.add_argument("--tasks", default=None, help="comma-separated tasks (default: all six)")
    ap.add_argument("--arms", nargs="*", default=DEFAULT, choices=sorted(DEFAULT))
    ap.add_argument("--repeats", type=int, default=7, help="timing rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--part", choices=("all", "closed_loop", "timing", "graphs"), default="all",
                    help="graphs: per-graph time of each arm's ORT calls, one arm at a time (not in 'all')")
    ap.add_argument("--policy", choices=("base", "large"), default="base",
                    help="the shipped head, or the larger one (train_large_head.py)")
    ap.add_argument("--json", default=None, help="default: results/vla_action_cache[_large].json")
    a = ap.parse_args()
    a.json = a.json or os.path.join(HERE, "results", "vla_action_cache" + ("_large" if a.policy == "large" else "")
                                    + ".json")
    torch.set_num_threads(a.threads)
    opts = dict(head="diffusion", episodes=a.episodes, tasks=a.tasks, policy=a.policy)
    wl = get_workload("vla_metaworld", decoder="loop", **opts)
    model = wl.build()
    example, calib = wl.example_inputs(), wl.calibration()
    work = tempfile.mkdtemp(prefix="pared-action-cache-")
    ex: dict[str, Executor] = {}
    programs, records = {}, {}
    for name in ["plain_loop", *a.arms]:
        say(f"building {name}")
        opt = pared.optimize(model, example, target="cpu", calibration=calib, bench_repeats=0, holdout=[],
                             pipeline=pipeline(name), allow_fidelity_loss=True)
        ex[name] = Executor(opt.save(os.path.join(work, name)), threads=a.threads,
                            share_weights=name.endswith("_shared"))
        programs[name] = opt.program
        rec = opt.program.records.get("ActionCachePlan", graph="head")
        records[name] = None if rec is None else dict(rec.to_json())
    say("building plain_unrolled")
    unrolled = get_workload("vla_metaworld", decoder="unrolled", **opts).build()
    opt = pared.optimize(unrolled, example, target="cpu", pipeline=[], bench_repeats=0, holdout=[])
    ex["plain_unrolled"] = Executor(opt.save(os.path.join(work, "plain_unrolled")), threads=a.threads)
    eager = torch_callable(model)
    backbone = torch_callable(model.encoder)

    # head FLOPs per policy call: the graphs each arm's plan runs, but the encoder
    flops = {}
    for name, prog in programs.items():
        runner = prog.runner()
        runner([torch.as_tensor(x) for x in example])
        flops[name] = trace_flops(prog, [tuple(g for g in runner.graph_trace[-1] if not g.startswith("encoder"))])

    previous: dict = {}
    if a.part != "all" and os.path.exists(a.json):
        with open(a.json) as f:
            previous = json.load(f)
    if a.part in ("all", "closed_loop"):
        loop = _closed_loop(a, wl, ex, eager, ["plain_unrolled", "plain_loop", *a.arms])
        if a.part == "closed_loop" and "closed_loop" in previous:     # arms run before are kept
            loop["arms"] = {**previous["closed_loop"]["arms"], **loop["arms"]}
        previous["closed_loop"] = loop
    if a.part == "graphs":
        previous["graphs"] = _graphs(a, wl, ex, ["plain_loop", *a.arms], records)
    if a.part in ("all", "timing"):
        timing = _timing(a, wl, ex, eager, backbone, ["plain_unrolled", "plain_loop", *a.arms], flops)
        if a.part == "timing" and "timing" in previous:      # arms timed before are kept (their ratios are
            timing["arms"] = {**previous["timing"]["arms"], **timing["arms"]}   # to their own run's plain arms)
            timing["runs"] = previous["timing"].get("runs", 1) + 1
        previous["timing"] = timing
    previous.update({
        "policy": a.policy,
        "what": "VLA diffusion head (10 DDIM steps per policy call), action_cache: closed-loop success "
                "(closed_loop), per-call and head latency and head FLOPs (timing: batch 1, ORT CPU, 1 thread), "
                "beside eager", "calibration": "64 of 1024 training-demonstration observations",
        "decisions": {**previous.get("decisions", {}), **records}})
    write_results(a.json, previous)
    for n, r in previous.get("closed_loop", {}).get("arms", {}).items():
        t = previous.get("timing", {}).get("arms", {}).get(n, {})
        print(f"{n:16s} success {r.get('success', float('nan')):.3f}  call {t.get('policy_call_ms', 0):6.3f} ms  "
              f"head {t.get('head_ms', 0):6.3f} ms  head x{t.get('head_speedup_vs_plain_loop', 0):.2f} vs plain loop  "
              f"head FLOPs x{t.get('head_flops_ratio_vs_plain', 0):.2f}")


def _closed_loop(a, wl, ex, eager, arms) -> dict:
    say("closed loop: eager acting")
    t0 = time.perf_counter()
    ref_run = wl.run(eager)
    say(f"  took {time.perf_counter() - t0:.0f} s")
    results = {"eager": _summary(wl, ref_run, None)}
    for n in arms:
        say(f"closed loop: {n} acting")
        t0 = time.perf_counter()
        run = wl.run(ex[n], ex[n].reset)
        say(f"  took {time.perf_counter() - t0:.0f} s")
        results[n] = _summary(wl, run, wl.fidelity(ref_run, run))
        results[n]["success_minus_eager"] = round(results[n]["success"] - results["eager"]["success"], 4)
    return {"episodes_per_task": a.episodes, "tasks": wl.task_names, "arms": results}


def _graphs(a, wl, ex, arms, records) -> dict:
    """Per graph of each arm: calls per policy call and median microseconds per call, each arm
    replaying the same observations alone (a graph's time among its arm's other graphs)."""
    seqs = wl.replay_sequences(per_task=2, calls=12)
    out = {}
    for n in arms:
        times: dict[str, list[float]] = {g: [] for g in ex[n].graphs}

        def timed(fn, g):
            def run(arrays):
                t0 = time.perf_counter()
                res = fn(arrays)
                times[g].append(time.perf_counter() - t0)
                return res
            return run
        ex[n].graphs.update({g: timed(fn, g) for g, fn in list(ex[n].graphs.items())})
        calls = 0
        for r in range(a.repeats + 1):
            if r == 1:                                   # round 0 warms up
                times = {g: [] for g in times}
                calls = 0
            for seq in seqs:
                ex[n].reset()
                for args in seq:
                    ex[n](*args)
                    calls += 1
        variants = dict((records.get(n) or {}).get("variants", ()))
        out[n] = {g: {"calls_per_policy_call": round(len(v) / calls, 3), "us_per_call": round(1e6 * statistics.median(v), 1),
                      "reused_sub_blocks": len(variants.get(g.split(".")[-1], ()))}
                  for g, v in times.items() if v}
        say(f"{n}: " + ", ".join(f"{g} {d['us_per_call']:.0f} us" for g, d in out[n].items()))
    return {"repeats": a.repeats, "measured": time.strftime("%Y-%m-%d %H:%M"), "load_average": os.getloadavg(),
            "arms": out}


def _timing(a, wl, ex, eager, backbone, arms, flops) -> dict:
    seqs = wl.replay_sequences(per_task=2, calls=12)
    head_s = {n: 0.0 for n in arms}
    for n in arms:
        if n == "plain_unrolled":
            continue
        for g in list(ex[n].graphs):
            if not g.startswith("encoder"):
                ex[n].graphs[g] = Timed(ex[n].graphs[g], head_s, n)
    contenders = {"eager": (eager, None), "eager_backbone": (lambda *x: backbone(*x[:-1]), None),
                  **{n: (ex[n], ex[n].reset) for n in arms}}
    per_head: dict[str, list[float]] = {n: [] for n in arms if n != "plain_unrolled"}
    n_calls = sum(len(q) for q in seqs)

    def after(n, r):                              # the head time of this contender's round
        if n in per_head and r:
            per_head[n].append(head_s[n] / n_calls)
        if n in head_s:
            head_s[n] = 0.0
    load_before = os.getloadavg()
    per_call = time_replay(contenders, seqs, a.repeats, after)
    ms = {n: 1e3 * statistics.median(v) for n, v in per_call.items()}
    head_ms = {n: 1e3 * statistics.median(v) for n, v in per_head.items()}
    head_ms["eager"] = ms["eager"] - ms["eager_backbone"]
    out = {"eager": {"policy_call_ms": round(ms["eager"], 3), "head_ms": round(head_ms["eager"], 3),
                     "backbone_ms": round(ms["eager_backbone"], 3)}}
    for n in arms:
        t = {"policy_call_ms": round(ms[n], 3), "speedup_vs_eager": round(ms["eager"] / ms[n], 3),
             "speedup_vs_plain_loop": round(ms["plain_loop"] / ms[n], 3),
             "speedup_vs_plain_unrolled": round(ms["plain_unrolled"] / ms[n], 3)}
        if n != "plain_unrolled":
            t.update({"head_ms": round(head_ms[n], 3),
                      "head_speedup_vs_plain_loop": round(head_ms["plain_loop"] / head_ms[n], 3),
                      "head_speedup_vs_eager": round(head_ms["eager"] / head_ms[n], 3),
                      "head_mflops": round(flops[n] / 1e6, 2),
                      "head_flops_ratio_vs_plain": round(flops["plain_loop"] / flops[n], 3)})
        out[n] = t
    return {"repeats": a.repeats, "replayed_calls": n_calls, "threads": a.threads,
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "load_average_before": load_before,
            "load_average_after": os.getloadavg(), "measured": time.strftime("%Y-%m-%d %H:%M"), "arms": out}


if __name__ == "__main__":
    sys.exit(main())
