"""Time of one export per backend, the exporters' own path against pared's shortcuts (README:
"One trace less per export").

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/export_time.py [--repeats 3] [--threads 1]

For the main graph of each reference workload and of two coverage-zoo models whose graphs hold
`aten.squeeze.dims` (tests/e2e/coverage_zoo.py: random weights, `--zoo`), captured as
`pared.optimize` captures them, the ONNX export (`backends/onnxruntime/lower.py: export_onnx`, the
exporter's optimizer included, no export cache) and TVM's import to Relax (`backends/tvm/lower.py:
to_relax`) are timed with the shortcuts on and off, alternating in one process, medians over
rounds. ONNX, off: the exporter decomposes by retracing and its rewriter tries every rule at every
node; on: no retrace where no op needs it, `aten.squeeze.dims` rewritten node by node, each rule
tried at nodes of its root op only. The ONNX files of both arms are compared (the same file, or
where squeeze.dims was rewritten, the same ops), and the Relax texts. The registry the shortcut
builds once per process is built before the rounds, so the rounds time what every export after
the first pays. Writes benchmarks/results/export_time.json; run it on a quiet machine (load
average recorded).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.pop("PARED_EXPORT_CACHE", None)
HERE = os.path.dirname(os.path.abspath(__file__))

import onnx  # noqa: E402
import torch  # noqa: E402

from pared.backends.onnxruntime import lower as ort_lower  # noqa: E402
from pared.backends.tvm import lower as tvm_lower  # noqa: E402
from pared.bench import write_results  # noqa: E402
from pared.ir.capture import capture  # noqa: E402
from pared.workloads import get_workload  # noqa: E402

WORKLOADS = ("dit_mnist", "vit_mnist", "minilm", "vla_metaworld")
ZOO = ("wan21", "flux")


def _zoo_model(name: str):
    import sys
    sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
    from coverage_zoo import build
    model, inputs = build(name)
    args, kwargs = inputs(0)
    return model, args, kwargs


@contextlib.contextmanager
def _off():
    yield False


def _ort(graph, path: str, on: bool) -> float:
    real, root = ort_lower.exporter_shortcuts, ort_lower._at_root_op
    if not on:
        ort_lower.exporter_shortcuts, ort_lower._at_root_op = _off, (lambda rule: rule)
    try:
        t = time.perf_counter()
        ort_lower.export_onnx(graph, path)
        return time.perf_counter() - t
    finally:
        ort_lower.exporter_shortcuts, ort_lower._at_root_op = real, root


def _tvm(graph, on: bool) -> tuple[float, str]:
    real = tvm_lower.needs_decomposition
    tvm_lower.needs_decomposition = real if on else (lambda ep: True)
    try:
        t = time.perf_counter()
        mod = tvm_lower.to_relax(graph, "main")
        return time.perf_counter() - t, mod.script()
    finally:
        tvm_lower.needs_decomposition = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--zoo", default=",".join(ZOO), help="coverage-zoo models (empty: none)")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "export_time.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = tempfile.mkdtemp(prefix="pared-export-time-")
    load_before = os.getloadavg()
    with ort_lower.exporter_shortcuts():                 # the registry, built once per process
        pass
    rows = {}
    names = [n for n in a.workloads.split(",") if n] + [f"zoo:{n}" for n in a.zoo.split(",") if n]
    for name in names:
        if name.startswith("zoo:"):
            model, args, kwargs = _zoo_model(name[4:])
            graph = capture(model, args, kwargs=kwargs).main
        else:
            wl = get_workload(name)
            graph = capture(wl.build(), wl.example_inputs()).main
        squeeze = sum(1 for n in graph.module.graph.nodes if n.target is torch.ops.aten.squeeze.dims)
        nodes = sum(1 for n in graph.module.graph.nodes if n.op == "call_function")
        times: dict[str, list[float]] = {"onnx_on": [], "onnx_off": [], "tvm_on": [], "tvm_off": []}
        same_onnx = same_ops = same_tvm = True
        for r in range(a.repeats):
            order = (True, False) if r % 2 == 0 else (False, True)
            files, texts = {}, {}
            for on in order:
                key = "on" if on else "off"
                files[key] = os.path.join(work, f"{name.replace(':', '_')}.{key}.onnx")
                times[f"onnx_{key}"].append(_ort(graph, files[key], on))
            for on in order:
                key = "on" if on else "off"
                dt, texts[key] = _tvm(graph, on)
                times[f"tvm_{key}"].append(dt)
            models = {k: onnx.load(f) for k, f in files.items()}
            same_onnx &= models["on"].graph.SerializeToString() == models["off"].graph.SerializeToString()
            same_ops &= sorted(n.op_type for n in models["on"].graph.node) == \
                sorted(n.op_type for n in models["off"].graph.node)
            same_tvm &= texts["on"] == texts["off"]
        med = {k: statistics.median(v) for k, v in times.items()}
        rows[name] = {"fx_nodes": nodes, "squeeze_dims_nodes": squeeze,
                      "onnx_export_s": {"exporter": round(med["onnx_off"], 3), "shortcuts": round(med["onnx_on"], 3),
                                        "ratio": round(med["onnx_off"] / med["onnx_on"], 3), "same_file": same_onnx,
                                        "same_ops": same_ops},
                      "tvm_import_s": {"retrace": round(med["tvm_off"], 3), "shortcut": round(med["tvm_on"], 3),
                                       "ratio": round(med["tvm_off"] / med["tvm_on"], 3), "same_relax": same_tvm},
                      "rounds": {k: [round(x, 3) for x in v] for k, v in times.items()}}
        print(f"{name:14s} {nodes:5d} nodes  ONNX {med['onnx_off']:6.2f} -> {med['onnx_on']:6.2f} s "
              f"({med['onnx_off'] / med['onnx_on']:.2f}x, same file: {same_onnx}, ops: {same_ops})  TVM {med['tvm_off']:6.2f} -> "
              f"{med['tvm_on']:6.2f} s ({med['tvm_off'] / med['tvm_on']:.2f}x, same Relax: {same_tvm})", flush=True)
    write_results(a.json, {
        "what": "one export of each workload's main graph (and of coverage-zoo models holding aten.squeeze.dims, "
                "random weights): the exporters' own path against pared's shortcuts. ONNX (export_onnx with the "
                "exporter's optimizer): off = the exporter's decomposition retrace and every rewrite rule tried at "
                "every node; on = no retrace where no op needs it, squeeze.dims rewritten node by node, each rule "
                "tried at nodes of its root op. TVM (to_relax): with and without the decomposition retrace. "
                "Alternating arms, median over rounds.",
        "repeats": a.repeats, "threads": a.threads, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "measured": time.strftime("%Y-%m-%d %H:%M"), "workloads": rows})


if __name__ == "__main__":
    main()
