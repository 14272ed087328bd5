"""Cuts: where a graph can be split in two, what crosses each cut, and the split itself.

A cut at position p splits a graph's compute nodes (its call_function nodes, in graph
order) into the first p, which run on one device, and the rest, which run on
another. What crosses is the cut's live set: every value computed before it (or a
graph input) that a node after it, or the graph's output, reads. Parameters do not
cross: each side reads its own copy (a partition keeps the weights of the layers
between its eligible cuts on both sides, RoboECC's parameter-sharing pool, so moving
the cut moves no weights).

Candidates sit at region boundaries: after the last node of a run of nodes from one
module whose path matches a pattern (`blocks.*` after each block, `blocks.*.attn`
after attention, `blocks.*.mlp.fc1` after the MLP expansion; `**` anywhere). A
module called several times (a head run once per unrolled denoising step) has a run
per call; its cuts are numbered by the call (`after:head.blocks.1#3`). Two more cuts
always exist: `input` (position 0: the other side runs everything) and `output`
(everything runs on this side).

A graph whose nodes are not a chain still splits correctly at any position (the
live set is what crosses). Topological order is torch.export's, so a value an early
node computes for a late one crosses every cut in between: that is counted, and such
cuts are seldom chosen. A cut need not follow graph order: any set of compute nodes
closed under inputs can run first (`first_set`; a DAG min-cut, DADS, finds one:
analysis/dads.dads_cut); it is named by a position and the nodes `moved` across
it.

    compute_nodes(gm)              the call_function nodes, in order
    live_at(gm, p)                 the values crossing position p
    live_of(gm, first)             the values crossing from a set of compute nodes to the rest
    first_set(gm, p, moved)        a cut's first-side nodes (checked closed under inputs)
    as_moved(gm, first)            a first-side set as (position, moved)
    candidate_cuts(gm, at)         the candidate Cuts with their bytes (a cut where a graph output is
                                   already computed is left out: the second part would return its input)
    split(gm, p, moved)            (first, second): two GraphModules sharing gm's parameters
    compress(first, second, mode)  fp16 or int8 (per-tensor scale) across the cut
    pass_through(first)            outputs of a first part that are its inputs unchanged
    codec_graph(mode, side, n)     the encoder (or decoder) of one float value of n elements alone,
                                   for timing what compress adds
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx as fx

from .regions import match, node_module_path
from .rewrite import METADATA_ASSERTS

COMPRESSION = ("none", "fp16", "int8")


@dataclass(frozen=True)
class Cut:
    name: str                  # "input", "after:<region>#<call>", "output"
    position: int              # compute nodes before the cut, 0 .. len(compute_nodes)
    live: tuple[str, ...]      # names of the values crossing, in graph order
    nbytes: int                # their bytes (fp32 as computed)
    float_bytes: int           # the part of nbytes in float32 tensors (what compression shrinks)

    def bytes_as(self, compression: str) -> int:
        """Bytes crossing with the float32 values sent as `compression` (sent_bytes)."""
        return sent_bytes(self.nbytes, self.float_bytes, compression, len(self.live))


def sent_bytes(nbytes: int, f32_bytes: int, compression: str, values: int) -> int:
    """Bytes on the link of `values` values of `nbytes` bytes, `f32_bytes` of them float32, with
    the float32 sent as `compression` (what `compress` sends: fp16 halves them; int8 quarters
    them plus a 4-byte scale per value, counted for each of `values`: an upper bound)."""
    if compression == "none":
        return nbytes
    if compression == "fp16":
        return nbytes - f32_bytes + f32_bytes // 2
    if compression == "int8":
        return nbytes - f32_bytes + f32_bytes // 4 + 4 * values
    raise ValueError(f"unknown compression {compression!r}; known: {', '.join(COMPRESSION)}")


def compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes that compute (call_function), in graph order; metadata checks left out."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target not in METADATA_ASSERTS]


def live_at(gm: fx.GraphModule, position: int) -> list[fx.Node]:
    """The values crossing a cut after the first `position` compute nodes, in graph order:
    graph inputs and computed values read after it (parameters excluded)."""
    nodes = compute_nodes(gm)
    if not 0 <= position <= len(nodes):
        raise ValueError(f"cut position {position} is outside 0..{len(nodes)}")
    return live_of(gm, set(nodes[:position]))


def live_of(gm: fx.GraphModule, first: set[fx.Node]) -> list[fx.Node]:
    """The values crossing from the compute nodes `first` to the rest, in graph order: graph
    inputs and values of `first` read by another compute node or by the graph's output."""
    after = {n for n in compute_nodes(gm) if n not in first}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    return [n for n in gm.graph.nodes if (n.op == "placeholder" or n in first)
            and any(u in after or u is out_node for u in n.users)]


def first_set(gm: fx.GraphModule, position: int, moved: Sequence[str] = ()) -> set[fx.Node]:
    """The compute nodes of a cut's first side: the first `position`, with the nodes named in
    `moved` switched to the other side (a DAG cut: `moved` is empty for a cut in graph order).

    Raises:
        ValueError: a position out of range, a name that is no compute node, or a set that is not
            closed under its inputs (a first-side node reading a second-side value: nothing comes
            back from the second side before it ends), naming the node.
    """
    nodes = compute_nodes(gm)
    if not 0 <= position <= len(nodes):
        raise ValueError(f"cut position {position} is outside 0..{len(nodes)}")
    first = set(nodes[:position])
    by_name = {n.name: n for n in nodes}
    for name in moved:
        if name not in by_name:
            raise ValueError(f"cut: {name!r} is no compute node of the graph")
        first ^= {by_name[name]}
    compute = set(nodes)
    for n in nodes:
        if n in first:
            bad = [a.name for a in n.all_input_nodes if a in compute and a not in first]
            if bad:
                raise ValueError(f"cut: node {n.name} is on the first side but reads {bad} from the second; a cut "
                                 "must be closed under inputs (nothing returns before the second side ends)")
    return first


def as_moved(gm: fx.GraphModule, first: set[fx.Node] | set[str]) -> tuple[int, tuple[str, ...]]:
    """A first-side set as (position, moved): position its size, moved the nodes (in graph order)
    where it differs from the first `position` compute nodes (empty for a cut in graph order)."""
    nodes = compute_nodes(gm)
    names = {n if isinstance(n, str) else n.name for n in first}
    p = sum(1 for n in nodes if n.name in names)
    prefix = {n.name for n in nodes[:p]}
    return p, tuple(n.name for n in nodes if (n.name in names) != (n.name in prefix))


def value_bytes(node: fx.Node) -> tuple[int, int]:
    """(bytes, the part of them in float32: what `compress` shrinks) of a node's value.

    Raises:
        ValueError: no shape recorded (run propagate_shapes), or a value that is not one tensor
            (a tuple of a multi-output op), naming the node.
    """
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        shape, dtype = v.shape, v.dtype
    else:
        tm = node.meta.get("tensor_meta")
        if tm is None:
            raise ValueError(f"cut: value {node.name} has no shape recorded (run shape propagation first)")
        if not hasattr(tm, "shape"):
            raise ValueError(f"cut: value {node.name} is not one tensor; it cannot cross a cut alone")
        shape, dtype = tm.shape, tm.dtype
    n = math.prod(int(s) for s in shape) * torch.empty((), dtype=dtype).element_size()
    return n, n if dtype == torch.float32 else 0


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Record every node's shape and dtype (`tensor_meta`) by running the graph on the examples."""
    from torch.fx.passes.shape_prop import ShapeProp
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)


def _bytes_of(nodes: Sequence[fx.Node]) -> tuple[int, int]:
    total = flt = 0
    for n in nodes:
        b, f = value_bytes(n)
        total += b
        flt += f
    return total, flt


def _runs(nodes: Sequence[fx.Node]) -> list[tuple[str, int]]:
    """(module path, index of its last node) for each maximal run of nodes inside one module
    instance, for every module on the nodes' stacks, in order of the run's end."""
    ends: list[tuple[str, int]] = []
    open_paths: dict[str, int] = {}
    prev: set[str] = set()
    for i, n in enumerate(nodes):
        paths = {p for p, _ in node_module_path(n)}
        for p in prev - paths:
            ends.append((p, open_paths.pop(p)))
        for p in paths:
            open_paths[p] = i
        prev = paths
    for p in sorted(prev, key=lambda p: -p.count(".")):
        ends.append((p, open_paths[p]))
    ends.sort(key=lambda e: (e[1], -e[0].count(".")))
    return ends


def candidate_cuts(gm: fx.GraphModule, at: Sequence[str] = ("**",)) -> list[Cut]:
    """The candidate cuts: `input`, after each run of a module matching a pattern of `at`
    (see module docstring), and `output`, in position order; cuts at one position are one
    (the outermost region names it). Shapes must be recorded (propagate_shapes)."""
    nodes = compute_nodes(gm)
    calls: dict[str, int] = {}
    by_pos: dict[int, str] = {}
    for path, last in _runs(nodes):
        calls[path] = calls.get(path, 0) + 1
        if not any(match(p, path) for p in at):
            continue
        pos = last + 1
        if pos >= len(nodes):
            continue
        name = f"after:{path}#{calls[path]}"
        if pos not in by_pos or path.count(".") < by_pos[pos].split(":", 1)[1].count("."):
            by_pos[pos] = name
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = set(out_node.all_input_nodes)
    cuts = []
    for pos, name in [(0, "input"), *sorted(by_pos.items()), (len(nodes), "output")]:
        live = live_at(gm, pos)
        if 0 < pos < len(nodes) and outputs & set(live):
            continue   # an output already computed would be the second part's input returned as it is
        total, flt = _bytes_of(live)
        cuts.append(Cut(name, pos, tuple(n.name for n in live), total, flt))
    return cuts


def _extract(gm: fx.GraphModule, inputs: Sequence[fx.Node], body: Sequence[fx.Node], outputs) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in inputs:
        ph = g.placeholder(n.name)
        ph.meta = dict(n.meta)
        env[n] = ph

    def lookup(a: fx.Node) -> fx.Node:
        if a not in env:
            if a.op != "get_attr":
                raise ValueError(f"cut: node reads {a.name}, which is on the other side of the cut and not "
                                 "in its live set")
            env[a] = g.get_attr(a.target)
            env[a].meta = dict(a.meta)
        return env[a]
    for n in body:
        env[n] = g.node_copy(n, lookup)
    g.output(fx.node.map_arg(outputs, lookup))
    out = fx.GraphModule(gm, g, gm.__class__.__name__)
    out.graph.lint()
    return out


def split(gm: fx.GraphModule, position: int, moved: Sequence[str] = ()
          ) -> tuple[fx.GraphModule, fx.GraphModule, list[str]]:
    """The graph cut after `position` compute nodes (with `moved` switched to the other side, a
    DAG cut: first_set): (first, second, live names).

    first takes gm's inputs and returns the live values (a tuple, in graph order); second
    takes the live values (placeholders named as them) and returns gm's outputs. Both
    read gm's parameters (the same tensors). second(*first(*x)) computes gm(*x).
    """
    nodes = compute_nodes(gm)
    side = first_set(gm, position, moved)
    live = live_of(gm, side)
    ins = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    first = _extract(gm, ins, [n for n in nodes if n in side], tuple(live))
    second = _extract(gm, live, [n for n in nodes if n not in side], out_node.args[0])
    return first, second, [n.name for n in live]


def pass_through(first: fx.GraphModule) -> dict[int, int]:
    """Outputs of a first part that are its own inputs, unchanged: output index -> input index."""
    phs = [n for n in first.graph.nodes if n.op == "placeholder"]
    out = next(n for n in first.graph.nodes if n.op == "output")
    return {i: phs.index(v) for i, v in enumerate(out.args[0]) if isinstance(v, fx.Node) and v.op == "placeholder"}


def drop_outputs(gm: fx.GraphModule, indices: set[int]) -> None:
    """Remove the outputs at `indices` from gm (in place), and what only they needed."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (tuple(v for i, v in enumerate(out.args[0]) if i not in indices),)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


_aten = torch.ops.aten


def _send(g: fx.Graph, v: fx.Node, mode: str) -> list[fx.Node]:
    """Nodes (before the output) encoding float32 value v as `mode`."""
    if mode == "fp16":
        return [g.call_function(_aten._to_copy.default, (v,), {"dtype": torch.float16})]
    a = g.call_function(_aten.abs.default, (v,))
    m = g.call_function(_aten.max.default, (a,))
    s = g.call_function(_aten.div.Tensor, (m, 127.0))
    s = g.call_function(_aten.clamp_min.default, (s, 1e-12))
    s = g.call_function(_aten.reshape.default, (s, [1]))
    q = g.call_function(_aten.div.Tensor, (v, s))
    q = g.call_function(_aten.round.default, (q,))
    q = g.call_function(_aten.clamp.default, (q, -127.0, 127.0))
    q = g.call_function(_aten._to_copy.default, (q,), {"dtype": torch.int8})
    return [q, s]


def _recv(g: fx.Graph, phs: Sequence[fx.Node], mode: str) -> fx.Node:
    """Nodes decoding the received placeholders back to float32."""
    x = g.call_function(_aten._to_copy.default, (phs[0],), {"dtype": torch.float32})
    if mode == "int8":
        x = g.call_function(_aten.mul.Tensor, (x, phs[1]))
    return x


def compress(first: fx.GraphModule, second: fx.GraphModule, mode: str,
             examples: Sequence[torch.Tensor]) -> list[str]:
    """Rewrite a split pair in place so the float32 values crossing travel as `mode`:
    fp16 (a cast each way) or int8 (per-tensor symmetric: q = round(x / s), s = max|x| / 127,
    sent as q and s; the receiver computes q * s; a value whose example holds infinities goes as
    fp16 instead). Other dtypes cross as they are.

    Args:
        examples: the crossing values, in order (their dtypes decide what is compressed).
    Returns:
        the names of what now crosses, in order (first's outputs = second's inputs): a
        compressed value x as x_fp16, or as x_q and x_scale.
    """
    if mode not in COMPRESSION:
        raise ValueError(f"unknown compression {mode!r}; known: {', '.join(COMPRESSION)}")
    out_node = next(n for n in first.graph.nodes if n.op == "output")
    sent = list(out_node.args[0])
    phs = [n for n in second.graph.nodes if n.op == "placeholder"]
    if len(sent) != len(phs) or len(phs) != len(examples):
        raise ValueError(f"compress: {len(sent)} values sent, {len(phs)} received, {len(examples)} examples")
    new_sent: list[fx.Node] = []
    names: list[str] = []
    # int8 needs a finite scale: a value with infinities (a -inf attention mask) goes as fp16, which
    # keeps them
    plan = ["none" if mode == "none" or ex.dtype != torch.float32 else
            "fp16" if mode == "int8" and not bool(torch.isfinite(ex).all()) else mode for ex in examples]
    with first.graph.inserting_before(out_node):
        for v, m in zip(sent, plan):
            new_sent += [v] if m == "none" else _send(first.graph, v, m)
    out_node.args = (tuple(new_sent),)
    first_compute = next((n for n in second.graph.nodes if n.op != "placeholder"), None)
    for ph, m in zip(phs, plan):
        if m == "none":
            names.append(ph.name)
            continue
        suffixes = ["_fp16"] if m == "fp16" else ["_q", "_scale"]
        with second.graph.inserting_before(ph):
            new_phs = [second.graph.placeholder(ph.name + sfx) for sfx in suffixes]
        with second.graph.inserting_before(first_compute):
            x = _recv(second.graph, new_phs, m)
        ph.replace_all_uses_with(x)
        second.graph.erase_node(ph)
        names += [p.name for p in new_phs]
    for gm in (first, second):
        gm.graph.lint()
        gm.recompile()
    return names


def codec_graph(mode: str, side: str, n: int) -> tuple[fx.GraphModule, tuple[str, ...], tuple[torch.Tensor, ...]]:
    """The nodes compress adds for one float32 value of n elements, as a graph of their own:
    side "send" encodes x as `mode`, side "recv" decodes what was sent back to float32.

    Returns:
        (the graph module, its input names, example inputs).
    """
    if mode not in COMPRESSION or mode == "none" or side not in ("send", "recv"):
        raise ValueError(f"codec_graph: no codec for mode {mode!r} side {side!r}; modes: fp16, int8; sides: "
                         "send, recv")
    g = fx.Graph()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen)
    if side == "send":
        outs = _send(g, g.placeholder("x"), mode)
        names, examples = ("x",), (x,)
    elif mode == "fp16":
        outs = [_recv(g, [g.placeholder("x_fp16")], mode)]
        names, examples = ("x_fp16",), (x.half(),)
    else:
        outs = [_recv(g, [g.placeholder("x_q"), g.placeholder("x_scale")], mode)]
        names, examples = ("x_q", "x_scale"), ((x * 40).round().clamp(-127, 127).to(torch.int8), torch.tensor([0.02]))
    g.output(tuple(outs))
    gm = fx.GraphModule(torch.nn.Module(), g)
    propagate_shapes(gm, examples)
    return gm, names, examples
