"""Artifact bytes of the cached dit_mnist against the uncached one, per target: do cache
variants store their weights once?

    .venv/bin/python benchmarks/artifact_bytes.py [--targets cpu,tvm-cpu]

For each target: the trained dit_mnist lowered plain (one graph) and with the
pipeline of examples/pipelines/dit_cache.yaml (taylor_cache over the whole block
stack: three variant graphs of one model), saved, and the bytes of every file in
the artifact directory summed. Also the sum of the variants' weight bytes on the
torch side, for scale. On TVM targets also dit_mnist with every linear layer weight-only
int4 (quantize_weights_int4, blocks of 32) saved twice in one run: its weights stored as
their codes (what pared ships) and as the float32 values they dequantize to (before).
Writes benchmarks/results/artifact_bytes.json.
"""
from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))

import pared  # noqa: E402
from pared.bench import param_bytes, write_results  # noqa: E402
from pared.workloads import get_workload  # noqa: E402


def dir_bytes(path: str) -> dict:
    files = {}
    for root, _, names in os.walk(path):
        for n in names:
            p = os.path.join(root, n)
            files[os.path.relpath(p, path)] = os.path.getsize(p)
    return {"total": sum(files.values()), "files": files}


def int4_bytes(model, ex, target: str, tmp: str) -> dict:
    """The weight-only int4 dit_mnist saved with its weights as codes, and as float32."""
    from pared.backends.tvm import lower as tvm_lower
    out = {}
    for pack in (True, False):
        tvm_lower.PACK_WEIGHT_ONLY = pack
        try:
            opt = pared.optimize(model, ex, target=target, bench_repeats=0, allow_fidelity_loss=True,
                                 pipeline=[{"quantize_weights_int4": {"block_size": 32, "force": True}}])
            path = opt.save(os.path.join(tmp, f"{target}-int4-{pack}"))
        finally:
            tvm_lower.PACK_WEIGHT_ONLY = True
        out["packed" if pack else "float"] = dir_bytes(path)
    out["packed_over_float"] = out["packed"]["total"] / out["float"]["total"]
    out["weights_file_packed_over_float"] = out["packed"]["files"]["tvm.weights"] / out["float"]["files"]["tvm.weights"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="cpu,tvm-cpu")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "artifact_bytes.json"))
    a = ap.parse_args()
    wl = get_workload("dit_mnist")
    model = wl.build()
    ex = wl.example_inputs()
    calib = wl.calibration()
    pipelines = {"plain": [], "taylor_cache": ["temporal_redundancy",
                                               {"taylor_cache": {"interval": 4, "first": 0, "last": -1}}]}
    out = {"what": "dit_mnist artifact bytes, plain vs cached (taylor_cache: 3 variant graphs)", "targets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for target in a.targets.split(","):
            row = {}
            for name, pipe in pipelines.items():
                print(f"{target}: {name}", flush=True)
                opt = pared.optimize(model, ex, target=target, pipeline=pipe, calibration=calib, bench_repeats=0,
                                     allow_fidelity_loss=True)
                path = opt.save(os.path.join(tmp, f"{target}-{name}"))
                row[name] = {"graphs": sorted(opt.program.graphs), "bytes": dir_bytes(path),
                             "torch_param_bytes": param_bytes(opt.program)}
            row["cached_over_plain"] = row["taylor_cache"]["bytes"]["total"] / row["plain"]["bytes"]["total"]
            print(f"{target}: cached / plain bytes = {row['cached_over_plain']:.3f}", flush=True)
            if pared.get_target(target).backend == "tvm":
                row["int4"] = int4_bytes(model, ex, target, tmp)
                print(f"{target}: int4 packed / float-stored bytes = {row['int4']['packed_over_float']:.3f}",
                      flush=True)
            out["targets"][target] = row
    write_results(a.json, out)


if __name__ == "__main__":
    main()
