"""Entropy-guided attention sparsity (`sparse_attention`, ToProVAR's local heads) on the ViT MNIST
classifier, side by side in one process: torch eager fp32, pared's plain ORT fp32 artifact and the
sparse artifacts. Heads whose normalized attention entropy (the attention_entropy analysis on the
calibration digits) is lowest attend to a window of the 7 x 7 patch grid (mode window: block-local,
the attention work shrinks) or keep their top-k keys (mode topk: masks-only, the dense scores
still run); with a goal, the pass keeps the most local heads that still meet it on the
calibration run.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/sparse_attention_vit.py \
        [--threads 1] [--repeats 15] [--batch 100] [--arms ...] [--out FILE]

Per arm: the local heads (of 24), the attention FLOPs ratio over the sites touched and the whole
graph's FLOPs ratio (analysis.cost), the measured time ratio (plain ORT artifact's median over
the arm's, same alternating rounds, pared.fidelity.side_by_side) and top-1 agreement with eager
fp32 on the 500 held-out digits (plus accuracy). Writes benchmarks/results/sparse_attention_vit.json.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from pared.analysis.cost import graph_flops  # noqa: E402
from token_prune_vit import vit_main, write_vit_results  # noqa: E402

ARMS = {
    "window_rows_h0.75": {"max_normalized": 0.75, "window": [1, 7]},
    "window_cols_h0.75": {"max_normalized": 0.75, "window": [7, 1]},
    "window_rows_h0.85": {"max_normalized": 0.85, "window": [1, 7]},
    "window_rows_goal0.99": {"target": {"agreement": 0.99}, "window": [1, 7]},
    "topk8_h0.75": {"max_normalized": 0.75, "mode": "topk", "k": 8},
    "topk8_goal0.99": {"target": {"agreement": 0.99}, "mode": "topk", "k": 8},
}


def main() -> None:
    a, r = vit_main(__doc__, "sparse_attention", ARMS, "sparse_attention_vit.json")
    built, med, fidelity, plain_flops = r["built"], r["median_s"], r["fidelity"], r["plain_flops"]
    arms = {}
    for n, opt in built.items():
        rec = opt.program.records.get("AttentionSparsityDecisions")
        flops = graph_flops(opt.program.main.module)
        arms[n] = {"options": ARMS[n],
                   "local_heads": rec.local_heads if rec else 0,
                   "sites": {s.layer: list(s.local) for s in rec.sites} if rec else {},
                   "local_keys": rec.sites[0].local_keys if rec else None,
                   "lowering": rec.lowering if rec else None,
                   "attention_flops_ratio": round(rec.attention_flops_ratio, 4) if rec else 1.0,
                   "flops_ratio": round(flops / plain_flops, 4),
                   "trials": [[m, dict(v)] for m, v in rec.trials] if rec else [],
                   "time_ratio_vs_plain": round(med["cpu_plain"] / med[n], 3),
                   "vs_eager": round(med["torch_eager_fp32"] / med[n], 3),
                   "median_ms": round(med[n] * 1e3, 3),
                   "top1_agreement": fidelity[n]["top1_agreement"], "accuracy": fidelity[n]["accuracy"]}
        print(f"{n}: {arms[n]['local_heads']} local heads, attention FLOPs {arms[n]['attention_flops_ratio']:.3f}, "
              f"graph FLOPs {arms[n]['flops_ratio']:.3f}, {arms[n]['time_ratio_vs_plain']}x the plain artifact, "
              f"agreement {arms[n]['top1_agreement']:.3f}", flush=True)
    write_vit_results(a, r, arms, "sparse_attention on vit_mnist (local heads by attention entropy: 7-token "
                      "windows of the 7 x 7 grid, or top-k keys), eager, the plain ORT artifact and the sparse "
                      "artifacts in one process", heads=24)


if __name__ == "__main__":
    main()
