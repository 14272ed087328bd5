"""Speculative decoding of the Meta-World VLA's action tokens, judged in closed loop.

    MUJOCO_GL=egl OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/vla_speculative.py [--episodes 25]

The token-head policy (backbone + 16 greedy action tokens -> 4 actions) is built as a pared
Decoder and lowered to ONNX Runtime (1 thread) in several arms:
  plain_unrolled   the shipped plain artifact: greedy decoding unrolled in one graph
  plain_loop       the same, decoding as a loop of the Plan (what speculative_decode rewrites)
  exact_<drafter>  speculative_decode, radius 0 (lossless): drafter none (Jacobi decoding),
                   retrieval (HeiSD: nearest calibration observation's tokens), kalman (KERV),
                   distilled (a parallel draft head trained on the calibration tokens), hybrid
                   (HeiSD's kinematic switch: distilled below the median calibration end-effector
                   speed, retrieval above it)
  <arm>_fused      the same pipeline then fuse_calls (the head and the pick / accept one graph)
  lossy arms       (--lossy, see LOSSY) r<k>_*: draft tokens within k bins of the head's argmax;
                   kerv<k>_kalman: at most k head calls, the Kalman draft completing the chunk;
                   skip<q>_*: no head call for retrievals nearer than the table's q-quantile;
                   seq<d>_*: a whole draft accepted when its tokens are within a mean of d bins of
                   the head's argmax (HeiSD's sequence-wise relaxed acceptance)
  composed         (--lossy composed) token_reuse (VLA-Cache on the backbone's 16 pooled visual
                   tokens), speculative_decode (retrieval, exact) and dynamic_precision ([8, 4]
                   bits by the hand's speed) on one artifact; exact acceptance reproduces the int8
                   head's greedy tokens, not eager's, so it acts in its own closed loop
  exact_denoiser / r2_denoiser  the diffusion head of the same backbone drafts (10 DDIM steps from a
                   fixed noise, its first 4 actions binned); r2_denoiser_bac adds action_cache (BAC, 4
                   updates) on the drafting head; *_denoiser4: a 4-step DDIM schedule of the same head
  four_composed    (--lossy four_composed) token_reuse, r2_denoiser's speculative_decode, action_cache on
                   the drafting head and dynamic_precision on one artifact; four_composed_4 the same
                   with the 4-step drafter and BAC at 2 of its 4 steps (the pipeline file
                   examples/pipelines/vla_four_composed.yaml is four_composed_4 with exact acceptance)
  composed_dq_first (--lossy composed_dq_first) the same three with dynamic_precision before
                   speculative_decode: the draft graph stays float and each call verifies at the
                   width its greedy decoding takes

Closed loop (6 Meta-World tasks x --episodes seeded evaluation episodes, as the workload): eager
PyTorch's greedy policy acts; every lossless arm shadows it, called on the same observation at
every policy call (each episode one request), and its chunk is compared with eager's. Equal
chunks at every call mean equal trajectories, so a lossless arm's success is eager's; the count
of unequal chunks is reported (0 is the claim). Each relaxed arm acts in its own closed loop.
Calibration (the retrieval table) uses training demonstration episodes only.

Timing: the first 12 policy-call observations (every 4th step) of two held-out demonstration
episodes per task are replayed through every arm (reset per episode, so a Kalman drafter sees
its history), arms alternating in rotating order each round; medians over rounds of the per-call
time. Eager is timed the same way. Run it on a quiet machine (the load average is recorded);
`--part timing` reruns the timing alone and keeps the closed-loop section, `--part closed_loop`
the other way round. Writes benchmarks/results/vla_speculative.json.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pared  # noqa: E402
from pared.backends.executor import Executor  # noqa: E402
from pared.bench import write_results  # noqa: E402
from pared.workloads import get_workload, torch_callable  # noqa: E402

#: HeiSD's kinematic switch: Meta-World's state holds the hand position [0:3] and its copy one tick
#: earlier [18:21]; below the median calibration speed the distilled drafter, above it retrieval
HYBRID = {"drafter": "hybrid", "hybrid": ["distilled", "retrieval"], "motion_input": "state",
          "position": [0, 1, 2], "previous": [18, 19, 20]}
#: the diffusion head of the same backbone as the drafter (its first 4 actions binned)
DENOISER = {"drafter": "denoiser",
            "draft_model": os.path.join(HERE, "..", "examples", "vla_metaworld", "decoder.py") + ":draft_denoiser"}
DYQ = {"dynamic_precision": {"bits": [8, 4], "input": "state", "position": [0, 1, 2], "previous": [18, 19, 20],
                             "gripper": [3, 21]}}
DENOISER4 = dict(DENOISER, draft_model=DENOISER["draft_model"] + "_4")     # a 4-step DDIM schedule of it
LOSSLESS = {"exact_none": {"drafter": "none"},
            "exact_denoiser": DENOISER,
            "exact_denoiser4": DENOISER4,
            "exact_retrieval": {"drafter": "retrieval"},
            "exact_kalman": {"drafter": "kalman", "action_dim": 4},
            "exact_distilled": {"drafter": "distilled"},
            "exact_hybrid": HYBRID,
            "exact_hybrid_rev": dict(HYBRID, hybrid=["retrieval", "distilled"]),   # the other way round
            # then fuse_calls: the head and the pick / accept one graph per iteration
            "plain_loop_fused": {"fuse": True},
            "exact_retrieval_fused": {"drafter": "retrieval", "fuse": True}}
#: lossy arms (--lossy NAME ...): relaxed acceptance (Spec-VLA), capped verification with the Kalman
#: draft completing the chunk (KERV), verify-skip for near retrievals (HeiSD)
LOSSY = {"r2_retrieval": {"drafter": "retrieval", "radius": 2},
         "r5_retrieval": {"drafter": "retrieval", "radius": 5},
         "r2_kalman": {"drafter": "kalman", "action_dim": 4, "radius": 2},
         "kerv1_kalman": {"drafter": "kalman", "action_dim": 4, "refill": "draft", "max_verify": 1},
         "kerv2_kalman": {"drafter": "kalman", "action_dim": 4, "refill": "draft", "max_verify": 2},
         "skip25_retrieval": {"drafter": "retrieval", "skip_verify": 0.25},
         "skip50_r2_retrieval": {"drafter": "retrieval", "radius": 2, "skip_verify": 0.5},
         # HeiSD's sequence-wise relaxed acceptance: a whole draft within a mean of d bins of the head's argmax
         "seq1_retrieval": {"drafter": "retrieval", "sequence": 1.0},
         # issue 16's methods of the token policy on one artifact: VLA-Cache over the backbone's 16
         # pooled visual tokens (16 px patches), lossless retrieval drafting, DyQ-VLA's [8, 4] bits
         "composed": {"pipeline": [
             {"token_reuse": {"tokens": [12, 28], "patch": 16, "input": "image", "blocks": "blocks.*"}},
             {"speculative_decode": {"drafter": "retrieval"}},
             {"dynamic_precision": {"bits": [8, 4], "input": "state", "position": [0, 1, 2],
                                    "previous": [18, 19, 20], "gripper": [3, 21]}}]},
         # the same three with dynamic_precision before speculative_decode: the retrieval draft stays
         # float, its table holds the int8 head's own greedy tokens, and each call verifies through
         # the motion select at the width greedy decoding would take
         "composed_dq_first": {"pipeline": [
             {"token_reuse": {"tokens": [12, 28], "patch": 16, "input": "image", "blocks": "blocks.*"}},
             {"dynamic_precision": {"bits": [8, 4], "input": "state", "position": [0, 1, 2],
                                    "previous": [18, 19, 20], "gripper": [3, 21]}},
             {"speculative_decode": {"drafter": "retrieval"}}]},
         "r2_denoiser": dict(DENOISER, radius=2),
         "r2_denoiser_bac": {"pipeline": [{"speculative_decode": dict(DENOISER, radius=2)},
                                          {"action_cache": {"schedule": "bac", "updates": 4}}]},
         # all four of issue 16's methods on one artifact: VLA-Cache on the backbone, the diffusion head
         # drafting for the token head (radius 2), BAC on the drafting head, DyQ-VLA's [8, 4] bits over
         # every linear
         "four_composed": {"pipeline": [
             {"token_reuse": {"tokens": [12, 28], "patch": 16, "input": "image", "blocks": "blocks.*"}},
             {"speculative_decode": dict(DENOISER, radius=2)},
             {"action_cache": {"schedule": "bac", "updates": 4}},
             DYQ]},
         "r2_denoiser4": dict(DENOISER4, radius=2),
         "four_composed_4": {"pipeline": [
             {"token_reuse": {"tokens": [12, 28], "patch": 16, "input": "image", "blocks": "blocks.*"}},
             {"speculative_decode": dict(DENOISER4, radius=2)},
             {"action_cache": {"schedule": "bac", "updates": 2}},
             DYQ]},
         "seq2_retrieval": {"drafter": "retrieval", "sequence": 2.0},
         "skip25_seq1_retrieval": {"drafter": "retrieval", "sequence": 1.0, "skip_verify": 0.25},
         "seq1_hybrid": dict(HYBRID, sequence=1.0)}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def heads(ex: Executor) -> int:
    """Head calls of the executor's last policy call (a fused head+..., a precision variant head.a<b>)."""
    return sum(g == "head" or g.startswith(("head+", "head.")) for g in ex.graph_trace[-1])


def pipeline_of(o: dict | None) -> list:
    o = dict(o or {})
    if "pipeline" in o:
        return list(o["pipeline"])
    fuse = o.pop("fuse", False)
    return ([{"speculative_decode": o}] if o else []) + (["fuse_calls"] if fuse else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=25)
    ap.add_argument("--tasks", default=None, help="comma-separated tasks (default: all six)")
    ap.add_argument("--lossless", nargs="*", default=list(LOSSLESS), choices=sorted(LOSSLESS),
                    help="lossless arms, shadowing eager's closed loop")
    ap.add_argument("--lossy", nargs="*", default=["r2_retrieval", "r5_retrieval", "r2_kalman", "kerv1_kalman",
                                                   "kerv2_kalman", "skip25_retrieval"], choices=sorted(LOSSY),
                    help="lossy arms, each acting in its own closed loop")
    ap.add_argument("--repeats", type=int, default=7, help="timing rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--part", choices=("all", "closed_loop", "timing"), default="all",
                    help="run one part; the other's section of --json is kept as it is (closed_loop: so are the "
                         "arms it does not run)")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "vla_speculative.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    opts = dict(head="tokens", episodes=a.episodes, tasks=a.tasks)
    wl = get_workload("vla_metaworld", decoder="loop", **opts)
    model = wl.build()
    example, calib = wl.example_inputs(), wl.calibration()
    holdout = [tuple(torch.from_numpy(x) for x in wl._demo_inputs(int(i))) for i in wl.heldout_steps(9)[1:]]
    relaxed = {n: LOSSY[n] for n in a.lossy}
    lossless = {n: LOSSLESS[n] for n in a.lossless}
    arms = {"plain_loop": None, **lossless, **relaxed}
    work = tempfile.mkdtemp(prefix="pared-spec-")
    ex: dict[str, Executor] = {}
    records = {}
    for name, o in arms.items():
        say(f"building {name}")
        opt = pared.optimize(model, example, target="cpu", calibration=calib, bench_repeats=0,
                             pipeline=pipeline_of(o), allow_fidelity_loss=True, holdout=holdout)
        ex[name] = Executor(opt.save(os.path.join(work, name)), threads=a.threads)
        rec = opt.program.records.get("SpeculativePlan")
        records[name] = None if rec is None else dict(rec.to_json())
        dq = opt.program.records.get("DynamicPrecisionDecisions")
        if dq is not None:          # the composed arm: its memory against fp32 (int8 weights)
            records[name] = dict(records[name] or {}, memory_ratio=round(dq.memory_ratio(), 4))
    say("building plain_unrolled")
    unrolled_wl = get_workload("vla_metaworld", decoder="unrolled", **opts)
    opt = pared.optimize(unrolled_wl.build(), example, target="cpu", pipeline=[], bench_repeats=0)
    ex["plain_unrolled"] = Executor(opt.save(os.path.join(work, "plain_unrolled")), threads=a.threads)
    eager = torch_callable(model)

    previous: dict = {}
    if a.part != "all" and os.path.exists(a.json):
        with open(a.json) as f:
            previous = json.load(f)
    if a.part in ("all", "closed_loop"):
        loop = _closed_loop(a, wl, ex, eager, lossless, relaxed, model.n_tokens)
        if a.part == "closed_loop" and "closed_loop" in previous:     # arms run before are kept
            loop["arms"] = {**previous["closed_loop"]["arms"], **loop["arms"]}
        previous["closed_loop"] = loop
    # -- timing: replayed demonstration episodes, arms alternating --------------------------------
    if a.part in ("all", "timing"):
        seqs = wl.replay_sequences(per_task=2, calls=12)
        contenders = {"eager": (eager, None), **{n: (ex[n], ex[n].reset) for n in ["plain_unrolled", *arms]}}
        names = list(contenders)
        load_before = os.getloadavg()
        per_call = time_replay(contenders, seqs, a.repeats)
        n_calls = sum(len(q) for q in seqs)
        ms = {n: 1e3 * statistics.median(v) for n, v in per_call.items()}
        n_tok = model.n_tokens
        timing = {}
        for n in names:
            t = {"policy_call_ms": round(ms[n], 3), "tokens_per_s": round(n_tok / ms[n] * 1e3, 1),
                 "speedup_vs_eager": round(ms["eager"] / ms[n], 3),
                 "speedup_vs_plain_loop": round(ms["plain_loop"] / ms[n], 3),
                 "speedup_vs_plain_unrolled": round(ms["plain_unrolled"] / ms[n], 3)}
            timing[n] = t
        previous["timing"] = {"repeats": a.repeats, "replayed_calls": n_calls, "threads": a.threads,
                              "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                              "load_average_before": load_before, "load_average_after": os.getloadavg(),
                              "measured": time.strftime("%Y-%m-%d %H:%M"), "arms": timing}

    previous.update({
        "what": "VLA token head (16 action tokens per policy call), speculative decoding: closed-loop success and "
                "head calls (closed_loop), per-call latency (timing: batch 1, ORT CPU, 1 thread), beside eager "
                "greedy decoding", "calibration_steps": wl.calibration_steps,
        "decisions": {**previous.get("decisions", {}), **records}})
    write_results(a.json, previous)
    for n, r in previous.get("closed_loop", {}).get("arms", {}).items():
        t = previous.get("timing", {}).get("arms", {}).get(n, {})
        print(f"{n:18s} success {r.get('success', float('nan')):.3f}  heads/call "
              f"{r.get('head_calls_per_policy_call', 0):5.2f}  {t.get('policy_call_ms', 0):7.3f} ms  "
              f"x{t.get('speedup_vs_plain_loop', 0):.2f} vs plain loop  x{t.get('speedup_vs_eager', 0):.2f} vs eager")


def time_replay(contenders: dict, seqs: list, repeats: int, after=None) -> dict[str, list[float]]:
    """Seconds per policy call of each contender, one value per round: every contender runs every
    replayed sequence (reset before each) in each round, in an order rotated by one per round;
    round 0 warms up and is dropped. `after(name, round)` is called after each contender's round.

    Args:
        contenders: name -> (callable, reset or None).
    """
    names = list(contenders)
    n_calls = sum(len(q) for q in seqs)
    say(f"timing: {n_calls} replayed policy calls x {len(names)} contenders x {repeats} rounds "
        f"(load {os.getloadavg()[0]:.2f})")
    per_call: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats + 1):
        for n in names[r % len(names):] + names[: r % len(names)]:
            fn, rst = contenders[n]
            dt = 0.0
            for seq in seqs:
                if rst is not None:
                    rst()
                for args in seq:
                    t0 = time.perf_counter()
                    fn(*args)
                    dt += time.perf_counter() - t0
            if r:
                per_call[n].append(dt / n_calls)
            if after is not None:
                after(n, r)
    return per_call


def _closed_loop(a, wl, ex, eager, lossless, relaxed, n_tok) -> dict:
    shadow_names = ["plain_unrolled", "plain_loop", *lossless]
    shadow = {n: {"unequal_chunks": 0, "calls": 0, "head_calls": 0} for n in shadow_names}

    def reset():
        for n in shadow_names:
            ex[n].reset()

    def acting(*args):
        ref = np.asarray(eager(*args))
        for n in shadow_names:
            got = np.asarray(ex[n](*args))
            s = shadow[n]
            s["calls"] += 1
            s["unequal_chunks"] += int(not np.array_equal(got, ref))
            s["head_calls"] += heads(ex[n]) if n != "plain_unrolled" else 16
        return ref

    say(f"closed loop: eager acting, {len(shadow_names)} lossless arms shadowing")
    t0 = time.perf_counter()
    ref_run = wl.run(acting, reset)
    say(f"  took {time.perf_counter() - t0:.0f} s")
    results: dict = {"eager": dict(_summary(wl, ref_run, None), head_calls_per_policy_call=float(n_tok))}
    for n in shadow_names:
        s = shadow[n]
        results[n] = dict(results["eager"], **{
            "success_from": "eager's closed loop (every chunk equal)" if s["unequal_chunks"] == 0 else
                            "NOT VALID: chunks differ from eager's",
            "unequal_chunks": s["unequal_chunks"], "policy_calls_checked": s["calls"],
            "head_calls_per_policy_call": s["head_calls"] / max(s["calls"], 1)})

    # -- closed loop: each relaxed arm acts ------------------------------------------------------
    for n in relaxed:
        counts = {"calls": 0, "heads": 0}

        ran: dict[str, int] = {}

        def act(*args, n=n, counts=counts, ran=ran):
            out = ex[n](*args)
            counts["calls"] += 1
            counts["heads"] += heads(ex[n])
            for g in ex[n].graph_trace[-1]:
                if g.startswith(("encoder", "head")):
                    ran[g] = ran.get(g, 0) + 1
            return out
        say(f"closed loop: {n} acting")
        t0 = time.perf_counter()
        run = wl.run(act, ex[n].reset)
        say(f"  took {time.perf_counter() - t0:.0f} s")
        fid = wl.fidelity(ref_run, run)
        results[n] = dict(_summary(wl, run, fid), head_calls_per_policy_call=counts["heads"] / max(counts["calls"], 1),
                          encoder_variant_shares={g: round(c / max(counts["calls"], 1), 4)
                                                  for g, c in sorted(ran.items())
                                                  if g.startswith("encoder") and g != "encoder.probe"})
    for r in results.values():
        r["tokens_per_head_call"] = round(n_tok / r["head_calls_per_policy_call"], 3)
    return {"episodes_per_task": a.episodes, "tasks": wl.task_names, "arms": results}


def _summary(wl, run, fid) -> dict:
    eps = run["episodes"]
    per = {k: float(np.mean([e["success"] for e in v])) for k, v in eps.items()}
    out = {"success": float(np.mean(list(per.values()))), "success_per_task": per,
           "mean_episode_len": float(np.mean([e["steps"] for v in eps.values() for e in v])),
           "episodes": int(sum(len(v) for v in eps.values()))}
    if fid is not None:
        out["vs_eager"] = {k: fid[k] for k in ("episode_outcomes_equal", "action_mse_vs_reference",
                                               "action_mse_vs_expert_reference", "action_mse_vs_expert_optimized")}
    return out


if __name__ == "__main__":
    sys.exit(main())
