"""Activation sparsity: how small the inputs of each linear layer are over a calibration run,
and the magnitude thresholds that zero a target fraction of them (TEAL, "Training-Free
Activation Sparsity in Large Language Models", Liu et al., ICLR 2025; WINA, "WINA:
Weight Informed Neuron Activation for Accelerating Large Language Model Inference", Chen et
al., 2025).

For every linear layer of every analysed graph (ir.patterns.find_sites: the layers the
quantization passes match) the calibration run (analysis.recorder) hands over its input x
[..., K], and two distributions are gathered over every element of the run:

    |x_i|                           TEAL: threshold t_p = the p-quantile of |x|, so that zeroing
                                    |x_i| <= t_p zeroes a fraction p of the input (TEAL's
                                    F^-1(0.5 + p/2) of x for a symmetric x)
    |x_i| * ||W[:, i]||_2           WINA: the input scaled by the L2 norm of the weight column it
                                    multiplies (nn.Linear's weight.norm(dim=0)); threshold s_p = the
                                    p-quantile of the score

recorded as quantiles (option `quantiles`) and thresholds at each target sparsity (option
`sparsities`), plus the fraction of exact zeros, the mean and the maximum. Layers reading one
input share its |x| distribution; the WINA score is per layer.

Streaming: the run's values are not kept; each distribution is a histogram over log-spaced
bins (option `bins_per_decade`, from 1e-12 to 1e12, exact zeros counted apart) and a quantile
is interpolated inside its bin, so it is exact to the bin's relative width
(`relative_resolution` = 10^(1/bins_per_decade) - 1: 0.23% at 1000) and clamped to the exact
minimum and maximum.

Reads: calibration. Writes: ActivationSparsityProfile (a record; nothing on nodes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pared.analysis.recorder import PerGraph, Tap, analysed_graphs, record
from pared.ir.errors import OptionError, PassError
from pared.ir.patterns import Site, find_sites
from pared.ir.program import Program, get_attr
from pared.ir.regions import match
from pared.ir.transform import Analysis, PassContext, Record, check_range, register_pass

_NAME = "activation_sparsity"
_LO_DECADE, _HI_DECADE = -12, 12


# -- record ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Magnitudes:
    """One distribution (|x|, or WINA's score) over the calibration run."""
    count: int                          # elements seen
    zero_fraction: float                # exact zeros
    mean: float
    max: float
    quantiles: tuple[float, ...]        # at the profile's `quantiles`
    thresholds: tuple[float, ...]       # at the profile's `sparsities`: zero values <= t for that fraction


@dataclass(frozen=True)
class LinearSparsity:
    layer: str                          # region (innermost module path)
    node: str                           # the matmul
    x: str                              # its input node
    in_features: int
    out_features: int
    calls: tuple[int, ...]              # the call indices at which it ran
    abs_x: Magnitudes                   # |x| (TEAL)
    wina: Magnitudes                    # |x_i| * ||W[:, i]||_2 (WINA)
    column_norm_range: tuple[float, float]  # min / max of ||W[:, i]||_2


@dataclass(frozen=True)
class GraphSparsity:
    graph: str
    calls: int
    linears: tuple[LinearSparsity, ...]     # in graph order


@dataclass(frozen=True)
class ActivationSparsityProfile(PerGraph, Record):
    quantiles: tuple[float, ...]
    sparsities: tuple[float, ...]
    relative_resolution: float          # the histograms' relative bin width (quantiles are exact to it)
    graphs: tuple[GraphSparsity, ...]

    def linear(self, name: str, graph: str | None = None) -> LinearSparsity:
        """A layer by region path or matmul node name."""
        for lin in self.graph(graph).linears:
            if name in (lin.layer, lin.node):
                return lin
        raise KeyError(f"no linear {name!r}; the graph has {[x.layer for x in self.graph(graph).linears]}")

    def teal_threshold(self, name: str, sparsity: float, graph: str | None = None) -> float:
        return self.linear(name, graph).abs_x.thresholds[self.sparsities.index(sparsity)]


# -- the streaming distribution ----------------------------------------------------------------
class LogHistogram:
    """Non-negative values in log-spaced bins from 1e-12 to 1e12 (below: the first bin; above:
    the last), exact zeros, sum, min and max: quantiles to the bins' relative width."""

    def __init__(self, bins_per_decade: int):
        self.bpd = bins_per_decade
        self.counts = np.zeros((_HI_DECADE - _LO_DECADE) * bins_per_decade, dtype=np.int64)
        self.zeros = 0
        self.n = 0
        self.total = 0.0
        self.lo, self.hi = math.inf, 0.0

    def add(self, v: torch.Tensor) -> None:
        v = v.detach().reshape(-1).float()
        n = v.numel()
        if not n:
            return
        zeros = int((v == 0).sum())
        self.n += n
        self.zeros += zeros
        self.total += float(v.sum(dtype=torch.float64))
        if zeros < n:
            self.lo = min(self.lo, float(v.masked_fill(v == 0, math.inf).min()))
            self.hi = max(self.hi, float(v.max()))
        # log10(0) = -inf lands in the first bin: taken out again below (zeros are counted apart)
        idx = ((torch.log10(v) - _LO_DECADE) * self.bpd).floor_().clamp_(0, len(self.counts) - 1).long()
        counts = np.bincount(idx.numpy(), minlength=len(self.counts))
        counts[0] -= zeros
        self.counts += counts

    def _order_stat(self, k: int, cum: np.ndarray) -> float:
        """The k-th smallest value (0-based), placed evenly inside its bin."""
        if k < self.zeros:
            return 0.0
        r = k - self.zeros
        i = min(int(np.searchsorted(cum, r, side="right")), len(self.counts) - 1)
        before = int(cum[i - 1]) if i else 0
        frac = (r - before + 0.5) / max(int(self.counts[i]), 1)
        val = 10 ** (_LO_DECADE + (i + min(max(frac, 0.0), 1.0)) / self.bpd)
        return float(min(max(val, self.lo), self.hi))

    def quantile(self, q: float) -> float:
        """The q-quantile (np.quantile's linear interpolation between order statistics, each
        exact to its bin's width)."""
        if self.n == 0:
            return math.nan
        cum = np.cumsum(self.counts)
        rank = q * (self.n - 1)
        k = int(math.floor(rank))
        lo = self._order_stat(k, cum)
        if rank == k:
            return lo
        return lo + (rank - k) * (self._order_stat(k + 1, cum) - lo)

    def summary(self, quantiles: tuple[float, ...], sparsities: tuple[float, ...]) -> Magnitudes:
        return Magnitudes(int(self.n), self.zeros / self.n if self.n else math.nan,
                          self.total / self.n if self.n else math.nan, float(self.hi),
                          tuple(self.quantile(q) for q in quantiles), tuple(self.quantile(p) for p in sparsities))


def column_norms(gm, site: Site) -> torch.Tensor:
    """||W[:, i]||_2 for each input channel i of a linear site (nn.Linear's weight.norm(dim=0))."""
    w = get_attr(gm, site.weight).detach().double()
    return w.norm(dim=0 if site.transposed else 1).float()


# -- the analysis ------------------------------------------------------------------------------
@register_pass(_NAME)
class ActivationSparsity(Analysis):
    """Per linear input: |x| and WINA score distributions, thresholds for target sparsities."""

    record = ActivationSparsityProfile

    @dataclass(frozen=True, kw_only=True)
    class Options:
        graphs: tuple[str, ...] | str | None = None    # graphs to analyse (default: every graph the plan calls)
        layers: tuple[str, ...] | str = ("**",)        # region patterns of the linear layers to measure
        exclude: tuple[str, ...] | str = ()            # region patterns not to measure
        sparsities: tuple[float, ...] = (0.25, 0.4, 0.5)   # target fractions of zeroed inputs: thresholds for each
        quantiles: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)  # of |x| and of the WINA score
        bins_per_decade: int = 1000     # histogram resolution (quantiles exact to 10^(1/this) - 1)

        def __post_init__(self):
            for f in ("graphs", "layers", "exclude"):
                v = getattr(self, f)
                if v is not None:
                    object.__setattr__(self, f, (v,) if isinstance(v, str) else tuple(v))
            for f, lo_open in (("sparsities", True), ("quantiles", False)):
                vals = tuple(float(x) for x in getattr(self, f))
                for x in vals:
                    check_range(_NAME, f, x, lo=0, hi=1, lo_open=lo_open, hi_open=lo_open)
                object.__setattr__(self, f, vals)
            if not self.sparsities:
                raise OptionError(f"pass '{_NAME}': option 'sparsities' needs at least one target, e.g. [0.5]")
            check_range(_NAME, "bins_per_decade", self.bins_per_decade, lo=10, hi=100_000)

    def analyze(self, program: Program, ctx: PassContext) -> ActivationSparsityProfile:
        o = self.options
        names = analysed_graphs(program, o.graphs, _NAME)
        if ctx.calibration is None:
            raise PassError(f"pass '{_NAME}' needs a calibration run: pass calibration= a list of input tuples "
                            "or a loop callable that runs one request through the model")
        sites: dict[str, list[Site]] = {}
        for name in names:
            chosen = [s for s in find_sites(program.graphs[name].module)
                      if any(match(p, r) for p in o.layers for r in s.regions or ("",))
                      and not any(match(p, r) for p in o.exclude for r in s.regions)]
            if chosen:
                sites[name] = chosen
        if not sites:
            raise PassError(f"pass '{_NAME}': found no linear layer matching layers {list(o.layers)} "
                            f"(exclude {list(o.exclude)}) in graphs {names}")
        abs_hist = {(g, s.x): LogHistogram(o.bins_per_decade) for g, ss in sites.items() for s in ss}
        wina_hist = {(g, s.node): LogHistogram(o.bins_per_decade) for g, ss in sites.items() for s in ss}
        norms = {(g, s.node): column_norms(program.graphs[g].module, s) for g, ss in sites.items() for s in ss}
        readers: dict[tuple[str, str], list[Site]] = {}
        for g, ss in sites.items():
            for s in ss:
                readers.setdefault((g, s.x), []).append(s)
        seen: dict[tuple[str, str], set[int]] = {}

        def on_value(tap: Tap, v: torch.Tensor) -> None:
            a = v.detach().abs().float()
            abs_hist[(tap.graph, tap.node)].add(a)
            for s in readers[(tap.graph, tap.node)]:
                wina_hist[(tap.graph, s.node)].add(a * norms[(tap.graph, s.node)])
                seen.setdefault((tap.graph, s.node), set()).add(tap.call)

        ctx.progress(f"{_NAME}: recording {sum(len(v) for v in sites.values())} linear inputs")
        taps = {g: sorted({s.x for s in ss}) for g, ss in sites.items()}
        calls = len(record(program, ctx.calibration, taps, on_value))
        graphs = []
        for g, ss in sites.items():
            lins = []
            for s in ss:
                if (g, s.node) not in seen:
                    continue
                nrm = norms[(g, s.node)]
                w = get_attr(program.graphs[g].module, s.weight)
                lins.append(LinearSparsity(
                    s.region, s.node, s.x, int(nrm.numel()), int(w.shape[0 if s.transposed else 1]),
                    tuple(sorted(seen[(g, s.node)])), abs_hist[(g, s.x)].summary(o.quantiles, o.sparsities),
                    wina_hist[(g, s.node)].summary(o.quantiles, o.sparsities), (float(nrm.min()), float(nrm.max()))))
            graphs.append(GraphSparsity(g, calls, tuple(lins)))
            ctx.log.info("%s: graph '%s': %d linear inputs over %d calls", _NAME, g, len(lins), calls)
        return ActivationSparsityProfile(o.quantiles, o.sparsities, 10 ** (1 / o.bins_per_decade) - 1, tuple(graphs))
