"""Which integer scheme to use on which x86 CPU: speed and exactness of ONNX Runtime's
integer matmuls per scheme, on this CPU as it is and with AVX-512, VNNI and AMX hidden
from CPUID (tests/support/hide_isa.c: ORT then runs the kernels of an AVX2-only CPU).

    .venv/bin/python benchmarks/int8_schemes.py      # -> benchmarks/results/int8_schemes.json

Schemes (weights per output channel, activations per tensor), each as the node unit
pared's passes export, fused by ORT at the `extended` level:
    u8s8       uint8 activations x int8 weights in [-127, 127]   (pared's full range)
    u8s8_7bit  uint8 x int8 weights in [-63, 63]                 (ORT's reduce_range)
    u8u8       uint8 x uint8 weights (zero point 128)            (ORT's advice for AVX2)
    s8s8       int8 activations x int8 weights in [-127, 127]
for static layers (QuantizeLinear -> DequantizeLinear -> MatMul with a DequantizeLinear'd
weight: MatMulIntegerToFloat) and dynamic ones (DynamicQuantizeLinear -> MatMulInteger:
DynamicQuantizeMatMul), on the three linear shapes of all-MiniLM-L6-v2 at batch 8 x 128
tokens, beside the fp32 MatMul. Exactness: the layer on activation codes at the top of
their range (half at the maximum), against the same product in int64. Time: median over
alternating rounds, 1 thread, OMP_WAIT_POLICY=PASSIVE, every scheme in the same rounds.
Weight-only MatMulNBits (4 and 8 bits, block 32) is compared with x times its dequantized
weight in float64, at accuracy level 0 (what pared emits: float compute) and 4 (int8).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

SHAPES = {"qkv/attn-out [1024x384 -> 384]": (1024, 384, 384), "ffn-in [1024x384 -> 1536]": (1024, 384, 1536),
          "ffn-out [1024x1536 -> 384]": (1024, 1536, 384)}
SCHEMES = ("fp32", "u8s8", "u8s8_7bit", "u8u8", "s8s8")


def _model(scheme: str, dynamic: bool, m: int, k: int, n: int, rng: np.random.Generator):
    """(ONNX model bytes, exact(x_codes) -> reference output, make_input(codes) -> feed) of one layer."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper
    w = rng.standard_normal((k, n)).astype(np.float32)
    out = helper.make_tensor_value_info("y", T.FLOAT, [m, n])
    xin = helper.make_tensor_value_info("x", T.FLOAT, [m, k])
    if scheme == "fp32":
        g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [xin], [out],
                              [numpy_helper.from_array(w, "w")])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString(), None, None
    qmax = 63 if scheme == "u8s8_7bit" else 127
    ws = (np.abs(w).max(0) / qmax).astype(np.float32)
    q = np.clip(np.round(w / ws), -qmax, qmax)
    if scheme == "u8u8":
        wq, wz = (q + 128).astype(np.uint8), np.full(n, 128, np.uint8)
    else:
        wq, wz = q.astype(np.int8), np.zeros(n, np.int8)
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(ws, "ws"), numpy_helper.from_array(wz, "wz")]
    w_int = wq.astype(np.int64) - wz.astype(np.int64)
    if dynamic:
        nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
                 helper.make_node("MatMulInteger", ["xq", "wq", "xz", "wz"], ["acc"]),
                 helper.make_node("Cast", ["acc"], ["accf"], to=T.FLOAT),
                 helper.make_node("Mul", ["xs", "ws"], ["sc"]),
                 helper.make_node("Mul", ["accf", "sc"], ["y"])]

        def feed(codes):                       # codes 0..255 (0 and 255 present) -> floats that quantize to them
            return {"x": ((codes.astype(np.float32) - 100.0) * np.float32(0.02)).astype(np.float32)}

        def exact(codes):
            x = feed(codes)["x"]
            lo, hi = np.float32(min(x.min(), 0)), np.float32(max(x.max(), 0))
            s = np.float32((hi - lo) / np.float32(255))
            z = int(np.clip(np.rint(-lo / s), 0, 255))
            xq = np.clip(np.rint(x / s) + z, 0, 255).astype(np.int64)
            return ((xq - z) @ w_int).astype(np.float64) * float(s) * ws.astype(np.float64)
        signed = False
    else:
        signed = scheme == "s8s8"
        xs, xz = np.float32(0.02), (np.int8(0) if signed else np.uint8(100))
        inits += [numpy_helper.from_array(np.array(xs), "xs"), numpy_helper.from_array(np.array(xz), "xz")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
                 helper.make_node("MatMul", ["xd", "wd"], ["y"])]

        def feed(codes):
            c = codes.astype(np.int64) - (128 if signed else 0)        # int8 codes span -128..127
            return {"x": ((c - int(xz)) * xs).astype(np.float32)}

        def exact(codes):
            c = codes.astype(np.int64) - (128 if signed else 0)
            return ((c - int(xz)) @ w_int).astype(np.float64) * float(xs) * ws.astype(np.float64)
    g = helper.make_graph(nodes, "g", [xin], [out], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString(), exact, feed


def _nbits_model(bits: int, accuracy_level: int, m: int, k: int, n: int, rng: np.random.Generator,
                 block: int = 32):
    """A weight-only MatMulNBits layer (symmetric codes, MatMulNBits' default zero point) and its
    reference: x times the dequantized weight in float64."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper
    w = rng.standard_normal((n, k // block, block)).astype(np.float32)
    half = 2 ** (bits - 1)
    s = (np.abs(w).max(-1) / (half - 1)).astype(np.float32)
    codes = (np.clip(np.rint(w / s[..., None]), -(half - 1), half - 1) + half).astype(np.uint8)
    packed = codes if bits == 8 else (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    wd = ((codes.astype(np.float64) - half) * s[..., None]).reshape(n, k)
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=accuracy_level)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", T.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [m, n])],
                          [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(s.reshape(-1), "s")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString(), lambda x: x.astype(np.float64) @ wd.T


def child(repeats: int) -> dict:
    """One world: this process's CPU as ORT sees it."""
    import onnx
    import onnxruntime as ort

    from pared.ir.isa import host_cpu
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    rng = np.random.default_rng(0)
    rows = []
    for shape_name, (m, k, n) in SHAPES.items():
        runs = {}
        for scheme in SCHEMES:
            for dynamic in ((False,) if scheme in ("fp32", "s8s8") else (False, True)):
                data, exact, feed = _model(scheme, dynamic, m, k, n, rng)
                path = f"/tmp/pared-int8-schemes-{os.getpid()}.onnx"
                opts.optimized_model_filepath = path
                sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
                kernel = [nd.op_type for nd in onnx.load(path).graph.node if nd.op_type not in
                          ("QuantizeLinear", "DequantizeLinear")]
                os.remove(path)
                row = {"shape": shape_name, "scheme": scheme, "mode": "dynamic" if dynamic else "static",
                       "kernel": kernel}
                if exact is not None:
                    codes = rng.integers(0, 256, (m, k))
                    codes = np.where(rng.random((m, k)) < 0.5, 255, codes)
                    codes.reshape(-1)[0] = 0
                    y = sess.run(None, feed(codes))[0].astype(np.float64)
                    ref = exact(codes)
                    row["rel_l2_vs_exact"] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
                    row["outputs_off"] = float((np.abs(y - ref) > 1e-4 * np.abs(ref).max()).mean())
                x = rng.standard_normal((m, k)).astype(np.float32)
                runs[(scheme, row["mode"])] = (sess, {"x": x}, row)
        # weight-only (quantize_weights_int4, mixed_precision's w4 / w8): pared lowers them at accuracy
        # level 0 (float compute on dequantized weights); level 4 quantizes x to int8 per block
        for bits, level in ((4, 0), (4, 4), (8, 0)):
            data, ref_fn = _nbits_model(bits, level, m, k, n, rng)
            sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
            x = rng.standard_normal((m, k)).astype(np.float32)
            ref = ref_fn(x)
            y = sess.run(None, {"x": x})[0].astype(np.float64)
            row = {"shape": shape_name, "scheme": f"w{bits} MatMulNBits acc{level}", "mode": "weight-only",
                   "kernel": ["MatMulNBits"], "rel_l2_vs_float": float(np.linalg.norm(y - ref) / np.linalg.norm(ref))}
            runs[(row["scheme"], row["mode"])] = (sess, {"x": x}, row)
        times = {key: [] for key in runs}
        for _ in range(repeats):                    # alternating: each round runs every scheme once
            for key, (sess, fd, _) in runs.items():
                t0 = time.perf_counter()
                sess.run(None, fd)
                times[key].append(time.perf_counter() - t0)
        fp32 = float(np.median(times[("fp32", "static")]))
        for key, (_, _, row) in runs.items():
            med = float(np.median(times[key]))
            row["median_ms"] = round(med * 1e3, 3)
            row["speedup_vs_fp32"] = round(fp32 / med, 3)
            rows.append(row)
    return {"cpu": host_cpu().to_json(), "onnxruntime": ort.__version__, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/int8_schemes.json")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.repeats)))
        return
    from pared.bench import write_results
    from pared.testing import AVX2_ONLY, hidden_isa_env
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    worlds = {"host": env}
    hidden, note = hidden_isa_env(AVX2_ONLY)
    if hidden is not None:
        worlds["avx2-only (hidden by hide_isa)"] = hidden
    else:
        print(f"AVX2-only world unavailable here: {note}", file=sys.stderr)
    out = {"command": "benchmarks/int8_schemes.py", "threads": 1, "repeats": a.repeats, "worlds": {}}
    for name, wenv in worlds.items():
        p = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(a.repeats)], env=wenv,
                           capture_output=True, text=True, check=True)
        res = json.loads(p.stdout.strip().splitlines()[-1])
        out["worlds"][name] = res
        print(f"== {name}: {res['cpu']['model']} ({', '.join(res['cpu']['features'])})")
        for r in res["rows"]:
            ex = f"  rel L2 vs exact {r['rel_l2_vs_exact']:.2g} ({r['outputs_off']:.1%} off)" \
                if "rel_l2_vs_exact" in r else f"  rel L2 vs float {r['rel_l2_vs_float']:.2g}" \
                if "rel_l2_vs_float" in r else ""
            print(f"  {r['shape']:28s} {r['scheme']:22s} {r['mode']:8s} {r['median_ms']:8.3f} ms "
                  f"x{r['speedup_vs_fp32']:.2f} fp32{ex}")
    write_results(a.out, out)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
