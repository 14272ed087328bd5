"""DyQ-VLA's motion-driven precision switching on the Meta-World VLA, judged in closed loop.

    MUJOCO_GL=egl OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/vla_dynamic_precision.py
        [--episodes 25] [--part all|closed_loop|timing] [--arms ...]

The diffusion policy (ViT, 6-block backbone, 10 DDIM steps of the action head, unrolled in one
graph, batch 1) is lowered to ONNX Runtime (1 thread) in these arms, every linear layer of the
policy quantized in each quantized arm (the same layers, the same 1024 training-demonstration
calibration observations):
  plain        the shipped plain artifact (fp32)
  int8         quantize_linears: static W8A8 (minmax), integer kernels
  a4, a2       dynamic_precision with one width: every call at 4 (2) activation bits
  dyn84        dynamic_precision bits [8, 4]: the level by end-effector speed (Meta-World's state holds
               the hand position [0:3] and its copy one tick earlier [18:21]), half the calibration
               observations per level; a gripper change ([3] vs [21]) above its 0.9 quantile forces 8
               bits; a coarser level after 2 calls in a row
  dyn842       bits [8, 4, 2], calibration shares 0.5 / 0.3 / 0.2
  rand84       the control: bits [8, 4] switched by the policy's noise input instead of motion (4 bits at
               a random ~30% of the calls, dyn84's closed-loop share): does the choice of calls matter?
Closed loop (6 Meta-World tasks x --episodes seeded evaluation episodes): eager PyTorch acts, then
every arm acts in its own closed loop from the same seeds; for the switching arms the share of
policy calls run at each width. Memory (DynamicPrecisionDecisions.memory_ratio): the policy's
parameters (int8 codes + scales of the quantized linears, the rest float) plus the activations
entering the quantized linears at the widths the closed loop used, over the same in fp32.
Timing: the first 12 policy-call observations of two held-out demonstration episodes per task
replayed through every arm and eager, alternating in rotating order each round, medians over
rounds. Writes benchmarks/results/vla_dynamic_precision.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MUJOCO_GL", "egl")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import pared  # noqa: E402
from pared.backends.executor import Executor  # noqa: E402
from pared.workloads import get_workload, torch_callable  # noqa: E402
from pared.workloads.bench import precision_summary  # noqa: E402
from vla_efficient import run_parts, write_parts  # noqa: E402
from vla_speculative import say  # noqa: E402

#: Meta-World's 39-D observation: hand position, gripper opening, ... then the same 18 one tick earlier
MOTION = {"input": "state", "position": [0, 1, 2], "previous": [18, 19, 20], "gripper": [3, 21]}


def dyq(bits: list[int], **kw) -> list:
    return [{"dynamic_precision": dict(MOTION, bits=bits, **kw)}]


ARMS = {"plain": [], "int8": [{"quantize_linears": {}}], "a4": dyq([4]), "a2": dyq([2]),
        "dyn84": dyq([8, 4]), "dyn842": dyq([8, 4, 2], shares=[0.5, 0.3, 0.2]),
        # the control: the same two widths, 4 bits at a random ~30% of the calls (dyn84's closed-loop share),
        # chosen by the policy's own noise input (|n[0] - n[1]| above its 0.7 quantile), not by motion
        "rand84": [{"dynamic_precision": {"bits": [8, 4], "input": "noise", "position": [0], "previous": [1],
                                          "shares": [0.7, 0.3], "gripper_quantile": None, "dwell": 1}}]}
DEFAULT = list(ARMS)
ABOUT = {"what": "VLA diffusion policy (unrolled, batch 1), dynamic_precision (DyQ-VLA): closed-loop success, share "
                 "of calls per activation width, memory vs fp32, per-call latency (ORT CPU)",
         "calibration": "1024 training-demonstration observations"}


class CountLevels:
    """An Executor that keeps the cases its requests chose (collected at each reset)."""

    def __init__(self, ex: Executor):
        self.ex = ex
        self.trace: list[str] = []
        self.counting = True

    def __call__(self, *args):
        return self.ex(*args)

    def reset(self) -> None:
        if self.counting:
            self.trace += self.ex.trace
        self.ex.reset()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=25)
    ap.add_argument("--tasks", default=None, help="comma-separated tasks (default: all six)")
    ap.add_argument("--arms", nargs="*", default=DEFAULT, choices=sorted(ARMS))
    ap.add_argument("--repeats", type=int, default=9, help="timing rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--part", choices=("all", "closed_loop", "timing"), default="all")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "vla_dynamic_precision.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    wl = get_workload("vla_metaworld", head="diffusion", decoder="unrolled", episodes=a.episodes, tasks=a.tasks)
    model = wl.build()
    example, calib = wl.example_inputs(), wl.calibration()
    work = tempfile.mkdtemp(prefix="pared-vla-dyq-")
    ex: dict[str, CountLevels] = {}
    decisions, records, programs = {}, {}, {}
    for name in a.arms:
        say(f"building {name}")
        opt = pared.optimize(model, example, target="cpu", calibration=calib, bench_repeats=0, holdout=[],
                             pipeline=ARMS[name], allow_fidelity_loss=True)
        ex[name] = CountLevels(Executor(opt.save(os.path.join(work, name)), threads=a.threads))
        rec = opt.program.records.get("DynamicPrecisionDecisions")
        records[name], programs[name] = rec, opt.program
        decisions[name] = None if rec is None else {
            "levels": {lv.label: {"bits": lv.bits, "calibration_share": round(lv.calibration_share, 4),
                                  "activation_bytes": lv.activation_bytes} for lv in rec.levels},
            "speed_edges": [round(e, 5) for e in rec.edges], "gripper_threshold": rec.gripper_threshold,
            "dwell": rec.dwell, "layers": len(rec.layers), "weights": rec.weights,
            "weight_bytes": rec.weight_bytes, "float_weight_bytes": rec.float_weight_bytes,
            "other_param_bytes": rec.other_param_bytes, "activation_elements": rec.activation_elements,
            "memory_ratio_calibration": round(rec.memory_ratio(), 4)}
        say(f"  {decisions[name]}")
    eager = torch_callable(model)

    parts = ("closed_loop", "timing") if a.part == "all" else (a.part,)
    out: dict = {}
    for part in parts:
        a.part = part
        for c in ex.values():
            c.counting = part == "closed_loop"
        out = run_parts(a, wl, ex, eager)
        if part == "closed_loop":
            for name, c in ex.items():
                c.reset()                              # the last episode's calls
                arm = out["closed_loop"]["arms"][name]
                rec, used = records[name], precision_summary(programs[name], c.trace)   # as pared bench reports it
                if used is not None and used["level_shares"]:
                    arm["level_shares"] = {k: round(v, 4) for k, v in used["level_shares"].items()}
                    arm["memory_ratio"] = round(used["memory_ratio"], 4)
                    arm["parameter_ratio"] = round((rec.weight_bytes + rec.other_param_bytes) /
                                                   (rec.float_weight_bytes + rec.other_param_bytes), 4)
                say(f"{name}: {len(c.trace)} calls, levels {arm.get('level_shares')} memory {arm.get('memory_ratio')}")
            with8 = next((r for r in records.values() if r is not None and "a8" in {lv.label for lv in r.levels}), None)
            if "int8" in ex and with8 is not None:      # the same layers and ranges as every call at a8
                out["closed_loop"]["arms"]["int8"]["memory_ratio"] = round(with8.memory_ratio({"a8": 1.0}), 4)
            write_parts(a, out, {n: ARMS[n] for n in a.arms}, {}, decisions, **ABOUT)
    write_parts(a, out, {n: ARMS[n] for n in a.arms}, {}, decisions, **ABOUT)


if __name__ == "__main__":
    sys.exit(main())
