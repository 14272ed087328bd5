"""The measurement service backends offer analyses: a Profiler (ir/measure.py) that
rewrites a program's linear layers into a candidate format with pared's own
quantization rewrites, lowers it with the target's backend and loads it with the
runtime the Executor uses, so that what an analysis times is what the artifact runs.

    ctx = PassContext(calibration=..., target=get_target("cpu"), measure=default_profiler())

pared.optimize injects `default_profiler()` into the context it builds; tests and
scripts that run a measuring analysis (latency) on their own context inject it too.
"""
from __future__ import annotations

from typing import Any, Callable

from pared.backends import lower
from pared.ir.measure import LinearFormat, Profiler
from pared.ir.patterns import find_sites
from pared.ir.program import Program
from pared.ir.target import Target
from pared.ir.transform import PassContext
from pared.passes.quant.quantize_linears import QuantizeLinears
from pared.passes.quant.quantize_weights_int4 import quantize_sites_weight_only

#: what the rewrites this profiler applies record as their creator (meta CREATED_BY)
_BY = "measure"


class BackendProfiler:
    """Lowers with pared.backends.lower and runs with the backend's graph runtime
    (OrtGraph or TvmGraph), as an artifact's graphs run (see ir/measure.py)."""

    def runner(self, program: Program, target: Target, workdir: str,
               fmt: LinearFormat | None = None) -> Callable[[], Any]:
        """Rewrite, lower and load `program`; see Profiler.runner.

        Raises:
            ValueError: a program of more than one graph (its example inputs feed one graph).
        """
        if len(program.graphs) != 1:
            raise ValueError(f"the profiler times single-graph programs; this one has {list(program.graphs)}")
        prog = self._rewrite(program, fmt, target) if fmt is not None else program
        tj = target.to_json()
        entry = lower.lower_program(prog, tj, workdir)[next(iter(prog.graphs))]
        graph = _runtime(tj["backend"])(workdir, entry, tj)
        feed = [x.detach().numpy() for x in prog.main.example_inputs]
        return lambda: graph(feed)

    @staticmethod
    def _rewrite(program: Program, fmt: LinearFormat, target: Target) -> Program:
        """`program` with every linear layer in `fmt`, as mixed_precision rewrites a layer for `target`."""
        if fmt.name == "fp32":
            return program
        if fmt.name == "w8a8":
            ctx = PassContext(calibration=[tuple(program.main.example_inputs)], target=target)
            return QuantizeLinears()(program, ctx).program
        g = program.main
        new, _ = quantize_sites_weight_only(g, find_sites(g.module), fmt.block_size, fmt.symmetric, _BY, fmt.bits)
        return program.with_graph(next(iter(program.graphs)), new)


def _runtime(backend: str) -> Callable:
    """The backend's graph runner class (what the Executor loads each graph with)."""
    if backend == "tvm":
        from pared.backends.tvm.runtime import TvmGraph      # imports tvm: only when a TVM target is timed
        return TvmGraph
    from pared.backends.onnxruntime.runtime import OrtGraph
    return OrtGraph


def default_profiler() -> Profiler:
    """The profiler pared.optimize injects as `ctx.measure`."""
    return BackendProfiler()
