"""Why expert_quant does not beat uniform INT8 experts on dit_moe_mnist: how the
final samples' PSNR answers to per-expert weight formats, in one process.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/quant_moe_formats.py \
        [--samples 40] [--calib-steps 8] [--fractions 1.0 0.97 0.94]

An ablation of the decision signal, not of the lowering: the routed experts'
weights of the eager model are replaced by their fake-quantized values
(expert_quant's own `fake_quantize`: symmetric, block-wise along the input dim,
float32 scales; "b0" = one scale per output channel; fp16 = rounded to float16),
and the model samples directly (DDIM-50, CFG 1.5, `samples` digits, PSNR vs fp32).

1. Uniform formats: int8 b32 (expert_quant's uniform baseline), int8 per channel,
   all fp16.
2. Monotonicity: uniform int8 with one MoE layer's experts in fp16 instead (strictly
   less weight error than uniform int8), per layer.
3. The decision: each expert's sensitivity (rel_l2^2 of the calibration request's
   output with only that expert in a format, the same replay expert_quant uses),
   then the exact DP (mixed_precision.allocate) over format sets at byte budgets that
   are fractions of uniform int8 b32; for each choice the predicted (summed)
   error, the calibration error of the whole choice, and the final PSNR.

Writes benchmarks/results/quant_moe_formats.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pared.passes.quant.expert_quant import expert_bytes, fake_quantize  # noqa: E402
from pared.passes.quant.mixed_precision import allocate  # noqa: E402
from pared.workloads import get_workload, torch_callable  # noqa: E402
from pared.bench import write_results  # noqa: E402

INT4, INT4_B16, INT8, INT8_PC, FP16 = "int4b32", "int4b16", "int8b32", "int8b0", "fp16"
SPEC = {INT4: (4, 32), INT4_B16: (4, 16), INT8: (8, 32), INT8_PC: (8, 0)}
SETS = ([INT4, INT8], [INT4, INT8, FP16], [INT4, INT8, INT8_PC, FP16], [INT4, INT4_B16, INT8, INT8_PC, FP16])


def fq(w: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == FP16:
        return w.half().float()
    return fake_quantize(w, *SPEC[fmt])


def cost(w1: torch.Tensor, w2: torch.Tensor, fmt: str) -> int:
    """Bytes of one expert's W1 [K, N] and W2 at `fmt`."""
    if fmt == FP16:
        return 2 * (w1.numel() + w2.numel())
    bits, bs = SPEC[fmt]
    return sum(expert_bytes(int(w.shape[0]), int(w.shape[1]), bits, bs) for w in (w1, w2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--calib-steps", type=int, default=8)
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.97, 0.94])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "quant_moe_formats.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    wl = get_workload("dit_moe_mnist", samples=a.samples)
    model = wl.build().eval()
    cal = get_workload("dit_moe_mnist", steps=a.calib_steps, samples=10).calibration()
    layers = [m for m in model.modules() if hasattr(m, "w1") and hasattr(m, "router")]
    orig = [(m.w1.detach().clone(), m.w2.detach().clone()) for m in layers]
    keys = [(li, e) for li in range(len(layers)) for e in range(int(orig[li][0].shape[0]))]

    def set_formats(assign: dict) -> None:
        for li, m in enumerate(layers):
            w1, w2 = orig[li][0].clone(), orig[li][1].clone()
            for e in range(int(w1.shape[0])):
                f = assign.get((li, e))
                if f is not None:
                    w1[e], w2[e] = fq(orig[li][0][e], f), fq(orig[li][1][e], f)
            m.w1.data.copy_(w1)
            m.w2.data.copy_(w2)

    def calib(assign: dict) -> np.ndarray:
        set_formats(assign)
        with torch.no_grad():
            return np.asarray(cal(lambda x, t, y: model(x, t, y)), dtype=np.float64)

    def samples(assign: dict) -> np.ndarray:
        set_formats(assign)
        with torch.no_grad():
            return wl.run(torch_callable(model))

    cal_ref, ref = calib({}), samples({})

    def measure(assign: dict) -> dict:
        g = calib(assign)
        fid = wl.fidelity(ref, samples(assign))
        return {"bytes": sum(cost(orig[k[0]][0][k[1]], orig[k[0]][1][k[1]], assign[k]) for k in keys),
                "calibration_rel_l2_sq": float(np.sum((g - cal_ref) ** 2) / np.sum(cal_ref ** 2)),
                "psnr_db": fid["psnr_db"], "judge_acc": fid["judge_acc_optimized"]}

    out: dict = {"workload": wl.summary, "samples": a.samples, "calib_steps": a.calib_steps,
                 "judge_acc_fp32": wl.fidelity(ref, ref)["judge_acc_reference"]}
    t0 = time.perf_counter()
    uniform = {}
    for f in (INT8, INT8_PC, FP16):
        uniform[f] = measure({k: f for k in keys})
        print(f"uniform {f}: {uniform[f]}", flush=True)
    out["uniform"] = uniform
    mono = {}
    for li in range(len(layers)):
        mono[f"int8b32, layer {li} fp16"] = measure({k: (FP16 if k[0] == li else INT8) for k in keys})
        print(f"layer {li} fp16: {mono[f'int8b32, layer {li} fp16']}", flush=True)
    out["one_layer_fp16"] = mono

    fmts = sorted({f for s in SETS for f in s})
    sens = {}
    for i, k in enumerate(keys):
        sens[k] = {f: float(np.sum((calib({k: f}) - cal_ref) ** 2) / np.sum(cal_ref ** 2)) for f in fmts}
        print(f"sensitivity {i + 1}/{len(keys)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    out["sensitivity"] = {f"{k[0]}.{k[1]}": v for k, v in sens.items()}
    out["sum_of_single_expert_int8_sensitivities"] = sum(v[INT8] for v in sens.values())
    int8_bytes = uniform[INT8]["bytes"]
    decided = []
    for fset in SETS:
        for frac in a.fractions:
            costs = [[cost(orig[k[0]][0][k[1]], orig[k[0]][1][k[1]], f) for f in fset] for k in keys]
            errors = [[sens[k][f] for f in fset] for k in keys]
            choice, _ = allocate(costs, errors, int(int8_bytes * frac))
            assign = {k: fset[j] for k, j in zip(keys, choice)}
            row = {"formats": fset, "budget_fraction_of_int8": frac,
                   "predicted_rel_l2_sq": float(sum(errors[i][j] for i, j in enumerate(choice))),
                   "count": {f: sum(1 for v in assign.values() if v == f) for f in fset}, **measure(assign)}
            decided.append(row)
            print(f"{fset} {frac}: {row}", flush=True)
    out["decided"] = decided
    out["beats_uniform_int8"] = [r for r in decided if r["bytes"] < int8_bytes
                                 and r["psnr_db"] >= uniform[INT8]["psnr_db"]]
    out["host"] = {"machine": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__}
    write_results(a.out, out, indent=1)
    print(f"wrote {a.out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
