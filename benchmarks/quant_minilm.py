"""Static INT8 (`quantize_linears`) on all-MiniLM-L6-v2 (real weights), side by side
with torch eager fp32, pared's plain ORT fp32 lowering and ORT's own
`quantize_dynamic` as a peer, in one process.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/quant_minilm.py \
        [--batch 8] [--seq 128] [--threads 1] [--repeats 15]

Speed: one batch (batch x seq tokens) per call; every round calls each runner once
in rotating order (pared.fidelity.side_by_side), medians compared, so load from
other processes hits all runners alike. Fidelity: the whole 213-sentence corpus
embedded by each runner vs. eager fp32: per-sentence cosine (min / mean) and
nearest-neighbour agreement (pared.workloads.MiniLMWorkload.fidelity).
Calibration uses the example sentences of examples/minilm/model.py that are not
in the corpus (9 of 16). Writes benchmarks/results/quant_minilm.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pared  # noqa: E402
from pared.fidelity import side_by_side  # noqa: E402
from pared.targets import get_target  # noqa: E402
from pared.workloads import example_module, get_workload  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-peer", action="store_true", help="skip ORT quantize_dynamic")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "quant_minilm.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t_start = time.time()

    mod = example_module("minilm")
    wl = get_workload("minilm", batch=a.batch)
    model = wl.build()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(mod.model_dir())

    def tokens(sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        b = tok(sentences, padding="max_length", truncation=True, max_length=a.seq, return_tensors="pt")
        return b["input_ids"], b["attention_mask"]

    corpus = wl.corpus
    pad = (-len(corpus)) % a.batch
    ids, mask = tokens(corpus + corpus[:pad])
    batches = [(ids[i:i + a.batch], mask[i:i + a.batch]) for i in range(0, len(ids), a.batch)]
    # calibrate on the example sentences that are not in the corpus (cycled to whole batches)
    cal_sentences = [s for s in list(mod.HELD_OUT) + list(mod.SENTENCES) if s not in set(corpus)]
    n_cal = -(-len(cal_sentences) // a.batch) * a.batch
    cycled = [cal_sentences[i % len(cal_sentences)] for i in range(n_cal)]
    calibration = [tokens(cycled[i:i + a.batch]) for i in range(0, n_cal, a.batch)]
    example = batches[0]
    target = dataclasses.replace(get_target("cpu"), threads=a.threads)

    def build(pipeline):
        t0 = time.perf_counter()
        opt = pared.optimize(model, example, target=target, pipeline=pipeline, calibration=calibration,
                             allow_fidelity_loss=True, bench_repeats=0)
        return opt, time.perf_counter() - t0

    print("building: ORT fp32 (plain lowering)", flush=True)
    fp32, fp32_s = build(None)
    variants = {
        # the pipeline of examples/pipelines/minilm_int8.yaml: SmoothQuant alpha 0.5, the most sensitive
        # layer (layer 0's FFN output, whose input carries the largest outlier channels) left fp32
        "pared_int8": [{"quantize_linears": {"method": "minmax", "smooth": 0.5,
                                             "exclude": ["bert.encoder.layer.0.output.dense"]}}],
        "pared_int8_all_minmax": [{"quantize_linears": {"method": "minmax"}}],
        "pared_int8_all_percentile": [{"quantize_linears": {"method": "percentile", "percentile": 99.99}}],
    }
    built = {}
    for name, pipe in variants.items():
        print(f"building: {name}", flush=True)
        built[name] = build(pipe)

    runners = {}

    def eager_fn(x, m):
        with torch.no_grad():
            return model(torch.as_tensor(x), torch.as_tensor(m)).numpy()
    runners["torch_eager_fp32"] = eager_fn

    def artifact(opt):
        ex = opt.executor
        return lambda x, m: ex.run_flat(np.asarray(x), np.asarray(m))[0]
    runners["ort_fp32"] = artifact(fp32)
    for name, (opt, _) in built.items():
        runners[name] = artifact(opt)

    peer = None
    if not a.no_peer:
        print("building: ORT quantize_dynamic peer", flush=True)
        peer = _ort_dynamic_peer(fp32, a.threads)
        runners["ort_quantize_dynamic"] = peer

    # -- fidelity over the whole corpus
    print("embedding the corpus", flush=True)
    emb = {}
    for name, fn in runners.items():
        emb[name] = np.concatenate([np.asarray(fn(x.numpy(), m.numpy())) for x, m in batches])[:len(corpus)]
    ref = emb["torch_eager_fp32"]
    fidelity = {name: wl.fidelity(ref, e) for name, e in emb.items() if name != "torch_eager_fp32"}

    # -- speed, one batch per call, alternating rounds
    print(f"timing {a.repeats} alternating rounds", flush=True)
    xn, mn = example[0].numpy(), example[1].numpy()
    sp = side_by_side({n: (lambda f=f: f(xn, mn)) for n, f in runners.items()}, repeats=a.repeats, warmup=2)
    med = sp["median_s"]
    speed = {n: {"median_ms": round(med[n] * 1e3, 2), "min_ms": round(sp["min_s"][n] * 1e3, 2),
                 "max_ms": round(sp["max_s"][n] * 1e3, 2),
                 "vs_eager": round(med["torch_eager_fp32"] / med[n], 3),
                 "vs_ort_fp32": round(med["ort_fp32"] / med[n], 3)} for n in runners}

    int8_report = {name: {"plan_layers": len(opt.program.records["QuantPlan"].layers),
                          "ort_kernels": opt._manifest["graphs"]["main"].get("int8"),
                          "export_check": opt._manifest["graphs"]["main"].get("check"),
                          "build_s": round(s, 1)} for name, (opt, s) in built.items()}
    import onnxruntime
    results = {
        "what": "all-MiniLM-L6-v2 sentence embeddings, real weights; static INT8 via pared quantize_linears",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": a.threads,
                    "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "ort_spinning": "off",
                    "load_note": "2 cores shared with two other heavy jobs; ratios come from the same alternating "
                                 "rounds and stay comparable, absolute times do not",
                    "load_average": list(os.getloadavg()), "onnxruntime": onnxruntime.__version__,
                    "torch": torch.__version__},
        "shape": {"batch": a.batch, "seq": a.seq, "sentences": len(corpus),
                  "calibration": f"{len(cal_sentences)} sentences not in the corpus, {len(calibration)} batches"},
        "speed": speed, "repeats": sp["repeats"], "fidelity": fidelity, "int8": int8_report,
        "targets": {"vs_eager": 2.7, "vs_ort_fp32": 2.0, "cosine_min": 0.99, "nn_agreement": 0.95},
        "total_s": round(time.time() - t_start, 1),
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)
    for n in runners:
        fid = fidelity.get(n, {})
        print(f"{n:24s} {speed[n]['median_ms']:8.1f} ms  x{speed[n]['vs_eager']:.2f} vs eager  "
              f"x{speed[n]['vs_ort_fp32']:.2f} vs ORT fp32  cos min {fid.get('cosine_min', 1):.4f} "
              f"mean {fid.get('cosine_mean', 1):.4f}  NN {fid.get('rank_agreement', 1):.3f}")
    print(f"wrote {a.out}")


def _ort_dynamic_peer(fp32, threads: int):
    """ORT's own quantize_dynamic (per-channel, S8 weights) on pared's fp32 ONNX file."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src_dir = fp32._staging
    entry = fp32._manifest["graphs"]["main"]
    tmp = tempfile.mkdtemp(prefix="pared-qdyn-")
    dst = os.path.join(tmp, "dyn.onnx")
    quantize_dynamic(os.path.join(src_dir, entry["file"]), dst, per_channel=True, weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    sess = ort.InferenceSession(dst, sess_options=opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return lambda x, m: sess.run(None, dict(zip(names, (np.asarray(x), np.asarray(m)))))[0]


if __name__ == "__main__":
    main()
