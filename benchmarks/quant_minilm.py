"""INT8 (`quantize_linears`, static and dynamic) on all-MiniLM-L6-v2 (real weights),
side by side with torch eager fp32, pared's plain ORT fp32 lowering and the peers,
in one process. `pared_int8` is examples/pipelines/minilm_int8.yaml (its passes;
the calibration below). pared variants run softmax_guard_elimination first (torch's
fully-masked-row guard; `pared_int8_guarded` is the same pipeline without it and
`exp_pared_int8_guard_cut_by_hand` its ONNX file with the guard cut out by hand, a
check on the pass); `pared_int8_matmuls` also quantizes attention's two matmuls;
`pared_int8_ffn_in_no_outliers` drops the FFN input's outlier channels;
`pared_int8_prev` is the pipeline before outlier channels (SmoothQuant 0.5 on every
layer, layer 0's FFN output fp32) on the previous 9-sentence calibration, and
`pared_int8_prev_cal64` the same on the 64 sentences. Every ORT runner leaves out the
`cpu` target's slow fusions (SkipLayerNormFusion); `ort_fp32_all_fusions` and
`pared_int8_all_fusions` run the ort_fp32 / pared_int8 files with all of them on.
Peers (their files run in sessions like pared's):

    ort_quantize_dynamic          ORT quantize_dynamic, per-channel S8 weights
    ort_quantize_static_matmul    ORT quantize_static, QDQ, U8S8 per-channel, MatMul only
    ort_quantize_static_default   the same with ORT's default op types (everything it can)
    torchao_pt2e_compile          torchao PT2E static INT8 (X86InductorQuantizer) + torch.compile,
                                  only when torchao is installed (skipped with a note otherwise:
                                  `.venv/bin/pip install --no-deps torchao==0.18.0`, which keeps torch
                                  2.13.0; measured with it on 2026-12-01)
    tvm_fp32 / tvm_int8 / tvm_dynamic   pared's TVM lowering (with --tvm; untuned)

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/quant_minilm.py \
        [--batch 8] [--seq 128] [--threads 1] [--repeats 15] [--tvm] [--no-peer]

Speed: one batch (batch x seq tokens) per call; every round calls each runner once
in rotating order (pared.fidelity.side_by_side), medians compared, so load from
other processes hits all runners alike. Fidelity: the whole 213-sentence corpus
embedded by each runner vs. eager fp32: per-sentence cosine (min / mean) and
nearest-neighbour agreement (pared.workloads.MiniLMWorkload.fidelity).
Calibration: the 64 sentences of examples/minilm/calibration.txt (none in the
corpus), 8 batches; `pared_int8_prev` keeps the previous one, the example sentences
of examples/minilm/model.py that are not in the corpus (9 of 16, 2 batches).
Writes benchmarks/results/quant_minilm.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PIPELINE = os.path.join(HERE, "..", "examples", "pipelines", "minilm_int8.yaml")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pared  # noqa: E402
from pared.fidelity import side_by_side  # noqa: E402
from pared.targets import get_target  # noqa: E402
from pared.workloads import example_module, get_workload  # noqa: E402
from pared.bench import write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-peer", action="store_true", help="skip the peers (ORT quantize_dynamic/static, torchao)")
    ap.add_argument("--tvm", action="store_true", help="also build and time the TVM lowerings (untuned)")
    ap.add_argument("--tvm-calls", type=int, default=2, help="timed calls per TVM lowering")
    ap.add_argument("--profile", type=int, default=0, metavar="CALLS",
                    help="profile ORT fp32 / pared_int8 / pared_dynamic by op type over this many calls")
    ap.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                    help="build and time only these pared variants (default: all; pared_int8 is always built)")
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
    def batched(sentences: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n = -(-len(sentences) // a.batch) * a.batch            # cycled to whole batches
        cycled = [sentences[i % len(sentences)] for i in range(n)]
        return [tokens(cycled[i:i + a.batch]) for i in range(0, n, a.batch)]

    # calibrate on the 64 sentences of calibration.txt (none in the corpus)
    cal_sentences = mod.calibration_sentences()
    assert not set(cal_sentences) & set(corpus), "calibration sentences must stay out of the corpus"
    calibration = batched(cal_sentences)
    # the previous calibration: the example sentences that are not in the corpus (9)
    prev_sentences = [s for s in list(mod.HELD_OUT) + list(mod.SENTENCES) if s not in set(corpus)]
    prev_calibration = batched(prev_sentences)
    example = batches[0]
    target = dataclasses.replace(get_target("cpu"), threads=a.threads)

    def build(pipeline, cal=None):
        t0 = time.perf_counter()
        opt = pared.optimize(model, example, target=target, pipeline=pipeline,
                             calibration=calibration if cal is None else cal,
                             allow_fidelity_loss=True, bench_repeats=0)
        return opt, time.perf_counter() - t0

    print("building: ORT fp32 (plain lowering)", flush=True)
    fp32, fp32_s = build(None)
    # torch's fully-masked-row softmax guard, removed by softmax_guard_elimination under the
    # contract that every attention mask keeps a token ([CLS]); every pared variant but
    # pared_int8_guarded runs it first
    guard = [{"softmax_guard_elimination": {"assume_mask_keeps_a_key": True}}]
    # the pipeline file's passes, as specs the variants below change
    from pared.pipeline import load_pipeline
    main = [{p.name: dict(p.options)} for p in load_pipeline(PIPELINE).passes]

    def with_quant(**changes):
        return [{k: ({**v, **changes} if k == "quantize_linears" else v) for k, v in p.items()} for p in main]
    prev = guard + [{"quantize_linears": {"method": "minmax", "smooth": 0.5,
                                          "exclude": ["bert.encoder.layer.0.output.dense"]}}]
    variants = {
        # examples/pipelines/minilm_int8.yaml: SmoothQuant 0.5 and 4 outlier channels in float on the
        # LayerNorm-fed layers, none on attention's output projection, 32 outlier channels (no
        # smoothing) on the FFN output projections (post-GELU, 1536 channels)
        "pared_int8": PIPELINE,
        # the previous pipeline (every layer smoothed 0.5, layer 0's FFN output fp32), previous calibration
        "pared_int8_prev": (prev, prev_calibration),
        "pared_int8_prev_cal64": prev,
        # the pipeline without the FFN input's 4 outlier channels (SmoothQuant 0.5 alone there)
        "pared_int8_ffn_in_no_outliers": with_quant(overrides=[
            {"layers": "bert.encoder.layer.*.attention.output.dense", "smooth": None},
            {"layers": "bert.encoder.layer.*.output.dense", "smooth": None, "outliers": 32}]),
        # where the target takes 7-bit weights (no VNNI / AMX), the pipeline without keep_8bit: every
        # layer 7-bit on the U8S8 kernels (faster) instead of 8-bit U8U8; the same as pared_int8 elsewhere
        "pared_int8_7bit": with_quant(keep_8bit=False),
        # the pipeline with attention's q.k^T and attn.v quantized too (uint8 x int8, integer kernels)
        "pared_int8_matmuls": with_quant(matmuls=True),
        # the pipeline without softmax_guard_elimination
        "pared_int8_guarded": [p for p in main if "softmax_guard_elimination" not in p],
        # fidelity first: every FFN output projection (the layers whose GELU inputs carry the outliers) fp32
        "pared_int8_ffn_out_fp32": guard + [{"quantize_linears": {"method": "minmax", "smooth": 0.5,
                                                                  "exclude": ["bert.encoder.layer.*.output.dense"]}}],
        "pared_int8_all_minmax": guard + [{"quantize_linears": {"method": "minmax"}}],
        "pared_int8_all_entropy": guard + [{"quantize_linears": {"method": "entropy"}}],
        "pared_dynamic": guard + [{"quantize_linears": {"mode": "dynamic"}}],
        # the guard pass alone on fp32
        "pared_fp32_no_guard": guard,
    }
    if a.variants:
        unknown = sorted(set(a.variants) - set(variants))
        if unknown:
            ap.error(f"unknown variant(s) {unknown}; known: {', '.join(variants)}")
        variants = {k: v for k, v in variants.items() if k == "pared_int8" or k in a.variants}
    built = {}
    for name, pipe in variants.items():
        print(f"building: {name}", flush=True)
        built[name] = build(*pipe) if isinstance(pipe, tuple) else build(pipe)
    tvm_built = {}
    if a.tvm:
        tvm_target = dataclasses.replace(get_target("tvm-cpu"), threads=a.threads)
        for name, pipe in (("tvm_fp32", None), ("tvm_int8", variants["pared_int8"]),
                           ("tvm_dynamic", variants["pared_dynamic"])):
            print(f"building: {name}", flush=True)
            t0 = time.perf_counter()
            opt = pared.optimize(model, example, target=tvm_target, pipeline=pipe, calibration=calibration,
                                 allow_fidelity_loss=True, bench_repeats=0)
            tvm_built[name] = (opt, time.perf_counter() - t0)

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

    # a check on the pass: the guarded int8 file with the guard (Where(guard, 0, Softmax(x)) and its
    # Equal/Not/Cast/ReduceMax) cut out of the ONNX file by hand; should time like pared_int8
    if "pared_int8_guarded" in built:
        runners["exp_pared_int8_guard_cut_by_hand"], _ = _ort_session(
            _strip_safe_softmax(os.path.join(built["pared_int8_guarded"][0]._staging,
                                             built["pared_int8_guarded"][0]._manifest["graphs"]["main"]["file"])),
            a.threads)
    # what the `cpu` target's ort_disabled_optimizers (SkipLayerNormFusion) buys: the same two files
    # with every ORT fusion on
    for name, opt in (("ort_fp32_all_fusions", fp32), ("pared_int8_all_fusions", built["pared_int8"][0])):
        runners[name], _ = _ort_session(os.path.join(opt._staging, opt._manifest["graphs"]["main"]["file"]),
                                        a.threads, disabled=())
    skipped: dict[str, str] = {}
    peer_kernels: dict[str, dict] = {}
    if not a.no_peer:
        print("building: ORT quantize_dynamic peer", flush=True)
        runners["ort_quantize_dynamic"], peer_kernels["ort_quantize_dynamic"] = _ort_dynamic_peer(fp32, a.threads)
        for name, op_types in (("ort_quantize_static_matmul", ["MatMul"]), ("ort_quantize_static_default", None)):
            print(f"building: {name} peer", flush=True)
            runners[name], peer_kernels[name] = _ort_static_peer(fp32, a.threads, calibration, op_types)
        try:
            import torchao  # noqa: F401
        except ImportError:
            skipped["torchao_pt2e_compile"] = ("torchao is not installed (pip install --no-deps "
                                               "torchao==0.18.0 adds it without pulling another torch)")
        else:
            print("building: torchao PT2E + torch.compile peer", flush=True)
            try:
                runners["torchao_pt2e_compile"] = _torchao_peer(model, example, calibration)
            except Exception as e:  # a peer that fails to build is reported, not fatal
                skipped["torchao_pt2e_compile"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"

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

    # -- TVM (untuned: its default schedules make a call take seconds to a minute, so each
    # lowering is timed over a few calls on the example batch, after the ORT rounds)
    tvm_report = {}
    if tvm_built:
        print("timing the TVM lowerings", flush=True)
        ref_batch = runners["torch_eager_fp32"](xn, mn)
        ort_int8 = {"tvm_int8": runners["pared_int8"](xn, mn), "tvm_dynamic": runners["pared_dynamic"](xn, mn)}
        for name, (opt, _) in tvm_built.items():
            fn = artifact(opt)
            times, out = [], None
            for _ in range(a.tvm_calls):
                t0 = time.perf_counter()
                out = fn(xn, mn)
                times.append(time.perf_counter() - t0)
            fid = wl.fidelity(ref_batch, out)
            tvm_report[name] = {"median_s": round(float(np.median(times)), 3), "calls": len(times),
                                "cosine_min_vs_eager": fid["cosine_min"], "cosine_mean_vs_eager": fid["cosine_mean"],
                                "lowering": opt._manifest["graphs"]["main"].get("int8")}
            if name in ort_int8:
                o = ort_int8[name]
                tvm_report[name]["rel_l2_vs_ort_int8"] = float(np.linalg.norm(out - o) / np.linalg.norm(o))
        fp = tvm_report["tvm_fp32"]["median_s"]
        for name, r in tvm_report.items():
            r["vs_tvm_fp32"] = round(fp / r["median_s"], 3)
        for name, ort_name in (("tvm_int8", "pared_int8"), ("tvm_dynamic", "pared_dynamic")):
            tvm_report[name]["vs_ort_int8"] = round(med[ort_name] / tvm_report[name]["median_s"], 4)

    profile = {}
    if a.profile:
        print("profiling ORT sessions by op type", flush=True)
        for name, opt in [(n, o) for n, o in (("ort_fp32", fp32), ("pared_int8", built["pared_int8"][0]))] + \
                [(n, built[n][0]) for n in ("pared_int8_guarded", "pared_dynamic") if n in built]:
            profile[name] = _profile_ops(os.path.join(opt._staging, opt._manifest["graphs"]["main"]["file"]),
                                         a.threads, (xn, mn), a.profile)

    int8_report = {name: {"plan_layers": len(opt.program.records["QuantPlan"].layers),
                          "ort_kernels": opt._manifest["graphs"]["main"].get("int8"),
                          "export_check": opt._manifest["graphs"]["main"].get("check"),
                          "build_s": round(s, 1)} for name, (opt, s) in {**built, **tvm_built}.items()
                   if "QuantPlan" in opt.program.records}
    int8_report.update({name: {"ort_kernels": k} for name, k in peer_kernels.items()})
    import onnxruntime
    results = {
        "what": "all-MiniLM-L6-v2 sentence embeddings, real weights; INT8 via pared quantize_linears (static, "
                "dynamic) on ORT and TVM, with ORT's and torchao's quantizers as peers",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": a.threads,
                    "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "ort_spinning": "off",
                    "load_note": "the machine may be shared (load_average: this process adds 1); ratios come "
                                 "from the same alternating rounds and stay comparable, absolute times do not",
                    "load_average": list(os.getloadavg()), "onnxruntime": onnxruntime.__version__,
                    "torch": torch.__version__},
        "shape": {"batch": a.batch, "seq": a.seq, "sentences": len(corpus),
                  "calibration": f"{len(cal_sentences)} sentences not in the corpus (examples/minilm/"
                                 f"calibration.txt), {len(calibration)} batches",
                  "calibration_prev": f"{len(prev_sentences)} sentences not in the corpus, "
                                      f"{len(prev_calibration)} batches (pared_int8_prev)"},
        "speed": speed, "repeats": sp["repeats"], "fidelity": fidelity, "int8": int8_report,
        "skipped": skipped, "tvm": tvm_report, "profile": profile,
        "targets": {"vs_eager": 2.7, "vs_ort_fp32": 2.0, "cosine_min": 0.99, "nn_agreement": 0.95},
        "total_s": round(time.time() - t_start, 1),
    }
    write_results(a.out, results, indent=2)
    for n in runners:
        fid = fidelity.get(n, {})
        print(f"{n:24s} {speed[n]['median_ms']:8.1f} ms  x{speed[n]['vs_eager']:.2f} vs eager  "
              f"x{speed[n]['vs_ort_fp32']:.2f} vs ORT fp32  cos min {fid.get('cosine_min', 1):.4f} "
              f"mean {fid.get('cosine_mean', 1):.4f}  NN {fid.get('rank_agreement', 1):.3f}")
    for n, r in tvm_report.items():
        print(f"{n:24s} {r['median_s'] * 1e3:8.1f} ms  x{r['vs_tvm_fp32']:.2f} vs TVM fp32  "
              + (f"x{r['vs_ort_int8']:.4f} vs ORT int8  rel L2 vs ORT int8 {r['rel_l2_vs_ort_int8']:.2e}  "
                 if "vs_ort_int8" in r else "") + f"cos min {r['cosine_min_vs_eager']:.4f} (example batch)")
    for n, why in skipped.items():
        print(f"{n:24s} skipped: {why}")
    print(f"wrote {a.out}")


def _ort_session(path: str, threads: int, disabled: tuple[str, ...] | None = None):
    """A session as pared's runtime builds one for the `cpu` target (extended level, no
    spinning, its slow fusions left out) and the integer-kernel report of the file (op
    counts after ORT's optimizations), so that the peers' files run as pared's do.
    `disabled` replaces the target's ort_disabled_optimizers."""
    from pared.backends.onnxruntime.int8_check import integer_kernel_report
    from pared.backends.onnxruntime.runtime import make_session
    target = dict(get_target("cpu").to_json(), threads=threads)
    if disabled is not None:
        target["ort_disabled_optimizers"] = list(disabled)
    sess = make_session(path, target)
    names = [i.name for i in sess.get_inputs()]
    rep = integer_kernel_report(path, target)
    return (lambda x, m: sess.run(None, dict(zip(names, (np.asarray(x), np.asarray(m)))))[0]), rep


def _profile_ops(path: str, threads: int, feed, calls: int) -> dict:
    """ORT's own profiler on `calls` runs of one batch: kernel time per op type (ms per
    call, share of the kernel total, nodes), largest first."""
    import collections

    from pared.backends.onnxruntime.runtime import make_session
    sess = make_session(path, dict(get_target("cpu").to_json(), threads=threads),
                        profile_prefix=os.path.join(tempfile.mkdtemp(prefix="pared-prof-"), "ort"))
    names = [i.name for i in sess.get_inputs()]
    sess.run(None, dict(zip(names, feed)))                      # warm-up, also profiled: skipped below
    for _ in range(calls):
        sess.run(None, dict(zip(names, feed)))
    from pared.backends.profile import ort_kernel_times
    total, count = collections.Counter(), collections.Counter()
    for key, (n, ms) in ort_kernel_times(sess.end_profiling(), skip_runs=1).items():
        total[key.split(":", 1)[0]] += ms * 1e3
        count[key.split(":", 1)[0]] += n
    all_us = sum(total.values())
    return {op: {"ms_per_call": round(us / calls / 1e3, 2), "share": round(us / all_us, 3),
                 "nodes": count[op] // calls} for op, us in total.most_common()}


def _strip_safe_softmax(src: str) -> str:
    """A copy of the ONNX file with every Where(guard, 0, Softmax(x)) replaced by the Softmax
    (and the guard's now-dead ops dropped)."""
    import onnx

    m = onnx.load(src)
    g = m.graph
    producer = {o: n for n in g.node for o in n.output}
    alias = {}
    for n in list(g.node):
        if n.op_type == "Where" and n.input[2] in producer and producer[n.input[2]].op_type == "Softmax":
            alias[n.output[0]] = n.input[2]
            g.node.remove(n)
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in alias:
                n.input[k] = alias[i]
    live = {o.name for o in g.output}
    for n in reversed(list(g.node)):
        if any(o in live for o in n.output):
            live.update(n.input)
        else:
            g.node.remove(n)
    dst = os.path.join(tempfile.mkdtemp(prefix="pared-nosafe-"), "main.onnx")
    onnx.save(m, dst)
    return dst


def _ort_dynamic_peer(fp32, threads: int):
    """ORT's own quantize_dynamic (per-channel, S8 weights) on pared's fp32 ONNX file."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    entry = fp32._manifest["graphs"]["main"]
    dst = os.path.join(tempfile.mkdtemp(prefix="pared-qdyn-"), "dyn.onnx")
    quantize_dynamic(os.path.join(fp32._staging, entry["file"]), dst, per_channel=True, weight_type=QuantType.QInt8)
    return _ort_session(dst, threads)


def _ort_static_peer(fp32, threads: int, calibration, op_types):
    """ORT's own quantize_static (QDQ, U8 activations, S8 per-channel weights, min-max
    calibration on pared's calibration batches) on pared's fp32 ONNX file; `op_types`
    None: ORT's default (every op type it can quantize)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    entry = fp32._manifest["graphs"]["main"]
    names = [i["name"] for i in entry["inputs"]]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([dict(zip(names, (x.numpy(), m.numpy()))) for x, m in calibration])

        def get_next(self):
            return next(self.it, None)

    dst = os.path.join(tempfile.mkdtemp(prefix="pared-qstat-"), "static.onnx")
    kw = {} if op_types is None else {"op_types_to_quantize": list(op_types)}
    quantize_static(os.path.join(fp32._staging, entry["file"]), dst, Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True, **kw)
    return _ort_session(dst, threads)


def _torchao_peer(model, example, calibration):
    """torchao PT2E static INT8 with the X86 Inductor quantizer, then torch.compile (only
    reached when torchao is installed)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    q = x86.X86InductorQuantizer()
    q.set_global(x86.get_default_x86_inductor_quantization_config())
    gm = torch.export.export(model, tuple(example), strict=False).module()
    prepared = prepare_pt2e(gm, q)
    with torch.no_grad():
        for x, m in calibration:
            prepared(x, m)
    compiled = torch.compile(convert_pt2e(prepared))

    def run(x, m):
        with torch.no_grad():
            return compiled(torch.as_tensor(x), torch.as_tensor(m)).numpy()
    return run


if __name__ == "__main__":
    main()
