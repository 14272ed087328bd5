"""The measurement service analyses use to time models on a target: `ctx.measure`.

An analysis that measures on the device (analysis/latency.py) builds the models it
wants timed from ir/ alone and asks the context's Profiler to make them runnable;
the Profiler is implemented where lowering and runtimes live
(backends/measure.py: `default_profiler()`) and injected by whoever builds the
PassContext (pared.optimize does). So analyses never import backends or passes,
and a test may inject a fake.

    LinearFormat   a candidate format of linear layers: fp32, w8a8, w4, w8 (the
                   formats quant_sensitivity, latency and mixed_precision share)
    Profiler       runner(program, target, workdir, fmt) -> a callable running the
                   lowered program once on its example inputs
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from .formats import FORMATS

if TYPE_CHECKING:
    from pared.ir.program import Program
    from pared.ir.target import Target

#: the candidate formats of a linear layer: name -> weight bits (from the registry, ir/quant.FORMATS)
LINEAR_FORMATS = {name: f.weight_bits for name, f in FORMATS.items()}


@dataclass(frozen=True)
class LinearFormat:
    """How a Profiler rewrites every linear layer of a program before lowering it, as
    pared's quantization passes emit it for the target:
        fp32   unchanged
        w8a8   quantize_linears (static, calibrated on the program's example inputs)
        w4/w8  weight-only block-wise int4 / int8 (quantize_weights_int4's rewrite)
    """
    name: str                           # one of LINEAR_FORMATS
    block_size: int = 32                # weight-only formats: input channels per scale
    symmetric: bool = True              # weight-only formats: the scheme

    def __post_init__(self):
        if self.name not in LINEAR_FORMATS:
            raise ValueError(f"unknown linear format {self.name!r}; known: {', '.join(LINEAR_FORMATS)}")

    @property
    def bits(self) -> int:
        """Weight bits of the format (32 for fp32)."""
        return LINEAR_FORMATS[self.name]

    @property
    def weight_only(self) -> bool:
        return self.name in ("w4", "w8")


@runtime_checkable
class Profiler(Protocol):
    """Makes programs runnable on a target, for an analysis to time (see module docstring)."""

    def runner(self, program: "Program", target: "Target", workdir: str,
               fmt: LinearFormat | None = None) -> Callable[[], Any]:
        """Lower `program` for `target` into `workdir` and load it with the target's runtime.

        Args:
            program: a single-graph Program; its example inputs are what the runner feeds.
            target: the Target to lower for (its backend, provider, threads...).
            workdir: an existing directory the lowered files go into (the caller removes it).
            fmt: rewrite every linear layer into this format first (None: as it is).

        Returns:
            A callable that runs the lowered program once on its example inputs.

        Raises:
            Exception: whatever the rewrite, the lowering or the runtime raise; the
                analysis that asked names the model and the format.
        """
        ...
