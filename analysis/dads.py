"""DADS: a graph's split between two devices as a minimum s-t cut over its DAG ("Dynamic
Adaptive DNN Surgery for Inference Acceleration on the Edge", Hu et al., INFOCOM 2019).

A cut in graph order (ir/cuts.py) runs a prefix of the compute nodes first; where the graph is
not a chain (branches, skip connections, a head that reads the backbone's output at every
step), a better split may run a set of nodes first that is no prefix. DADS finds the set of
least latency as a minimum cut of a flow graph:

    source -> v   capacity: v's time on the second device (paid when v runs there)
    v -> sink     capacity: v's time on the first device (paid when v runs there)
    v -> v' -> w  for each value v and each node w reading it: v -> v' carries v's transfer
                  (bytes as sent / bandwidth, plus its codecs), v' -> w unbounded: the value
                  crosses once however many nodes on the second side read it
    w -> v        unbounded: a node on the first side never reads a value of the second
                  (nothing comes back before the second side ends)
    source -> x   unbounded for each graph input (it is on the first device);
    y -> sink     unbounded for each graph output: the outputs are computed on the second
                  side (a split with an output on the first is one of the chain's cuts or
                  edge-only, which the chain search prices)

A value that is not one tensor (a tuple of a multi-output op) never crosses: its edges are
unbounded. The call overheads and the link's RTT are paid once by any split: they are added
to the cut's latency, not to the flow graph.

Per-node times come from the placement cost model (analysis/placement.py): the regression's
estimate of each node, scaled inside each measured segment so that the nodes sum to the
segment's time. A cut in graph order is therefore priced exactly as the chain model prices it;
a set differs only in which nodes of a segment it takes, where the regression apportions the
segment's time.

    node_times(cost, gm, nodes, device)      seconds per compute node on a device
    dads_cut(cost, gm, first, second, link, compression)
                                             the least-latency DagCut at the link's bandwidth (None
                                             when one side would hold every node)
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch.fx as fx

from pared.analysis.placement import PlacementCost, _design, segment_features
from pared.ir import cuts as _cuts
from pared.ir.target import Link

_SRC, _SNK = "__dads_source__", "__dads_sink__"


@dataclass(frozen=True)
class DagCut:
    position: int                # compute nodes on the first side
    moved: tuple[str, ...]       # where they differ from the first `position` (ir/cuts.as_moved)
    compression: str             # how the float32 values cross: none | fp16 | int8
    live: tuple[str, ...]        # the values crossing
    nbytes: int                  # their bytes as sent
    first_s: float               # the first side's compute, with one call's overhead
    second_s: float              # the second side's, likewise
    codec_s: float               # encoding and decoding what crosses

    @property
    def label(self) -> str:
        """A case label: `d<position>` and, for a set that is no prefix, a digest of the moved nodes."""
        tag = "" if not self.moved else "m" + hashlib.sha1(",".join(self.moved).encode()).hexdigest()[:6]
        return f"d{self.position}{tag}" + ("" if self.compression == "none" else f"_{self.compression}")

    @property
    def name(self) -> str:
        return f"dag:{self.position}" + (f"~{len(self.moved)}" if self.moved else "")

    def latency(self, link: Link, output_bytes: int) -> float:
        """End-to-end seconds of one call: both sides, the codecs, what crosses and the outputs back."""
        return (self.first_s + self.second_s + self.codec_s + link.transfer_s(self.nbytes)
                + link.transfer_s(output_bytes))


def node_times(cost: PlacementCost, gm: fx.GraphModule, nodes: Sequence[fx.Node], device: str) -> np.ndarray:
    """Seconds of each compute node on `device`: the regression's estimate per node, scaled within
    each segment of the cost model to the segment's time (spread evenly where it estimates 0)."""
    d = cost.device(device)
    feats = [segment_features(gm, [n]) for n in nodes]
    est = np.maximum(_design(feats, d.peak_flops, d.mem_bandwidth) @ np.asarray(cost.coefficients, float), 0.0)
    out = np.zeros(len(nodes))
    for s, (a, b) in enumerate(zip(cost.cuts, cost.cuts[1:])):
        seg = est[a.position:b.position]
        total = float(seg.sum())
        if b.position > a.position:
            out[a.position:b.position] = (seg * d.segment_s[s] / total if total > 0
                                          else d.segment_s[s] / (b.position - a.position))
    return out


def _value(node: fx.Node) -> tuple[int, int] | None:
    """(bytes, float32 bytes) of a node's value (ir/cuts.value_bytes); None when it is not one tensor."""
    try:
        return _cuts.value_bytes(node)
    except ValueError:
        return None


def _codec(cost: PlacementCost, first: str, second: str, f32_bytes: int, values: int, compression: str) -> float:
    """Encoding on `first` and decoding on `second` of `values` float32 values of `f32_bytes`."""
    n = f32_bytes // 4
    return (cost.codec_values_s(first, compression, "send", n, values)
            + cost.codec_values_s(second, compression, "recv", n, values))


def dads_cut(cost: PlacementCost, gm: fx.GraphModule, first: str, second: str, link: Link,
             compression: str = "none") -> DagCut | None:
    """The split of `gm` (shapes recorded: ir/cuts.propagate_shapes; the graph `cost` describes)
    of least modeled latency over `link`, as a minimum s-t cut (see module docstring). None
    when the minimum puts every compute node on one side."""
    import networkx as nx
    if compression not in _cuts.COMPRESSION:
        raise ValueError(f"unknown compression {compression!r}; known: {', '.join(_cuts.COMPRESSION)}")
    nodes = _cuts.compute_nodes(gm)
    t1 = node_times(cost, gm, nodes, first)
    t2 = node_times(cost, gm, nodes, second)
    compute = set(nodes)
    g = nx.DiGraph()
    for n, a, b in zip(nodes, t1, t2):
        g.add_edge(_SRC, n.name, capacity=float(b))
        g.add_edge(n.name, _SNK, capacity=float(a))
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    for v in gm.graph.nodes:
        if v.op == "placeholder":
            g.add_edge(_SRC, v.name)                    # no capacity: unbounded
        elif v not in compute:
            continue
        readers = [u for u in v.users if u in compute]
        if not readers:
            continue
        val = _value(v)
        aux = ("sent", v.name)
        if val is None:
            g.add_edge(v.name, aux)
        else:
            nb, f32 = val
            g.add_edge(v.name, aux, capacity=_cuts.sent_bytes(nb, f32, compression, 1) / link.bandwidth
                       + _codec(cost, first, second, f32, 1 if f32 else 0, compression))
        for u in readers:
            g.add_edge(aux, u.name)
            g.add_edge(u.name, v.name)                  # precedence: a reader on the first side ...
    for y in out_node.all_input_nodes:
        if y in compute:
            g.add_edge(y.name, _SNK)                    # outputs on the second side
    _, (src_side, _) = nx.minimum_cut(g, _SRC, _SNK)
    side = {n for n in nodes if n.name in src_side}
    if not side or len(side) == len(nodes):
        return None
    position, moved = _cuts.as_moved(gm, side)
    _cuts.first_set(gm, position, moved)                # closed under inputs (checked)
    live = _cuts.live_of(gm, side)
    nbytes = f32 = values = 0
    for v in live:
        b, f = _value(v) or (0, 0)
        nbytes += _cuts.sent_bytes(b, f, compression, 1)
        f32 += f
        values += bool(f)
    over1, over2 = cost.device(first).overhead_s, cost.device(second).overhead_s
    inside = np.array([n in side for n in nodes])
    return DagCut(position, moved, compression, tuple(v.name for v in live), nbytes,
                  float(t1[inside].sum()) + over1, float(t2[~inside].sum()) + over2,
                  _codec(cost, first, second, f32, values, compression))
