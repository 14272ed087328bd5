"""Helpers every benchmark shares: results files written atomically with the machine
they ran on, parameter bytes, trace summaries. The side-by-side benchmark of a reference
workload (`pared bench --workload`) is pared.workloads.bench."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from pared.ir.program import param_bytes  # noqa: F401  (re-exported: the harnesses' weight bytes)

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def portable_path(path: str | None) -> str | None:
    """A pipeline path relative to the source tree when it lies inside it (JSON that travels)."""
    if not path:
        return None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full = os.path.abspath(path)
    return os.path.relpath(full, root) if full.startswith(root + os.sep) else full


def trace_summary(trace: list[str]) -> dict:
    """The routine per call of one task, and how often each ran."""
    return {"calls": len(trace), "counts": {r: trace.count(r) for r in dict.fromkeys(trace)}, "routines": trace}


def timing_stats(s: Mapping[str, Any], name: str) -> dict[str, float]:
    return {k: round(s[f"{k}_s"][name] * 1e3, 3) for k in ("min", "median", "max")}


def machine() -> dict:
    """Where a figure was measured: the CPU (model, architecture, the ISA features pared reads,
    and those hidden by tests/support/hide_isa.c when that emulation is on), cores, runtimes."""
    import platform

    from pared.ir.isa import host_cpu
    out = {"cpu": host_cpu().to_json(), "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        import onnxruntime
        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    import sys
    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].__version__
    return out


def write_results(path: str, data: dict, **dump: Any) -> str:
    """Write a benchmark's results as JSON at `path`, atomically, with `machine()` under the key
    "machine" (every results file says which CPU and ISA its figures come from). Returns path."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    mine = data.get("machine")
    data = dict(data, machine={**mine, **machine()} if isinstance(mine, dict) else machine())
    from pared.backends.signing import atomic_write
    atomic_write(path, (json.dumps(data, **dict({"indent": 1}, **dump)) + "\n").encode())
    return path
