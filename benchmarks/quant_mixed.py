"""Mixed precision (`quant_sensitivity` + `mixed_precision`) on all-MiniLM-L6-v2 and
the ViT MNIST classifier, side by side with torch eager fp32, pared's plain ORT
fp32 lowering, uniform static INT8 (`quantize_linears`, every layer) and uniform
weight-only INT4 (`quantize_weights_int4`, forced on every layer), in one process.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/quant_mixed.py \
        [--workloads minilm vit_mnist] [--threads 1] [--repeats 7] [--latency-only]

Budget and goal (issue 5): the linear layers' weights <= 30% of their fp32 bytes,
embedding cosine >= 0.995 (minilm, every sentence of the 213-sentence corpus) /
top-1 agreement >= 99.5% (vit_mnist, 500 held-out digits). mixed_precision is
given the budget as a cap and the goal on its calibration run (`target`), and
searches below the cap for the smallest choice that meets it. Variants:
pared_mixed (the issue's formats: w4 / w8a8 / fp32), on minilm also
pared_mixed_with_w8 (weight-only int8 allowed too; also with the goal 0.998 and
with the budget alone), on vit_mnist also
pared_mixed_budget_only (no goal: the least error within the budget). Calibration never
uses the scored inputs: minilm calibrates on the example sentences not in the
corpus (as benchmarks/quant_minilm.py), vit_mnist on 200 training digits (the
test split holds only the 500 scored ones).

Latency budget (`latency_budget` per workload, timed in its own rounds):
`quant_sensitivity` + `latency` (per-layer latency on the target, one-layer
models lowered per shape and format) + `mixed_precision` with `latency: 0.6` (the
linear layers' summed latency <= 0.6 of fp32, least error) and with the fidelity
goal searched on the latency budget (`objective: latency`); formats as
pared_mixed (vit_mnist) and pared_mixed_with_w8 (minilm). Beside ORT fp32,
uniform W8A8 and eager: the chosen formats, the predicted latency fraction (of
the layers' sum, and of the whole model: ORT fp32's measured time with the
layers' fp32 sum replaced by the choice's) and the measured one (the artifact's
median over ORT fp32's, same rounds), speed and fidelity. `--latency-only` runs
just this block and keeps the rest of the results file.

Speed: one batch per call, every round calls each runner once in rotating order
(pared.fidelity.side_by_side), medians compared; ORT spinning off, 1 thread.
Writes benchmarks/results/quant_mixed.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

HERE = os.path.dirname(os.path.abspath(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pared  # noqa: E402
from pared.fidelity import side_by_side  # noqa: E402
from pared.targets import get_target  # noqa: E402
from pared.workloads import example_module, get_workload  # noqa: E402
from pared.bench import write_results  # noqa: E402

BUDGET = 0.3


def _variants(name: str, target: dict) -> dict:
    def mixed(formats, goal):
        sens = [f for f in formats if f != "fp32"]
        return [{"quant_sensitivity": {"formats": sens, "block_size": 32, "w8_block_size": 128}},
                {"mixed_precision": {"weight_bytes": BUDGET, **({"target": goal} if goal else {}),
                                     "formats": formats, "block_size": 32, "w8_block_size": 128}}]
    spec = ["w4", "w8a8", "fp32"]                 # the issue's {4, 8, 32} bits
    out = {"pared_mixed": mixed(spec, target)}
    if name == "minilm":
        # W8A8 cannot reach the goal within the budget here (see the results): add weight-only int8. The
        # search keeps the smallest choice that meets the goal on the 16 calibration rows, with no margin
        # for the 213 scored sentences; a stricter goal, or the whole budget, leaves one
        every = ["w4", "w8a8", "w8", "fp32"]
        out["pared_mixed_with_w8"] = mixed(every, target)
        out["pared_mixed_with_w8_goal_0998"] = mixed(every, {"cosine": 0.998})
        out["pared_mixed_with_w8_budget_only"] = mixed(every, None)
    else:
        out["pared_mixed_budget_only"] = mixed(spec, None)
    out["pared_int8_all"] = [{"quantize_linears": {"method": "minmax"}}]
    out["pared_int4_all"] = [{"quantize_weights_int4": {"block_size": 32, "force": True}}]
    return out


LATENCY = 0.6


def _latency_variants(name: str, target: dict) -> dict:
    formats = ["w4", "w8a8", "w8", "fp32"] if name == "minilm" else ["w4", "w8a8", "fp32"]
    goal = {"cosine": 0.998} if name == "minilm" else target
    sens = [f for f in formats if f != "fp32"]
    common = {"formats": formats, "block_size": 32, "w8_block_size": 128}

    def mixed(budget):
        return [{"quant_sensitivity": {"formats": sens, "block_size": 32, "w8_block_size": 128}},
                {"latency": {"formats": sens, "block_size": 32, "w8_block_size": 128, "threads": 1}},
                {"mixed_precision": {**budget, **common}}]
    return {"pared_mixed_latency_06": mixed({"latency": LATENCY}),
            "pared_mixed_latency_goal": mixed({"target": goal, "objective": "latency"}),
            "pared_int8_all": [{"quantize_linears": {"method": "minmax"}}]}


def _minilm(a, target):
    mod = example_module("minilm")
    wl = get_workload("minilm", batch=a.batch)
    model = wl.build()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(mod.model_dir())

    def tokens(sentences):
        b = tok(sentences, padding="max_length", truncation=True, max_length=a.seq, return_tensors="pt")
        return b["input_ids"], b["attention_mask"]

    corpus = wl.corpus
    pad = (-len(corpus)) % a.batch
    ids, mask = tokens(corpus + corpus[:pad])
    batches = [(ids[i:i + a.batch], mask[i:i + a.batch]) for i in range(0, len(ids), a.batch)]
    cal_sentences = [s for s in list(mod.HELD_OUT) + list(mod.SENTENCES) if s not in set(corpus)]
    n_cal = -(-len(cal_sentences) // a.batch) * a.batch
    cycled = [cal_sentences[i % len(cal_sentences)] for i in range(n_cal)]
    calibration = [tokens(cycled[i:i + a.batch]) for i in range(0, n_cal, a.batch)]

    def run_all(fn):
        return np.concatenate([np.asarray(fn(x.numpy(), m.numpy())) for x, m in batches])[:len(corpus)]

    def eager(x, m):
        with torch.no_grad():
            return model(torch.as_tensor(x), torch.as_tensor(m)).numpy()
    xn, mn = batches[0][0].numpy(), batches[0][1].numpy()
    return dict(model=model, example=batches[0], calibration=calibration, run_all=run_all, eager=eager,
                timed_args=(xn, mn), fidelity=wl.fidelity,
                shape={"batch": a.batch, "seq": a.seq, "sentences": len(corpus),
                       "calibration": f"{len(cal_sentences)} sentences not in the corpus, {len(calibration)} batches"})


def _vit(a, target):
    wl = get_workload("vit_mnist", batch=100, samples=500)
    model = wl.build()
    from pared.workloads.data import mnist
    x_train, _ = mnist("train", 28)          # the test split holds only the 500 scored digits
    cal = [(torch.from_numpy(np.ascontiguousarray(x_train[i:i + 100])),) for i in (0, 100)]

    def eager(x):
        with torch.no_grad():
            return model(torch.as_tensor(x)).numpy()
    return dict(model=model, example=wl.example_inputs(), calibration=cal, run_all=lambda fn: wl.run(fn),
                eager=eager, timed_args=(wl.x[:wl.batch],), fidelity=wl.fidelity,
                shape={"batch": 100, "scored_digits": 500, "calibration": "training digits 0-199 (2 batches)"})


def bench(name, a):
    target_goal = {"cosine": 0.995} if name == "minilm" else {"agreement": 1.0}
    w = _minilm(a, target_goal) if name == "minilm" else _vit(a, target_goal)
    tgt = dataclasses.replace(get_target("cpu"), threads=a.threads)
    out = {} if a.latency_only else _bench_block(name, a, w, tgt, _variants(name, target_goal))
    print(f"[{name}] latency budget", flush=True)
    out["latency_budget"] = _bench_block(name, a, w, tgt, _latency_variants(name, target_goal))
    _latency_summary(out["latency_budget"])
    return out


def _bench_block(name, a, w, tgt, variants):

    def build(pipeline):
        t0 = time.perf_counter()
        opt = pared.optimize(w["model"], w["example"], target=tgt, pipeline=pipeline, calibration=w["calibration"],
                             allow_fidelity_loss=True, bench_repeats=0)
        return opt, time.perf_counter() - t0

    print(f"[{name}] building: ORT fp32", flush=True)
    fp32, _ = build(None)
    built = {}
    for vname, pipe in variants.items():
        print(f"[{name}] building: {vname}", flush=True)
        built[vname] = build(pipe)

    def artifact(opt):
        ex = opt.executor
        return lambda *xs: ex.run_flat(*[np.asarray(x) for x in xs])[0]
    runners = {"torch_eager_fp32": w["eager"], "ort_fp32": artifact(fp32)}
    runners.update({k: artifact(opt) for k, (opt, _) in built.items()})

    print(f"[{name}] fidelity", flush=True)
    outs = {k: w["run_all"](fn) for k, fn in runners.items()}
    ref = outs["torch_eager_fp32"]
    fidelity = {k: w["fidelity"](ref, o) for k, o in outs.items() if k != "torch_eager_fp32"}

    print(f"[{name}] timing {a.repeats} alternating rounds", flush=True)
    args = w["timed_args"]
    sp = side_by_side({k: (lambda f=f: f(*args)) for k, f in runners.items()}, repeats=a.repeats, warmup=2)
    med = sp["median_s"]
    speed = {k: {"median_ms": round(med[k] * 1e3, 2), "min_ms": round(sp["min_s"][k] * 1e3, 2),
                 "vs_eager": round(med["torch_eager_fp32"] / med[k], 3),
                 "vs_ort_fp32": round(med["ort_fp32"] / med[k], 3)} for k in runners}

    quant = {}
    for k, (opt, secs) in built.items():
        g = opt._manifest["graphs"]["main"]
        entry = {"build_s": round(secs, 1), "ort_kernels": (g.get("int8") or {}).get("integer_ops"),
                 "dq_into_float_matmul": len((g.get("int8") or {}).get("dq_into_float_matmul", [])),
                 "export_check_rel_l2": (g.get("check") or {}).get("rel_l2"),
                 "onnx_bytes": sum(os.path.getsize(os.path.join(opt._staging, f)) for f in g["files"])}
        recs = opt.program.records
        if "MixedPrecisionPlan" in recs:
            p = recs["MixedPrecisionPlan"]
            entry.update({"objective": p.objective, "linear_weight_fraction": round(p.fraction, 4),
                "budget_fraction": round(p.budget_bytes / p.fp32_bytes, 4) if p.objective == "weight_bytes" else
                round(p.budget_latency_s / p.fp32_latency_s, 4), "fp32_linear_bytes": p.fp32_bytes, "bytes": p.bytes,
                "predicted_layer_latency_fraction": None if p.latency_fraction is None else round(
                    p.latency_fraction, 4),
                "fp32_layer_latency_ms": None if p.fp32_latency_s is None else round(p.fp32_latency_s * 1e3, 3),
                "layer_latency_ms": None if p.latency_s is None else round(p.latency_s * 1e3, 3),
                "formats": {f: sum(x.format == f for x in p.layers) for f in ("w4", "w8", "w8a8", "fp32")},
                "predicted_rel_l2": p.predicted_rel_l2, "measured_on_calibration": dict(p.measured),
                "target": dict(p.target), "target_met_on_calibration": p.target_met,
                "probes": [list(x) for x in p.probes],
                "layers": {x.layer: x.format for x in p.layers}})
            lat = recs.get("LatencyProfile")
            if lat is not None:          # what uniform W8A8 would take on the same profile
                f32 = sum(x.cost("fp32") for x in lat.layers)
                entry["all_w8a8_layer_latency_fraction"] = round(sum(
                    x.cost("w8a8" if "w8a8" in x.formats else "fp32") for x in lat.layers) / f32, 4) if f32 else None
        else:
            lay = []
            if "QuantPlan" in recs:
                lay = [(lq.in_features, lq.out_features, 8) for lq in recs["QuantPlan"].layers]
            if "WeightQuantPlan" in recs:
                lay += [(lq.in_features, lq.out_features, 4) for lq in recs["WeightQuantPlan"].layers]
            from pared.passes.quant.common import quantized_weight_bytes
            q = sum(quantized_weight_bytes(k, n, b, 32) for k, n, b in lay)
            f = sum(4 * k * n for k, n, _ in lay)
            entry.update({"layers_quantized": len(lay), "linear_weight_fraction": round(q / f, 4) if f else None})
        quant[k] = entry
    fp32_bytes = sum(os.path.getsize(os.path.join(fp32._staging, f)) for f in fp32._manifest["graphs"]["main"]["files"])
    for k in runners:
        fid = fidelity.get(k, {})
        print(f"[{name}] {k:26s} {speed[k]['median_ms']:8.1f} ms  x{speed[k]['vs_eager']:.2f} eager  "
              f"x{speed[k]['vs_ort_fp32']:.2f} ORT fp32  {json.dumps({a: round(b, 4) for a, b in fid.items()})}  "
              f"bytes {quant.get(k, {}).get('linear_weight_fraction')}", flush=True)
    block = {"shape": w["shape"], "speed": speed, "repeats": sp["repeats"], "fidelity": fidelity, "quant": quant,
             "onnx_bytes_fp32": fp32_bytes}
    lats = [o.program.records["LatencyProfile"] for o, _ in built.values() if "LatencyProfile" in o.program.records]
    if lats:                  # the per-layer table the latency budgets were solved on (one per variant; same shapes)
        lat = lats[0]
        block["latency_profile"] = {
            "target": lat.target, "threads": lat.threads, "repeats": lat.repeats, "shapes": lat.shapes,
            "layers": len(lat.layers),
            "by_shape_ms": {f"{x.in_features}x{x.out_features} rows {x.tokens}": {
                **{f: round(t * 1e3, 4) for f, t in zip(x.formats, x.latency_s)},
                "overhead": round(x.overhead_s * 1e3, 4)} for x in {x.shape: x for x in lat.layers}.values()}}
    return block


def _latency_summary(block: dict) -> None:
    """Predicted vs measured latency fractions of the latency-budget variants, in place. Measured:
    the artifact's median over ORT fp32's (same rounds). Predicted: for the layers, the choice's
    LatencyProfile sum over fp32's (what the DP bounds); for the whole model, two ways:
      from_profile_ms: ORT fp32's median with the layers' fp32 sum (absolute ms) replaced by the
        choice's. The profile is timed minutes apart from the model, so on a loaded machine its
        absolute level drifts (the layers' share of the model came out 0.44 and 0.79 for minilm in
        two profiles of one run);
      scaled_by_int8_all: the layers' share of the model inferred from uniform W8A8 in the same
        rounds, share = (1 - its measured fraction) / (1 - its predicted layer fraction), then
        1 - share x (1 - predicted layer fraction): ratios only, no absolute times."""
    t32 = block["speed"]["ort_fp32"]["median_ms"]
    m8 = block["speed"]["pared_int8_all"]["median_ms"] / t32 if "pared_int8_all" in block["speed"] else None
    rows = {}
    for k, q in block["quant"].items():
        if q.get("layer_latency_ms") is None:
            continue
        f32, got, p = q["fp32_layer_latency_ms"], q["layer_latency_ms"], q["predicted_layer_latency_fraction"]
        t = block["speed"][k]["median_ms"]
        p8 = q.get("all_w8a8_layer_latency_fraction")
        share = (1 - m8) / (1 - p8) if m8 is not None and p8 is not None and p8 < 1 else None
        rows[k] = {"formats": q["formats"], "budget_fraction": q["budget_fraction"],
                   "predicted_layer_fraction": p,
                   "measured_model_fraction": round(t / t32, 4),
                   "predicted_model_fraction_from_profile_ms": round((t32 - f32 + got) / t32, 4),
                   "fp32_layers_share_of_model_from_profile_ms": round(f32 / t32, 4),
                   "predicted_model_fraction_scaled_by_int8_all": None if share is None else round(
                       1 - share * (1 - p), 4),
                   "fp32_layers_share_of_model_from_int8_all": None if share is None else round(share, 4),
                   "speed_vs_ort_fp32": block["speed"][k]["vs_ort_fp32"],
                   "fidelity": block["fidelity"].get(k)}
        print(f"  {k}: {rows[k]}", flush=True)
    block["latency_summary"] = rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", nargs="+", default=["minilm", "vit_mnist"])
    ap.add_argument("--batch", type=int, default=8, help="minilm batch")
    ap.add_argument("--seq", type=int, default=128, help="minilm sequence length")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--latency-only", action="store_true",
                    help="run only the latency-budget block; keep the rest of the results file")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "quant_mixed.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    results = {}
    if os.path.exists(a.out):
        with open(a.out) as f:
            results = json.load(f).get("workloads", {})
    for name in a.workloads:
        results[name] = {**results.get(name, {}), **bench(name, a)} if a.latency_only else bench(name, a)
    import onnxruntime
    out = {
        "what": "mixed precision (quant_sensitivity + mixed_precision: 4 / 8 / 32 bits per linear layer) vs "
                "uniform int8 / int4 and fp32, real weights",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": a.threads,
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "ort_spinning": "off",
                    "load_note": "2 cores shared with other jobs; ratios come from the same alternating rounds",
                    "load_average": list(os.getloadavg()), "onnxruntime": onnxruntime.__version__,
                    "torch": torch.__version__},
        "targets": {"linear_weight_fraction": BUDGET, "minilm_cosine_min": 0.995, "vit_top1_agreement": 0.995},
        "weight_fraction_note": "linear_weight_fraction: the linear layers' weight bytes (codes + scales) over "
                                "their fp32 bytes; embeddings, norms and biases are not quantized by these passes",
        "workloads": results,
        "total_s": round(time.time() - t0, 1),
    }
    write_results(a.out, out, indent=2, default=str)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
