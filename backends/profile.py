"""Where an artifact's time goes, kernel by kernel, on ONNX Runtime and on TVM. Torch-free.

    prof = profile_kernels(executor, lambda: task(executor), rounds=3)
    prof["kernel_ms"], prof["categories"]["matmul"], prof["top"][0]["name"]

Every graph of the Executor is profiled with its own runtime's instrument:

  onnxruntime  the session is reopened with ORT's profiler on (SessionOptions.enable_profiling);
               a kernel is an executed node (its `<node>_kernel_time` events), named by its op
               type and node name, so ORT's fusions (FusedMatMul, SkipLayerNormalization, ...)
               appear as ORT runs them.
  tvm          the Relax VM's instrument (VirtualMachine.set_instrument) is called before and
               after every call the VM makes; a kernel is a compiled function (fused_matmul_add,
               softmax, ...), and the VM's own builtins (vm.builtin.alloc_tensor, shape checks)
               are kept as the runtime's share.

`warmup` calls of the task run first and are not counted (ORT's first runs in the reopened
session plan its memory). Times are wall time between a kernel's start and end as each
runtime reports them, summed over the rounds and divided by `rounds`: per task. A kernel is
put in one of CATEGORIES by its name, so the two runtimes' kernels can be compared by kind.
The instruments cost time of their own. TVM's is a Python callback before and after every VM
call: each call's measured time includes the return from the first and the entry into the
second (its arguments converted to Python objects). The cheapest call of any function seen (a
shape check or a view that does no work) bounds that cost from below; it is the graph's
`instrument_floor_us`, and is subtracted from every call of that graph (`kernel_ms`;
`kernel_ms_raw` is the sum before). ORT's profiler times each kernel inside the runtime and is
left as it reports. `task_ms` is the task's wall time while profiled; `task_ms_unprofiled` the
same number of rounds run after, instruments off; `outside_kernels_ms` what the unprofiled task
spends outside the kernels (per-call dispatch of the runtime, the executor's own work, input
and output copies): unprofiled wall time less `kernel_ms`. It is negative where the instruments'
cost lands inside the kernels' times beyond the floor (thousands of microsecond kernels: the VLA
policy's 1,845 ONNX nodes, its ~1,000 VM tensor allocations per call); the kernels' shares are
then still read, their sum against the wall time is not.
"""
from __future__ import annotations

import collections
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable

#: the kinds of kernel a profile sums by, in report order
CATEGORIES = ("matmul", "attention", "softmax", "norm", "elementwise", "data movement", "runtime")

_MATMUL = re.compile(r"matmul|gemm|dense|conv|qlinear|bmm|batch_mm|einsum")
_MOVE = re.compile(r"fused|transpose|reshape|strided_slice|slice|concat|split|take|gather|unsqueeze|squeeze|expand|"
                   r"broadcast_to|copy|cast|identity|flatten|tile|scatter|permute|layout_transform|pad|memcpy|shape|"
                   r"[_\d]")


def category(name: str) -> str:
    """The kind of a kernel, from its name (a TVM function symbol or an ORT op type)."""
    n = name.lower()
    if n.startswith("vm.builtin.") or n.startswith("vm."):
        return "runtime"
    if "attention" in n:
        return "attention"
    if _MATMUL.search(n):
        return "matmul"
    if "softmax" in n:
        return "softmax"
    if "norm" in n:
        return "norm"
    if not _MOVE.sub("", n):                  # nothing but moves (fused_reshape3_transpose, Gather, Cast)
        return "data movement"
    return "elementwise"


class _TvmProbe:
    """Per-kernel times of one TvmGraph through the VM's instrument."""

    def __init__(self, graph: Any):
        self.graph, self.acc = graph, collections.defaultdict(lambda: [0, 0.0])
        self._t0 = 0.0
        self.floor = float("inf")         # the cheapest single call seen, s

    def _instrument(self, func, symbol, before, ret, *args):
        if before:
            self._t0 = time.perf_counter()
        else:
            d = time.perf_counter() - self._t0
            a = self.acc[str(symbol)]
            a[0] += 1
            a[1] += d
            if d < self.floor:
                self.floor = d
        return 0                          # VMInstrumentReturnKind.NO_OP

    def floor_ms(self) -> float:
        return self.floor * 1e3 if self.acc else 0.0

    def start(self) -> None:
        self.graph.vm.set_instrument(self._instrument)

    def stop(self) -> dict:
        self.graph.vm.set_instrument(None)            # off: no callback left on the executor's calls
        return {k: (c, s * 1e3) for k, (c, s) in self.acc.items()}


class _OrtProbe:
    """Per-node times of one OrtGraph from ORT's profiler, in a session reopened with it on."""

    def __init__(self, graph: Any):
        self.graph, self._saved = graph, None
        self._dir = tempfile.mkdtemp(prefix="pared-profile-")
        self.opened_at, self.started_at = 0, None

    def open(self) -> None:
        from pared.backends.onnxruntime.runtime import make_session
        g = self.graph
        self._saved, self.opened_at = g.session, g.calls
        g.session = make_session(g.path, g.target, profile_prefix=os.path.join(self._dir, "ort"),
                                 initializers=g.shared_initializers)

    def start(self) -> None:
        self.started_at = self.graph.calls

    def stop(self) -> dict:
        g = self.graph
        if self._saved is None:                           # never opened (another probe's open failed)
            return {}
        path = g.session.end_profiling()
        g.session, self._saved = self._saved, None
        try:
            if self.started_at is None:                   # the warmup failed: nothing was measured
                return {}
            return ort_kernel_times(path, skip_runs=self.started_at - self.opened_at)   # the warmup's runs
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)  # the profile file (none when no run was made)


def ort_kernel_times(path: str, skip_runs: int = 0) -> dict[str, tuple[int, float]]:
    """The executed nodes in an ORT profile file (SessionOptions.enable_profiling), after its first
    `skip_runs` session runs: `OpType:node` -> (calls, total ms)."""
    with open(path) as f:
        events = json.load(f)
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    start = runs[skip_runs] if len(runs) > skip_runs else float("inf")
    acc: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            op = (e.get("args") or {}).get("op_name", "")
            node = e["name"][: -len("_kernel_time")]
            a = acc[f"{op}:{node}" if op else node]
            a[0] += 1
            a[1] += e["dur"] / 1e3
    return {k: (c, ms) for k, (c, ms) in acc.items()}


def profile_kernels(executor: Any, task: Callable[[], Any], *, rounds: int = 3, warmup: int = 1,
                    top: int = 15) -> dict:
    """Profile `task` (which calls `executor`) kernel by kernel on every graph of the artifact.

    Returns a dict: `task_ms` (wall time per task while profiled), `task_ms_unprofiled` (the
    same rounds again, instruments off), `kernel_ms` (the kernels' sum per task, the runtime's
    builtins included, TVM's calls less their graph's instrument floor), `kernel_ms_raw` (the
    sum as measured), `instrument_floor_us` (TVM graph -> the floor subtracted per call),
    `outside_kernels_ms` (task_ms_unprofiled - kernel_ms; see the module doc), `categories` (kind -> ms
    per task), `top` (the `top` costliest kernels: graph, name, kind, calls and ms per task,
    share of kernel_ms), and `kernels` (how many distinct kernels ran).

    Raises:
        ValueError: rounds < 1, or a graph whose runtime this profiler does not know.
    """
    if rounds < 1:
        raise ValueError(f"profile_kernels: rounds must be >= 1 (got {rounds})")
    from pared.backends.onnxruntime.runtime import OrtGraph
    from pared.backends.tvm.runtime import TvmGraph
    probes = {}
    for name, g in executor.graphs.items():
        if isinstance(g, TvmGraph):
            probes[name] = _TvmProbe(g)
        elif isinstance(g, OrtGraph):
            probes[name] = _OrtProbe(g)
        else:
            raise ValueError(f"profile_kernels: graph '{name}' runs on {type(g).__name__}, which has no kernel profiler")
    try:
        for p in probes.values():
            if isinstance(p, _OrtProbe):
                p.open()
        for _ in range(warmup):
            task()
        for p in probes.values():
            p.start()
        t0 = time.perf_counter()
        for _ in range(rounds):
            task()
        wall = (time.perf_counter() - t0) / rounds * 1e3
    finally:
        results = {name: p.stop() for name, p in probes.items()}
    t0 = time.perf_counter()
    for _ in range(rounds):
        task()
    plain = (time.perf_counter() - t0) / rounds * 1e3
    floors = {g: p.floor_ms() for g, p in probes.items() if isinstance(p, _TvmProbe)}
    rows = [{"graph": g, "name": k, "kind": category(k.split(":", 1)[0]), "calls": c / rounds,
             "ms": (ms - c * floors.get(g, 0.0)) / rounds, "raw": ms / rounds}
            for g, res in results.items() for k, (c, ms) in res.items()]
    total, raw = sum(r["ms"] for r in rows), sum(r.pop("raw") for r in rows)
    cats = {c: 0.0 for c in CATEGORIES}
    for r in rows:
        cats[r["kind"]] += r["ms"]
    rows.sort(key=lambda r: -r["ms"])
    return {"task_ms": round(wall, 3), "task_ms_unprofiled": round(plain, 3), "kernel_ms": round(total, 3),
            "kernel_ms_raw": round(raw, 3), "instrument_floor_us": {g: round(f * 1e3, 3) for g, f in floors.items()},
            "outside_kernels_ms": round(plain - total, 3), "kernels": len(rows),
            "categories": {c: round(v, 3) for c, v in cats.items()},
            "top": [{**r, "calls": round(r["calls"], 2), "ms": round(r["ms"], 3),
                     "share": round(r["ms"] / total, 4) if total else 0.0} for r in rows[:top]]}
