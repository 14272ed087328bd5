"""VLA-Cache's cross-frame token reuse on the Meta-World VLA, judged in closed loop.

    MUJOCO_GL=egl OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/vla_token_reuse.py
        [--episodes 25] [--part all|closed_loop|timing] [--arms ...] [--policy all_tokens|wide]

The diffusion policy whose backbone sees all 64 visual tokens (policy "all_tokens": ViT over 64
patches of 8x8 pixels, the 6-block backbone over 12 text + 64 visual + state + readout tokens),
captured as a pared Denoiser (the encoder graph; the head's 10 DDIM steps a loop of the Plan),
lowered to ONNX Runtime (1 thread); `--policy wide`: that policy at twice the ViT / backbone width
(d_model 256, 8 heads; vla_metaworld's policy "wide"). In these arms:
  plain         the plain artifact (fp32)
  reuse         token_reuse on the backbone's 6 blocks: a visual token whose 8x8 patch has cosine
                >= 0.996 to the previous control step's (centred pixels; 1 when equal) and is not
                among the 16 of highest instruction -> vision attention at the previous step reuses
                the previous step's keys / values; levels reuse 16, 24, 32, 40 or 48 tokens (the
                largest that fits the static count), per-block shares from attention concentration
  reuse_vision  the same, and the ViT's 2 blocks (over the 64 patch tokens, one per backbone visual
                token) reuse as the backbone's first block does: a reused token is not computed
                anywhere in the encoder (an extension: VLA-Cache reuses in the language model only)
  reuse_vision_rel8  reuse_vision with 8 relevant tokens always recomputed (not 16), levels up to 56
  reuse_norel   reuse without the relevance rule (relevant: 0, levels up to 56): the naive reuse
                VLA-Cache reports cost ten points of success
  composed      reuse_vision, then action_cache (BAC, 4 updates per head sub-block over the 10 DDIM
                steps), then dynamic_precision (int8 weights, 8 or 4 activation bits by the hand's
                speed): three of the four methods on one artifact (the fourth, speculative decoding,
                is for the token head)
Closed loop (6 Meta-World tasks x --episodes seeded evaluation episodes): eager PyTorch acts, then
every arm acts in its own closed loop from the same seeds (one episode = one request: the first
call is cold); the share of calls per level. Timing: the first 12 policy-call observations of two
held-out demonstration episodes per task (every 4th step, as the closed loop calls it) replayed
through every arm and eager, alternating in rotating order each round, medians over rounds: the
policy call, and the backbone (the encoder graphs a call ran: the ViT and the 6 blocks, plus the
probe on warm calls). Writes benchmarks/results/vla_token_reuse.json.
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

import torch  # noqa: E402

import pared  # noqa: E402
from pared.backends.executor import Executor  # noqa: E402
from pared.workloads import get_workload, torch_callable  # noqa: E402
from pared.workloads.bench import precision_summary, reuse_summary  # noqa: E402
from vla_dynamic_precision import CountLevels  # noqa: E402
from vla_efficient import run_parts, write_parts  # noqa: E402
from vla_speculative import say, time_replay  # noqa: E402

SITE = {"tokens": [12, 76], "patch": 8, "input": "image", "blocks": "blocks.*"}
VISION = dict(SITE, vision_blocks="vit.blocks.*")
UP_TO_56 = [16, 24, 32, 40, 48, 56]
ARMS = {"plain": [], "reuse": [{"token_reuse": dict(SITE)}],
        "reuse_vision": [{"token_reuse": dict(VISION)}],
        "reuse_vision_rel8": [{"token_reuse": dict(VISION, relevant=8, levels=UP_TO_56)}],
        "reuse_norel": [{"token_reuse": dict(SITE, relevant=0, levels=UP_TO_56)}],
        # three of issue 16's methods on one artifact: the encoder reuses tokens, the head's steps
        # are BAC-cached, every linear int8 at 8 or 4 activation bits by motion (the selects of a
        # call agree); speculative decoding needs the token head: benchmarks/vla_speculative.py
        "composed": [{"token_reuse": dict(VISION)}, {"action_cache": {"schedule": "bac", "updates": 4}},
                     {"dynamic_precision": {"bits": [8, 4], "input": "state", "position": [0, 1, 2],
                                            "previous": [18, 19, 20], "gripper": [3, 21]}}]}
DEFAULT = list(ARMS)
POLICY = {"all_tokens": "vla_diffusion_64.safetensors: ViT and backbone d_model 128, 4 heads",
          "wide": "vla_diffusion_64_wide.safetensors: ViT and backbone d_model 256, 8 heads (widened from "
                  "vla_diffusion_64, fine-tuned)"}
ABOUT = {"what": "VLA diffusion policy with 64 visual tokens (Denoiser: encoder graph + 10 DDIM head steps in the "
                 "Plan, batch 1), token_reuse (VLA-Cache): closed-loop success, share of calls per reuse level, "
                 "per-call and backbone latency (ORT CPU)",
         "calibration": "1024 training-demonstration observations (attention concentration per block)"}


class Timed(CountLevels):
    """vla_dynamic_precision's CountLevels (the cases its requests chose), also timing the encoder graphs."""

    def __init__(self, ex: Executor):
        super().__init__(ex)
        self.encoder_s = 0.0             # seconds in the encoder graphs (ViT + backbone, the probe)
        run = ex._run_graph

        def timed(name: str, arrays: list) -> list:
            t0 = time.perf_counter()
            out = run(name, arrays)
            if name.startswith("encoder"):
                self.encoder_s += time.perf_counter() - t0
            return out
        ex._runner._run_graph = timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=25)
    ap.add_argument("--tasks", default=None, help="comma-separated tasks (default: all six)")
    ap.add_argument("--arms", nargs="*", default=DEFAULT, choices=sorted(ARMS))
    ap.add_argument("--repeats", type=int, default=9, help="timing rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calibration", type=int, default=1024, help="calibration observations")
    ap.add_argument("--part", choices=("all", "closed_loop", "timing"), default="all")
    ap.add_argument("--policy", choices=("all_tokens", "wide"), default="all_tokens",
                    help="the 64-token policy, or it widened to d_model 256 (vla_metaworld's policy='wide')")
    ap.add_argument("--json", default=None, help="default: results/vla_token_reuse.json, or "
                                                  "vla_token_reuse_wide.json for --policy wide")
    a = ap.parse_args()
    a.json = a.json or os.path.join(HERE, "results", "vla_token_reuse.json" if a.policy == "all_tokens"
                                    else "vla_token_reuse_wide.json")
    torch.set_num_threads(a.threads)
    wl = get_workload("vla_metaworld", head="diffusion", decoder="loop", policy=a.policy, episodes=a.episodes,
                      tasks=a.tasks, calibration_steps=a.calibration)
    model = wl.build()
    example, calib = wl.example_inputs(), wl.calibration()
    work = tempfile.mkdtemp(prefix="pared-vla-reuse-")
    ex: dict[str, Timed] = {}
    decisions, programs = {}, {}
    for name in a.arms:
        say(f"building {name}")
        opt = pared.optimize(model, example, target="cpu", calibration=calib, bench_repeats=0, holdout=[],
                             pipeline=ARMS[name], allow_fidelity_loss=True)
        ex[name] = Timed(Executor(opt.save(os.path.join(work, name)), threads=a.threads))
        programs[name] = opt.program
        rec = opt.program.records.get("TokenReuseDecisions@encoder")
        decisions[name] = None if rec is None else {
            "blocks": list(rec.blocks), "tokens": list(rec.tokens), "relevant": rec.relevant,
            "threshold": rec.threshold, "block_shares": [round(x, 3) for x in rec.alphas],
            "concentration": [round(x, 4) for x in rec.concentration],
            "levels": {lv.label: {"reuse": lv.reuse, "per_block": list(lv.per_block),
                                  "flops_ratio": round(rec.flops_ratio(lv.label), 3)} for lv in rec.levels},
            "cold_flops": rec.cold_flops}
        say(f"  {decisions[name]}")
    eager = torch_callable(model)

    parts = ("closed_loop", "timing") if a.part == "all" else (a.part,)
    out: dict = {}
    for part in parts:
        a.part = part
        for c in ex.values():
            c.counting = part == "closed_loop"
        if part == "closed_loop":
            out = run_parts(a, wl, ex, eager)
            for name, c in ex.items():
                c.reset()                              # the last episode's calls
                used = reuse_summary(programs[name], c.trace)          # as pared bench reports it
                if used is not None:
                    out["closed_loop"]["arms"][name].update(used)
                precision = precision_summary(programs[name], c.trace)
                if precision is not None:
                    out["closed_loop"]["arms"][name]["precision"] = {
                        "level_shares": {k: round(v, 4) for k, v in precision["level_shares"].items()},
                        "memory_ratio": round(precision["memory_ratio"], 4)}
                say(f"{name}: {len(c.trace)} calls, reuse {used}, precision {precision}")
        else:
            out = _timing(a, wl, ex, eager, out)
        write_parts(a, out, {n: ARMS[n] for n in a.arms}, {}, decisions, **ABOUT, policy=POLICY[a.policy])


def _timing(a, wl, ex: dict, eager, previous: dict) -> dict:
    """Per-call and backbone latency over replayed observations, medians over rounds."""
    if not previous and os.path.exists(a.json):
        with open(a.json) as f:
            previous = json.load(f)
    seqs = wl.replay_sequences(per_task=2, calls=12)
    n_calls = sum(len(q) for q in seqs)
    backbone: dict[str, list[float]] = {n: [] for n in ex}
    mark = {n: 0.0 for n in ex}

    def after(name: str, r: int) -> None:
        if name in ex:
            if r:
                backbone[name].append((ex[name].encoder_s - mark[name]) / n_calls)
            mark[name] = ex[name].encoder_s
    load_before = os.getloadavg()
    per_call = time_replay({"eager": (eager, None), **{n: (ex[n], ex[n].reset) for n in ex}}, seqs, a.repeats, after)
    ms = {n: 1e3 * statistics.median(v) for n, v in per_call.items()}
    bb = {n: 1e3 * statistics.median(v) for n, v in backbone.items()}
    ref = "plain" if "plain" in ms else next(iter(ex))
    arms = {n: {"policy_call_ms": round(ms[n], 3), "speedup_vs_eager": round(ms["eager"] / ms[n], 3),
                "speedup_vs_plain": round(ms[ref] / ms[n], 3)} for n in ms}
    for n in ex:
        arms[n]["backbone_ms"] = round(bb[n], 3)
        arms[n]["backbone_speedup_vs_plain"] = round(bb[ref] / bb[n], 3)
        say(f"{n}: {ms[n]:.2f} ms per call ({arms[n]['speedup_vs_plain']:.3f}x plain), backbone {bb[n]:.2f} ms "
            f"({arms[n]['backbone_speedup_vs_plain']:.3f}x plain)")
    previous["timing"] = {"repeats": a.repeats, "replayed_calls": n_calls, "threads": a.threads,
                          "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "load_average_before": load_before,
                          "load_average_after": os.getloadavg(), "measured": time.strftime("%Y-%m-%d %H:%M"),
                          "arms": arms}
    return previous


if __name__ == "__main__":
    sys.exit(main())
