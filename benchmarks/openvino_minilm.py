"""Which ONNX Runtime execution provider runs pared's int8 MiniLM fastest on this CPU:
ORT's own CPU kernels (MLAS) or the OpenVINO execution provider.

    .venv/bin/python benchmarks/openvino_minilm.py --openvino-python /tmp/ovenv/bin/python

`onnxruntime-openvino` replaces the `onnxruntime` package, so it lives in its own
virtual environment (no torch needed there: the Executor is torch-free):

    python3 -m venv /tmp/ovenv
    /tmp/ovenv/bin/pip install onnxruntime-openvino numpy pyyaml rich safetensors
    /tmp/ovenv/bin/pip install --no-deps -e .

Here (with torch) the script builds the fp32 and the static-int8 artifact of
all-MiniLM-L6-v2 (the minilm_int8.yaml pipeline; batch 8, sequence 128) and times
torch eager against them on ORT's CPU provider; then, in the OpenVINO venv, it
times the same two artifacts on the CPU provider and on the OpenVINO provider
(`pared.load(path, provider=...)`), alternating rounds, median, 1 thread,
OMP_WAIT_POLICY=PASSIVE, ORT spinning off. Ratios are only taken within one
process; the eager ratio chains through ORT-CPU fp32, measured in both.
Writes benchmarks/results/openvino_minilm.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))
PIPELINE = os.path.join(HERE, "..", "examples", "pipelines", "minilm_int8.yaml")

CHILD = r"""
import json, statistics, sys, time
import numpy as np
import onnxruntime as ort
from pared.backends.executor import Executor
from pared.bench import write_results  # noqa: E402
a = json.loads(sys.argv[1])
x = np.load(a["inputs"])
feed = [x["input_ids"], x["attention_mask"]]
runs, outs = {}, {}
for label, path in a["artifacts"].items():
    for prov in ("CPUExecutionProvider", "OpenVINOExecutionProvider"):
        if prov not in ort.get_available_providers():
            continue
        ex = Executor(path, threads=1, provider=prov)
        key = f"{label}/{prov.replace('ExecutionProvider', '')}"
        runs[key] = ex
        outs[key] = np.asarray(ex.run_flat(*feed)[0])
times = {k: [] for k in runs}
for r in range(a["repeats"]):
    keys = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]
    for k in keys:
        t = time.perf_counter(); runs[k].run_flat(*feed); times[k].append(time.perf_counter() - t)
print(json.dumps({"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
                  "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
                  "outputs": {k: v.tolist() for k, v in outs.items()}}))
"""


def cosine_rows(a, b):
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--openvino-python", required=True, help="python of a venv with onnxruntime-openvino and pared")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "openvino_minilm.json"))
    a = ap.parse_args()
    import numpy as np
    import torch
    import pared
    from pared.fidelity import side_by_side
    from pared.workloads import example_module, get_workload
    torch.set_num_threads(1)
    t_start = time.time()
    mod = example_module("minilm")
    wl = get_workload("minilm", batch=8)
    model = wl.build()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(mod.model_dir())

    def tokens(s):
        b = tok(s, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
        return b["input_ids"], b["attention_mask"]

    example = tokens(wl.corpus[:8])
    held = [s for s in list(mod.HELD_OUT) + list(mod.SENTENCES) if s not in set(wl.corpus)]
    calibration = [tokens([held[(i + j) % len(held)] for j in range(8)]) for i in range(0, len(held), 8)]
    work = tempfile.mkdtemp(prefix="pared-ov-")
    np.savez(os.path.join(work, "inputs.npz"), input_ids=example[0].numpy(), attention_mask=example[1].numpy())
    from pared.pipeline import load_pipeline
    int8 = [{p.name: dict(p.options)} for p in load_pipeline(PIPELINE).passes]
    pipelines = {"fp32": ["constant_folding"], "int8": int8}
    cal64 = mod.calibration_sentences()            # the pipeline file's calibration sentences, at sequence 128
    calibrations = {"fp32": calibration,
                    "int8": [tokens([cal64[(i + j) % len(cal64)] for j in range(8)]) for i in range(0, len(cal64), 8)]}
    arts, execs = {}, {}
    for label, pipe in pipelines.items():
        print(f"building {label}", flush=True)
        opt = pared.optimize(model, example, target="cpu", pipeline=pipe, calibration=calibrations[label],
                             allow_fidelity_loss=True, bench_repeats=0)
        arts[label] = opt.save(os.path.join(work, label))
        execs[label] = pared.load(arts[label], threads=1)
    feed = [example[0].numpy(), example[1].numpy()]
    with torch.no_grad():
        ref = model(*example).numpy()
    print("timing torch eager vs ORT CPU", flush=True)
    def eager():
        with torch.no_grad():                       # as quant_minilm times it: no autograd bookkeeping
            return model(*example)
    here = side_by_side({"eager": eager,
                         **{f"{k}/CPU": (lambda e=e: e.run_flat(*feed)) for k, e in execs.items()}},
                        repeats=a.repeats, warmup=1)
    print("timing CPU vs OpenVINO provider in the OpenVINO venv", flush=True)
    child = subprocess.run([a.openvino_python, "-c", CHILD, json.dumps(
        {"inputs": os.path.join(work, "inputs.npz"), "artifacts": arts, "repeats": a.repeats})],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if child.returncode:
        sys.exit(f"the OpenVINO venv run failed:\n{child.stderr[-2000:]}")
    ov = json.loads(child.stdout.strip().splitlines()[-1])
    med_here = {k: v * 1e3 for k, v in here["median_s"].items()}
    med_ov = ov["median_ms"]
    # eager / X = (eager / ORT-CPU fp32 here) * (ORT-CPU fp32 / X in the OpenVINO venv)
    eager_per_cpu_fp32 = med_here["eager"] / med_here["fp32/CPU"]
    result = {
        "model": "all-MiniLM-L6-v2, batch 8, sequence 128", "threads": 1,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "repeats": a.repeats,
        "cpu_flags": sorted({f for f in open("/proc/cpuinfo").read().split()
                             if f.startswith(("amx", "avx512_vnni", "avx512_bf16", "avx_vnni"))}),
        "this_venv": {"onnxruntime": __import__("onnxruntime").__version__, "median_ms": med_here},
        "openvino_venv": {"onnxruntime": ov["onnxruntime"], "providers": ov["providers"], "median_ms": med_ov},
        "speedup_vs_torch_eager": {k: eager_per_cpu_fp32 * med_ov["fp32/CPU"] / v for k, v in med_ov.items()},
        "speedup_vs_ort_cpu_fp32": {k: med_ov["fp32/CPU"] / v for k, v in med_ov.items()},
        "cosine_vs_torch_fp32": {k: {"min": float(cosine_rows(ref, np.array(v)).min()),
                                     "mean": float(cosine_rows(ref, np.array(v)).mean())}
                                 for k, v in ov["outputs"].items()},
        "wall_s": time.time() - t_start,
    }
    write_results(a.out, result, indent=1)
    print(json.dumps({k: result[k] for k in ("speedup_vs_torch_eager", "speedup_vs_ort_cpu_fp32",
                                             "cosine_vs_torch_fp32")}, indent=1))


if __name__ == "__main__":
    main()
