"""EfficientVLA's backbone recipe on the Meta-World VLA: layer skipping + visual-token selection,
judged in closed loop.

    MUJOCO_GL=egl OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/vla_efficient.py [--episodes 25]
        [--part all|closed_loop|timing] [--arms ...]

The diffusion policy (ViT -> 16 visual tokens; a 6-block backbone over [12 instruction tokens |
16 visual | state | readout]; 10 DDIM steps of the action head) is captured as one graph (the
shipped unrolled policy call) and lowered to ONNX Runtime (1 thread) in these arms:
  plain          the shipped plain artifact (no passes)
  skip<k>        layer_skip: the k backbone blocks of lowest I(l) = 1 - mean cos(x_l, x_l+1) on
                 1024 calibration observations (training demonstrations) become the identity
  keep<v>        token_prune after backbone block 1: the v visual tokens the instruction attends
                 to most (EfficientVLA's task relevance) go on, the others are dropped
  skip<k>_keep<v>[_div]  both (the recipe); _div: half of the kept tokens picked for diversity
                 (EfficientVLA's relevance + diversity selection)
  ..._after0     the selection after block 0 instead of 1
  skip2_keep6_div_cache2  the whole recipe on the loop-decoder program (the DDIM steps a loop of
                 the Plan): the same two passes on the encoder graph, then action_cache (every
                 attention / MLP sub-block of the head recomputed every 2nd step, EfficientVLA's
                 third part) and fuse_calls
Closed loop (6 Meta-World tasks x --episodes seeded evaluation episodes, as the workload): eager
PyTorch acts, then every arm acts in its own closed loop from the same seeds. FLOPs from
analysis.cost: the backbone (the 6 blocks), the encoder (ViT + backbone) and the whole policy call.
Timing: the first 12 policy-call observations of two held-out demonstration episodes per task
replayed through every arm and eager, alternating in rotating order each round, medians over
rounds. Writes benchmarks/results/vla_efficient.json; `--part` reruns one part and keeps the other.
`--policy all_tokens`: the same on the policy that keeps all 64 visual tokens (tokens [12, 76);
fine-tuned from the shipped one by `examples/vla_metaworld/train.py --pool 1`), its own arms
(ARMS_64: keep 16 or 8 of the 64 after block 0, with and without skipping 2 blocks), into
benchmarks/results/vla_efficient_64.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MUJOCO_GL", "egl")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import pared  # noqa: E402
from pared.analysis.cost import profile_graph, trace_flops  # noqa: E402
from pared.backends.executor import Executor  # noqa: E402
from pared.bench import write_results  # noqa: E402
from pared.ir.capture import capture  # noqa: E402
from pared.workloads import get_workload, torch_callable  # noqa: E402
from vla_speculative import _summary, say, time_replay  # noqa: E402

#: the instruction tokens, the visual tokens and the backbone blocks of the shipped policy
TEXT, VISUAL = (0, 12), (12, 28)


#: the same for policy all_tokens (examples/vla_metaworld/vla_diffusion_64.safetensors: no pooling)
VISUAL_64 = (12, 76)


def prune(keep: int, after: int = 1, diversity: bool = False, visual: tuple[int, int] = VISUAL) -> dict:
    o = {"keep": keep, "tokens": list(visual), "queries": [list(TEXT)], "after": f"backbone.blocks.{after}"}
    return {"token_prune": dict(o, score="relevance_diversity", diversity=0.5) if diversity else o}


ARMS = {
    "plain": [],
    "skip2": [{"layer_skip": {"skip": 2}}],
    "skip3": [{"layer_skip": {"skip": 3}}],
    "keep6": [prune(6)],
    "skip2_keep6": [{"layer_skip": {"skip": 2}}, prune(6)],
    "skip2_keep6_div": [{"layer_skip": {"skip": 2}}, prune(6, diversity=True)],
    "skip2_keep4_after0_div": [{"layer_skip": {"skip": 2}}, prune(4, after=0, diversity=True)],
    "keep4_after0_div": [prune(4, after=0, diversity=True)],
    "keep2_after0_div": [prune(2, after=0, diversity=True)],
    "skip4": [{"layer_skip": {"skip": 4}}],
    "skip3_keep4_after0_div": [{"layer_skip": {"skip": 3}}, prune(4, after=0, diversity=True)],
    "skip3_keep2_after0_div": [{"layer_skip": {"skip": 3}}, prune(2, after=0, diversity=True)],
}
#: arms on the loop-decoder program (the DDIM steps a loop of the Plan, so action_cache can reuse
#: the head's sub-blocks): EfficientVLA's whole recipe, its third part the action-head cache
LOOP_ARMS = {
    "skip2_keep6_div_cache2": [{"layer_skip": {"skip": 2}},
                               {"token_prune": dict(prune(6, diversity=True)["token_prune"], after="blocks.1",
                                                    graphs=["encoder"])},
                               {"action_cache": {"schedule": "interval", "interval": 2}}, "fuse_calls"],
}
ARMS.update(LOOP_ARMS)
#: every arm (the README's table is this file's arms; `--arms` reruns a few and keeps the rest)
DEFAULT = list(ARMS)
#: arms on the all-64-visual-token policy (`--policy all_tokens`, results in vla_efficient_64.json)
ARMS_64 = {
    "plain": [],
    "skip2": [{"layer_skip": {"skip": 2}}],
    "keep16_after0_div": [prune(16, after=0, diversity=True, visual=VISUAL_64)],
    "keep8_after0_div": [prune(8, after=0, diversity=True, visual=VISUAL_64)],
    "skip2_keep16_after0_div": [{"layer_skip": {"skip": 2}}, prune(16, after=0, diversity=True, visual=VISUAL_64)],
    "skip2_keep8_after0_div": [{"layer_skip": {"skip": 2}}, prune(8, after=0, diversity=True, visual=VISUAL_64)],
}


def flops_of(program, example) -> dict:
    """FLOPs of one policy call: the backbone blocks, the encoder (ViT + backbone), the whole call
    (the unrolled call's one graph, or the graphs the loop's plan ran)."""
    if len(program.graphs) == 1:
        (name,) = program.graphs
        prof = profile_graph(program.graphs[name].module, name)
        regions = {r.path: r.flops for r in prof.regions}
        backbone = sum(v for p, v in regions.items() if re.fullmatch(r"backbone\.blocks\.\d+", p))
        return {"backbone": backbone, "encoder": regions["backbone"], "policy_call": prof.total_flops}
    enc = next(g for g in program.graphs if g.startswith("encoder"))
    prof = profile_graph(program.graphs[enc].module, enc)
    runner = program.runner()
    runner([torch.as_tensor(x) for x in example])
    return {"backbone": sum(r.flops for r in prof.regions if re.fullmatch(r"blocks\.\d+", r.path)),
            "encoder": prof.total_flops, "policy_call": trace_flops(program, runner.graph_trace[-1:])}


def run_parts(a, wl, ex: dict, eager) -> dict:
    """The closed-loop and timing parts `a.part` asks for, merged into the results file's previous
    content (a partial rerun keeps the arms it does not run). Shared with vla_teal.py.

    closed loop: eager acts, then every arm in its own loop from the same seeds;
    timing: replayed policy-call observations through eager and every arm, alternating rounds."""
    previous: dict = {}
    if a.part != "all" and os.path.exists(a.json):
        with open(a.json) as f:
            previous = json.load(f)
    if a.part in ("all", "closed_loop"):
        say("closed loop: eager acting")
        ref_run = wl.run(eager)
        arms = {"eager": _summary(wl, ref_run, None)}
        for n in a.arms:
            t0 = time.perf_counter()
            run = wl.run(ex[n], ex[n].reset)
            arms[n] = _summary(wl, run, wl.fidelity(ref_run, run))
            arms[n]["success_minus_eager"] = round(arms[n]["success"] - arms["eager"]["success"], 4)
            say(f"closed loop: {n}: success {arms[n]['success']:.3f} (eager {arms['eager']['success']:.3f}), "
                f"{time.perf_counter() - t0:.0f} s")
        if a.part == "closed_loop" and previous.get("closed_loop", {}).get("episodes_per_task") == a.episodes:
            arms = {**previous["closed_loop"]["arms"], **arms}
        previous["closed_loop"] = {"episodes_per_task": a.episodes, "tasks": wl.task_names, "arms": arms}
    if a.part in ("all", "timing"):
        seqs = wl.replay_sequences(per_task=2, calls=12)
        contenders = {"eager": (eager, None), **{n: (ex[n], ex[n].reset) for n in a.arms}}
        load_before = os.getloadavg()
        per_call = time_replay(contenders, seqs, a.repeats)
        ms = {n: 1e3 * statistics.median(v) for n, v in per_call.items()}
        ref = "plain" if "plain" in ms else a.arms[0]
        timing = {n: {"policy_call_ms": round(ms[n], 3), "speedup_vs_eager": round(ms["eager"] / ms[n], 3),
                      "speedup_vs_plain": round(ms[ref] / ms[n], 3)} for n in ms}
        previous["timing"] = {"repeats": a.repeats, "replayed_calls": sum(len(q) for q in seqs),
                              "threads": a.threads, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                              "load_average_before": load_before, "load_average_after": os.getloadavg(),
                              "measured": time.strftime("%Y-%m-%d %H:%M"), "arms": timing}
        for n, t in timing.items():
            say(f"{n}: {t['policy_call_ms']:.2f} ms per call, {t['speedup_vs_plain']:.3f}x plain, "
                f"{t['speedup_vs_eager']:.3f}x eager")
    return previous


def write_parts(a, previous: dict, pipelines: dict, flops: dict, decisions: dict, **about: str) -> None:
    """Write the results file: the parts run_parts measured, this run's arms' pipelines, FLOPs and
    decisions over those of earlier runs (a partial rerun keeps the arms it did not build)."""
    previous.update({**about,
                     "pipelines": {**previous.get("pipelines", {}), **pipelines},
                     "flops": {**previous.get("flops", {}), **flops},
                     "decisions": {**previous.get("decisions", {}), **decisions}})
    write_results(a.json, previous)
    say(f"wrote {a.json}")


def main() -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--policy", choices=("base", "all_tokens"), default="base")
    policy = pre.parse_known_args()[0].policy
    arms = ARMS if policy == "base" else ARMS_64
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[pre])
    ap.add_argument("--episodes", type=int, default=25)
    ap.add_argument("--tasks", default=None, help="comma-separated tasks (default: all six)")
    ap.add_argument("--arms", nargs="*", default=DEFAULT if policy == "base" else list(ARMS_64), choices=sorted(arms))
    ap.add_argument("--repeats", type=int, default=9, help="timing rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--part", choices=("all", "closed_loop", "timing"), default="all")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "vla_efficient.json" if policy == "base"
                                                   else "vla_efficient_64.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    wl = get_workload("vla_metaworld", head="diffusion", decoder="unrolled", episodes=a.episodes, tasks=a.tasks,
                      policy=policy)
    model = wl.build()
    loop_model = get_workload("vla_metaworld", head="diffusion", decoder="loop", episodes=a.episodes,
                              tasks=a.tasks).build() if set(a.arms) & set(LOOP_ARMS) else None
    example, calib = wl.example_inputs(), wl.calibration()
    work = tempfile.mkdtemp(prefix="pared-vla-efficient-")
    ex: dict[str, Executor] = {}
    flops, decisions = {}, {}
    for name in a.arms:
        say(f"building {name}")
        opt = pared.optimize(loop_model if name in LOOP_ARMS else model, example, target="cpu", calibration=calib,
                             bench_repeats=0, holdout=[], pipeline=arms[name], allow_fidelity_loss=True)
        ex[name] = Executor(opt.save(os.path.join(work, name)), threads=a.threads)
        flops[name] = flops_of(opt.program, example)
        decisions[name] = {k: v.to_json() for k, v in opt.program.records.items()
                           if k in ("LayerSkipDecisions", "TokenPruneDecisions")}
        say(f"  FLOPs {flops[name]}")
    base = flops_of(capture(model, example), example)         # the unoptimized policy call
    for f in flops.values():
        f.update({f"{k}_ratio": round(f[k] / base[k], 4) for k in ("backbone", "encoder", "policy_call")
                  if f.get(k) and base.get(k)})
    eager = torch_callable(model)

    write_parts(a, run_parts(a, wl, ex, eager), {n: arms[n] for n in a.arms}, flops, decisions,
                what="VLA diffusion policy (unrolled policy call" + (", all 64 visual tokens" if policy != "base" else
                                                                    "") +
                     "), EfficientVLA's backbone recipe: layer_skip + token_prune; closed-loop success, FLOPs per "
                     "policy call, per-call latency (batch 1, ORT CPU)",
                calibration="1024 training-demonstration observations (layer_skip's I(l))")


if __name__ == "__main__":
    sys.exit(main())
