"""Each quantization pass's output on TVM (untuned, target tvm-cpu) next to ONNX
Runtime (target cpu), from the same rewritten Program, on one small synthetic
workload per pass:

    int4     quantize_weights_int4 (force) on a 4-layer MLP, 1024 wide, 8 rows
    mixed    quant_sensitivity + mixed_precision (w4 / w8 / w8a8 / fp32, a quarter of
             the fp32 weight bytes) on the same MLP
    tsq      timestep_quant (2 buckets, 8 calibration steps) on TinyDiT, dim 256,
             6 blocks, 64 tokens, batch 2: one sampler step per call
    expert   expert_quant (2 / 4 / 8 / fp32 experts, a fifth of the fp32 bytes) on
             TinyMoEDiT, dim 128, 64 tokens, batch 2

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/quant_tvm.py [--repeats 7]

Latency: per workload, the TVM and the ORT executor called alternately, each
round `calls` calls timed together; the median over rounds, in ms per call; 1
thread each (ORT not spinning). Also the fp32 (unquantized) Program on both
backends, so each backend's own speedup from the pass shows. Fidelity: relative
L2 of TVM vs ORT and of each vs eager fp32 on held-out inputs (the sampler loop's
final sample for tsq and expert). Artifact bytes: the model files on disk.
Writes benchmarks/results/quant_tvm.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from pared.backends.executor import Executor  # noqa: E402
from pared.ir.capture import capture  # noqa: E402
from pared.ir.transform import PassContext  # noqa: E402
from pared.registry import get_pass  # noqa: E402
from pared.targets import get_target  # noqa: E402
from pared.testing import TinyDiT, TinyMoEDiT, save_program, tiny_sampler_loop  # noqa: E402
from pared.bench import write_results  # noqa: E402

TVM_CPU = dict(get_target("tvm-cpu").to_json(), threads=1)
CPU = dict(get_target("cpu").to_json(), threads=1)


class MLP(nn.Module):
    def __init__(self, width: int = 1024, layers: int = 4):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(layers)])

    def forward(self, x):
        for i, lin in enumerate(self.layers):
            x = lin(x) if i == len(self.layers) - 1 else nn.functional.gelu(lin(x))
        return x


def _files(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f != "manifest.json")


def _rel(ref, got) -> float:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(np.linalg.norm(ref - got) / np.linalg.norm(ref))


def _np_loop(fn, x0: np.ndarray, steps: int) -> np.ndarray:
    x = x0.copy()
    for t in np.linspace(900, 0, steps, dtype=np.float32):
        x = x - np.float32(0.1) * fn(x, np.full((x.shape[0],), t, np.float32))
    return x


def _workloads():
    """name -> (model, example inputs, rewrite(program) -> program, sampler: bool)."""
    torch.manual_seed(0)
    mlp = MLP().eval()
    x = torch.randn(8, 1024)

    def int4(p):
        return get_pass("quantize_weights_int4")(force=True)(p, PassContext(target=get_target("cpu"))).program

    def mixed(p):
        g = torch.Generator().manual_seed(1)
        ctx = PassContext(calibration=[(torch.randn(8, 1024, generator=g),) for _ in range(4)])
        get_pass("quant_sensitivity")(formats=["w8a8", "w4", "w8"], w8_block_size=32)(p, ctx)
        return get_pass("mixed_precision")(formats=["w4", "w8", "w8a8", "fp32"], w8_block_size=32,
                                           weight_bytes=0.25)(p, ctx).program

    torch.manual_seed(0)
    dit = TinyDiT(dim=256, layers=6).eval()
    with torch.no_grad():
        for b in dit.blocks:
            b.ada.weight.mul_(0.2)
    xd = torch.randn(2, 64, 4)

    def tsq(p):
        return get_pass("timestep_quant")(buckets=2)(p, PassContext(calibration=tiny_sampler_loop(xd, 8))).program

    torch.manual_seed(0)
    moe = TinyMoEDiT(dim=128).eval()
    with torch.no_grad():
        for b in moe.blocks:
            b.ada.weight.mul_(0.2)
    xm = torch.randn(2, 64, 4)

    def expert(p):
        return get_pass("expert_quant")(block_size=32, bits=[2, 4, 8, 32], weight_bytes=0.2)(
            p, PassContext(calibration=tiny_sampler_loop(xm, 4))).program

    t900 = torch.full((2,), 900.0)
    return {"int4": (mlp, (x,), int4, False), "mixed": (mlp, (x,), mixed, False),
            "tsq": (dit, (xd, t900), tsq, True), "expert": (moe, (xm, t900), expert, True)}


def _time(executors: dict, inputs: list, calls: int, repeats: int, sampler: bool) -> dict:
    """Median ms per call of each executor, rounds alternating between them."""
    times = {k: [] for k in executors}
    for ex in executors.values():            # warm up
        ex(*inputs)
    for _ in range(repeats):
        for k, ex in executors.items():
            ex.reset()
            t0 = time.perf_counter()
            if sampler:
                _np_loop(ex, inputs[0], calls)
            else:
                for _ in range(calls):
                    ex(*inputs)
            times[k].append((time.perf_counter() - t0) * 1e3 / calls)
    return {k: round(float(np.median(v)), 4) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "quant_tvm.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = {"threads": 1, "repeats": a.repeats, "calls_per_round": a.calls, "omp_wait_policy": "PASSIVE",
           "tvm": "untuned (tvm.compile default pipeline)", "machine": platform.processor() or platform.machine(),
           "results": {}}
    if a.only and os.path.exists(a.out):           # re-measure some workloads, keep the others
        with open(a.out) as f:
            out["results"] = json.load(f).get("results", {})
    root = tempfile.mkdtemp(prefix="quant_tvm_")
    for name, (model, inputs, rewrite, sampler) in _workloads().items():
        if a.only and name not in a.only:
            continue
        program = capture(model, inputs)
        quantized = rewrite(program)
        arts = {}
        for label, prog in (("fp32", program), ("quant", quantized)):
            for tname, target in (("tvm", TVM_CPU), ("ort", CPU)):
                t0 = time.perf_counter()
                arts[f"{tname}_{label}"] = save_program(prog, os.path.join(root, name, f"{tname}_{label}"), target)
                print(f"{name}: built {tname} {label} in {time.perf_counter() - t0:.1f} s", flush=True)
        ex = {k: Executor(v) for k, v in arts.items()}
        arrays = [i.numpy() for i in inputs]
        held = [i.numpy() + np.float32(0.1) * np.random.default_rng(3).standard_normal(i.shape).astype(np.float32)
                if i.dtype == torch.float32 and i.dim() > 1 else i.numpy() for i in inputs]
        with torch.no_grad():
            if sampler:
                ref = tiny_sampler_loop(torch.from_numpy(held[0]), 8)(model).numpy()
                got = {k: _np_loop(e, held[0], 8) for k, e in ex.items() if k.endswith("quant")}
            else:
                ref = model(torch.from_numpy(held[0])).numpy()
                got = {k: e(*held) for k, e in ex.items() if k.endswith("quant")}
        lat = _time(ex, arrays, a.calls, a.repeats, sampler)
        entry = out["results"][name] = {
            "records": sorted(k for k in quantized.records),
            "graphs": list(quantized.graphs),
            "rel_l2_tvm_vs_ort": _rel(got["ort_quant"], got["tvm_quant"]),
            "rel_l2_tvm_vs_eager": _rel(ref, got["tvm_quant"]),
            "rel_l2_ort_vs_eager": _rel(ref, got["ort_quant"]),
            "ms_per_call": lat,
            "tvm_vs_ort_quant": round(lat["ort_quant"] / lat["tvm_quant"], 3),
            "artifact_bytes": {k: _files(v) for k, v in arts.items()},
            "tvm_manifest": {g: {k: v for k, v in e.items() if k in ("int8", "weight_only", "check")}
                             for g, e in ex["tvm_quant"].manifest["graphs"].items()},
        }
        print(name, json.dumps(entry, indent=1), flush=True)
    write_results(a.out, out, indent=1)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
