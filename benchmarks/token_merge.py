"""Token merging (`token_merge`, ToMe) on the ViT MNIST classifier, side by side in one process:
torch eager fp32, eager ToMe (the peer: the eager model patched with ToMe's own merge,
pared.testing.tome_vit), pared's plain ORT fp32 artifact and pared's merged artifacts, for a
few r (tokens merged per block).

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/token_merge.py \
        [--r 4 8 12] [--threads 1] [--repeats 15] [--batch 100] [--target cpu] [--out FILE]

Per r: the FLOPs ratio (analysis.cost, the merged graph over the plain one, the merge's own
work included), the measured time ratio (plain ORT artifact's median over the merged one's,
same alternating rounds), and top-1 agreement with eager fp32 on the 500 held-out digits
(plus accuracy). vit_mnist has 49 patch tokens + [CLS]: where the time ratio falls short of
the FLOPs ratio, the merge's fixed costs (top-k, gathers, small matmuls) and the per-op
overheads of a small graph dominate; a larger-token ViT (patch 2 -> 196 tokens) would show
more, and is not trained here (issue 15 notes it).

Speed: one batch per call, every round calls each runner once in rotating order
(pared.fidelity.side_by_side), medians compared; ORT spinning off; torch and ORT at the same
thread count. Writes benchmarks/results/token_merge.json (run it on a quiet machine; a smoke
run: --repeats 2 --r 4 --out /tmp/token_merge.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pared  # noqa: E402
from pared.analysis.cost import graph_flops  # noqa: E402
from pared.bench import write_results  # noqa: E402
from pared.fidelity import side_by_side  # noqa: E402
from pared.targets import get_target  # noqa: E402
from pared.testing import tome_vit  # noqa: E402
from pared.workloads import get_workload  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--r", type=int, nargs="+", default=[4, 8, 12], help="tokens merged per block")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--target", default="cpu", help="cpu (ONNX Runtime) or tvm-cpu")
    ap.add_argument("--no-peer", action="store_true", help="leave out eager ToMe")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "token_merge.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    wl = get_workload("vit_mnist", batch=a.batch, samples=500)
    model = wl.build()
    tgt = dataclasses.replace(get_target(a.target), threads=a.threads)

    def build(pipeline):
        t0 = time.perf_counter()
        opt = pared.optimize(model, wl.example_inputs(), target=tgt, pipeline=pipeline,
                             calibration=wl.calibration(), allow_fidelity_loss=True, bench_repeats=0)
        return opt, time.perf_counter() - t0

    print("building: plain", flush=True)
    plain, plain_s = build(None)
    built = {}
    for r in a.r:
        print(f"building: token_merge r={r}", flush=True)
        built[f"pared_tome_r{r}"] = (r, *build([{"token_merge": {"r": r}}]))

    def eager_fn(m):
        def call(x):
            with torch.no_grad():
                return m(torch.as_tensor(x)).numpy()
        return call

    def artifact(opt):
        ex = opt.executor
        return lambda x: ex.run_flat(np.asarray(x))[0]

    runners = {"torch_eager_fp32": eager_fn(model), f"{a.target}_plain": artifact(plain)}
    if not a.no_peer:
        runners.update({f"eager_tome_r{r}": eager_fn(tome_vit(model, r)) for r in a.r})
    runners.update({k: artifact(opt) for k, (_, opt, _) in built.items()})

    print("fidelity: 500 held-out digits", flush=True)
    outs = {k: wl.run(fn) for k, fn in runners.items()}
    ref = outs["torch_eager_fp32"]
    fidelity = {k: wl.fidelity(ref, o) for k, o in outs.items()}

    print(f"timing: {a.repeats} alternating rounds", flush=True)
    x = wl.x[:a.batch]
    sp = side_by_side({k: (lambda f=f: f(x)) for k, f in runners.items()}, repeats=a.repeats, warmup=2)
    med = sp["median_s"]
    plain_key = f"{a.target}_plain"
    speed = {k: {"median_ms": round(med[k] * 1e3, 3), "min_ms": round(sp["min_s"][k] * 1e3, 3),
                 "vs_eager": round(med["torch_eager_fp32"] / med[k], 3),
                 "vs_plain": round(med[plain_key] / med[k], 3)} for k in runners}

    plain_flops = graph_flops(plain.program.main.module)
    merged = {}
    for k, (r, opt, secs) in built.items():
        rec = opt.program.records["TokenMergeDecisions"]
        g = rec.graphs[0]
        merged[k] = {
            "r": r, "build_s": round(secs, 1),
            "tokens_per_block": [[b.tokens_in, b.tokens_out] for b in g.blocks],
            "flops": g.flops_after, "flops_ratio": round(g.flops_after / plain_flops, 4),
            "merge_flops_share": round(sum(b.merge_flops for b in g.blocks) / g.flops_after, 4),
            "time_ratio_vs_plain": speed[k]["vs_plain"],
            "speedup_ideal_from_flops": round(plain_flops / g.flops_after, 3),
            "top1_agreement": fidelity[k]["top1_agreement"], "accuracy": fidelity[k]["accuracy"],
            "peer_eager_tome": None if a.no_peer else {
                "top1_agreement": fidelity[f"eager_tome_r{r}"]["top1_agreement"],
                "vs_eager": speed[f"eager_tome_r{r}"]["vs_eager"]},
        }
        print(f"r={r}: FLOPs {merged[k]['flops_ratio']:.3f} of plain (ideal {merged[k]['speedup_ideal_from_flops']}x),"
              f" measured {speed[k]['vs_plain']}x vs the plain artifact, agreement {fidelity[k]['top1_agreement']:.3f}",
              flush=True)

    data = {
        "what": "token_merge (ToMe bipartite soft matching, proportional attention, protect [CLS]) on vit_mnist: "
                "eager, eager ToMe (peer), the plain artifact and the merged artifacts in one process",
        "command": "python benchmarks/token_merge.py " + " ".join(
            [f"--r {' '.join(map(str, a.r))}", f"--threads {a.threads}", f"--repeats {a.repeats}",
             f"--batch {a.batch}", f"--target {a.target}"] + (["--no-peer"] if a.no_peer else [])),
        "workload": {"name": "vit_mnist", "tokens": 50, "batch": a.batch, "scored_digits": 500},
        "target": a.target, "threads": a.threads, "repeats": sp["repeats"],
        "plain": {"flops": plain_flops, "build_s": round(plain_s, 1)},
        "merged": merged, "speed": speed, "fidelity": fidelity,
        "note": "49 patch tokens + [CLS]: compare time_ratio_vs_plain with speedup_ideal_from_flops; a 196-token "
                "ViT (patch 2) is not trained in this slice",
    }
    print("wrote", write_results(a.out, data))


if __name__ == "__main__":
    main()
