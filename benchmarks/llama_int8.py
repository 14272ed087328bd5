"""Static INT8 of the 4-layer transformers Llama (examples/llama, examples/pipelines/llama_int8.yaml)
against its fp32 lowering and eager PyTorch, in one process.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/llama_int8.py [--repeats 15] [--threads 1]

Builds the plain fp32 ORT artifact and the pipeline's INT8 artifact, times eager, fp32 and INT8 on
the example batch (input_ids [2, 32]), alternating, threads fixed, median of rounds, and judges the
INT8 logits against fp32 eager on the held-out batches (examples/llama/model.py held_out: ids the
calibration never saw): top-1 agreement per position, the smallest and mean per-position cosine,
relative L2. The model is random-init (nothing downloads), so its logits are nearly flat: top-1
is the strictest of these figures. Writes benchmarks/results/llama_int8.json.
"""
from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pared  # noqa: E402
from pared.backends.executor import Executor  # noqa: E402
from pared.bench import write_results  # noqa: E402
from pared.fidelity import side_by_side  # noqa: E402
from pared.pipeline import build_passes, load_pipeline  # noqa: E402
from pared.workloads import EXAMPLES, example_module  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "llama_int8.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    M = example_module("llama", "model.py")
    model, example = M.build_model(), M.example_inputs()
    spec = load_pipeline(os.path.join(EXAMPLES, "pipelines", "llama_int8.yaml"))
    with tempfile.TemporaryDirectory() as tmp:
        arts = {}
        for label, passes in (("fp32", []), ("int8", build_passes(spec))):
            print(f"building {label}", flush=True)
            opt = pared.optimize(model, example, target="cpu", pipeline=passes, calibration=M.quant_calibration(),
                                 bench_repeats=0, allow_fidelity_loss=True)
            arts[label] = Executor(opt.save(os.path.join(tmp, label)), threads=a.threads)
        ids = example[0].numpy()

        def eager():
            with torch.no_grad():
                model(*example)
        runs = {"eager": eager, "fp32": lambda: arts["fp32"](ids), "int8": lambda: arts["int8"](ids)}
        print(f"timing, {a.repeats} alternating rounds", flush=True)
        timing = side_by_side(runs, repeats=a.repeats, warmup=2)
        ref, got = [], []
        with torch.no_grad():
            for x in M.held_out():
                y = model(x)
                ref.append(y.reshape(-1, y.shape[-1]).double().numpy())
                got.append(np.asarray(arts["int8"](x.numpy()), np.float64).reshape(ref[-1].shape))
    ref, got = np.concatenate(ref), np.concatenate(got)
    cos = np.sum(ref * got, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    med = timing["median_s"]
    out = {"what": "4-layer transformers Llama (random init), static INT8 (llama_int8.yaml) vs fp32, ORT CPU; "
                   "time on the example batch [2, 32], alternating; fidelity vs fp32 eager on held-out ids",
           "threads": a.threads, "repeats": a.repeats,
           "median_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
           "int8_vs_fp32_artifact": med["fp32"] / med["int8"], "int8_vs_eager": med["eager"] / med["int8"],
           "fp32_artifact_vs_eager": med["eager"] / med["fp32"],
           "fidelity": {"positions": int(ref.shape[0]),
                        "top1_agreement": float(np.mean(ref.argmax(1) == got.argmax(1))),
                        "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                        "rel_l2": float(np.linalg.norm(got - ref) / np.linalg.norm(ref))},
           "timing": timing}
    print({k: v for k, v in out.items() if k != "timing"}, flush=True)
    write_results(a.json, out)


if __name__ == "__main__":
    main()
