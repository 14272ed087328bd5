"""Token pruning (`token_prune`) on the ViT MNIST classifier, side by side in one process: torch
eager fp32, pared's plain ORT fp32 artifact and pared's pruned artifacts: after one block, keep
the patch tokens [CLS] attends to most (EViT's score: relevance with the [CLS] query) and drop
the rest (mode select), or fold them into the kept ones (mode transform: Token Transforming's
many-to-many matrix).

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/token_prune_vit.py \
        [--threads 1] [--repeats 15] [--batch 100] [--out FILE]

Per arm: the FLOPs ratio (analysis.cost, pruned graph over the plain one, the selection
included), the measured time ratio (plain ORT artifact's median over the pruned one's, same
alternating rounds, pared.fidelity.side_by_side) and top-1 agreement with eager fp32 on the 500
held-out digits (plus accuracy). Writes benchmarks/results/token_prune_vit.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

HERE = os.path.dirname(os.path.abspath(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pared  # noqa: E402
from pared.analysis.cost import graph_flops  # noqa: E402
from pared.bench import write_results  # noqa: E402
from pared.fidelity import side_by_side  # noqa: E402
from pared.targets import get_target  # noqa: E402
from pared.workloads import get_workload  # noqa: E402

ARMS = {f"keep{k}_after{b}{'_transform' if m == 'transform' else ''}": {"keep": k, "after": b, "mode": m}
        for k, b, m in ((24, 0, "select"), (24, 0, "transform"), (24, 1, "transform"), (16, 1, "select"),
                        (16, 1, "transform"), (16, 2, "transform"), (12, 1, "transform"), (8, 2, "transform"))}


def run_vit_arms(a, pipelines: dict) -> dict:
    """vit_mnist side by side in one process: eager fp32, the plain ORT artifact and one artifact
    per pipeline (label -> pass list), `a.threads` threads, batch `a.batch`; top-1 agreement with
    eager on the 500 held-out digits, then alternating timing rounds (`a.repeats`)."""
    torch.set_num_threads(a.threads)
    wl = get_workload("vit_mnist", batch=a.batch, samples=500)
    model = wl.build()
    tgt = dataclasses.replace(get_target("cpu"), threads=a.threads)

    def build(pipeline):
        return pared.optimize(model, wl.example_inputs(), target=tgt, pipeline=pipeline,
                              calibration=wl.calibration(), allow_fidelity_loss=True, bench_repeats=0)

    plain = build(None)
    built = {n: build(p) for n, p in pipelines.items()}

    def eager(x):
        with torch.no_grad():
            return model(torch.as_tensor(x)).numpy()

    def artifact(opt):
        return lambda x: opt.executor.run_flat(np.asarray(x))[0]
    runners = {"torch_eager_fp32": eager, "cpu_plain": artifact(plain), **{n: artifact(o) for n, o in built.items()}}
    outs = {k: wl.run(fn) for k, fn in runners.items()}
    fidelity = {k: wl.fidelity(outs["torch_eager_fp32"], o) for k, o in outs.items()}
    x = wl.x[:a.batch]
    sp = side_by_side({k: (lambda f=f: f(x)) for k, f in runners.items()}, repeats=a.repeats, warmup=2)
    return {"built": built, "median_s": sp["median_s"], "fidelity": fidelity, "timing": sp,
            "plain_flops": graph_flops(plain.program.main.module)}


def vit_main(doc: str, pass_name: str, arms: dict, out: str) -> tuple:
    """The command line of a vit_mnist benchmark whose arms are one pass's options, then
    run_vit_arms on them: (args, its result)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--arms", nargs="*", default=list(arms), choices=list(arms))
    ap.add_argument("--out", default=os.path.join(HERE, "results", out))
    a = ap.parse_args()
    return a, run_vit_arms(a, {n: [{pass_name: arms[n]}] for n in a.arms})


def write_vit_results(a, r: dict, arms: dict, what: str, **extra) -> None:
    """The results file of a vit_mnist benchmark: the run's settings, the plain artifact and eager
    (time, FLOPs, accuracy) and the arms."""
    med, fidelity = r["median_s"], r["fidelity"]
    write_results(a.out, {
        "what": what, "threads": a.threads, "repeats": r["timing"]["repeats"], "batch": a.batch,
        "scored_digits": 500, **extra,
        "plain": {"median_ms": round(med["cpu_plain"] * 1e3, 3), "flops": r["plain_flops"],
                  "vs_eager": round(med["torch_eager_fp32"] / med["cpu_plain"], 3),
                  "accuracy": fidelity["cpu_plain"]["accuracy"]},
        "eager": {"median_ms": round(med["torch_eager_fp32"] * 1e3, 3),
                  "accuracy": fidelity["torch_eager_fp32"]["accuracy"]},
        "arms": arms})
    print("wrote", a.out)


def main() -> None:
    a, r = vit_main(__doc__, "token_prune", ARMS, "token_prune_vit.json")
    built, med, fidelity, plain_flops = r["built"], r["median_s"], r["fidelity"], r["plain_flops"]
    arms = {}
    for n, opt in built.items():
        g = opt.program.records["TokenPruneDecisions"].graphs[0]
        arms[n] = {"options": ARMS[n], "block": g.block, "tokens": [g.tokens_in, g.tokens_out],
                   "flops_ratio": round(g.flops_after / plain_flops, 4),
                   "speedup_ideal_from_flops": round(plain_flops / g.flops_after, 3),
                   "time_ratio_vs_plain": round(med["cpu_plain"] / med[n], 3),
                   "vs_eager": round(med["torch_eager_fp32"] / med[n], 3),
                   "median_ms": round(med[n] * 1e3, 3),
                   "top1_agreement": fidelity[n]["top1_agreement"], "accuracy": fidelity[n]["accuracy"]}
        print(f"{n}: FLOPs {arms[n]['flops_ratio']:.3f}, {arms[n]['time_ratio_vs_plain']}x the plain artifact, "
              f"agreement {arms[n]['top1_agreement']:.3f}", flush=True)
    write_vit_results(a, r, arms, "token_prune on vit_mnist ([CLS] relevance; select or Token Transforming's "
                      "transform), eager, the plain ORT artifact and the pruned artifacts in one process")


if __name__ == "__main__":
    main()
