"""Lower weight-only layers (int4, and int8 from mixed_precision) to ONNX Runtime's
MatMulNBits (com.microsoft).

quantize_weights_int4 writes each layer as a per-channel dequantize of b-bit
codes viewed as [N*K/bs, bs], which torch's exporter emits as

    DequantizeLinear(_int4_<i>_w uint8 (or _int8w_<i>_w), scales, zero points, axis=0)
      -> Reshape [N, K] (absent when K == bs) -> Transpose [1, 0] -> MatMul(x, .) or Gemm(x, ., bias)

(torch cannot export an INT4 tensor or a blocked DequantizeLinear; see the pass's
docstring). This step, run on the exported file before it is checked against the
fx graph, replaces each chain, found by its codes' initializer, with

    MatMulNBits(x, codes [N, K/bs, bs*b/8] (4-bit: two per byte), scales [N*K/bs], zero
                points [N * ceil(K/bs * b/8)] (4-bit: packed) or none when all are 2^(b-1),
                bias) K, N, bits=b, block_size

which computes the same x @ dequant(codes)^T in float (accuracy_level 0). The
constants come from the fx graph (the same tensors the torch side computes with).

    int4_layers(graph)               {initializer name: Int4Weight} of an fx graph (4- and 8-bit)
    lower_matmul_nbits(path, layers) rewrite the ONNX file; returns the layers lowered
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from pared.ir.errors import BackendError

#: the codes' buffer names (see passes/quant/common.py WEIGHT_ONLY_PREFIX)
_WEIGHT = re.compile(r"^_(int4|int8w)_(\d+)_w$")
_MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class Int4Weight:
    """One weight-only layer's constants, as the fx graph holds them."""
    codes: np.ndarray        # uint8 [N * K / bs, bs], values 0..2^bits - 1
    scales: np.ndarray       # float32 [N * K / bs]
    zero_points: np.ndarray  # [N * K / bs], values 0..15 (int32 on the torch side)
    n: int
    k: int
    bits: int = 4

    @property
    def block_size(self) -> int:
        return int(self.codes.shape[1])


def int4_layers(graph) -> dict[str, Int4Weight]:
    """The weight-only layers of an fx graph: codes dequantized by quantized_decomposed
    dequantize_per_channel over [0, 15] (4 bits) or [0, 255] (8 bits) from a
    `_int4_<i>_w` / `_int8w_<i>_w` buffer, then viewed as [N, K]."""
    import torch

    from pared.ir.program import get_attr
    gm = graph.module
    out = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or str(n.target) != "quantized_decomposed.dequantize_per_channel.default":
            continue
        q, s, z = n.args[:3]
        qmin, qmax = n.args[4:6]
        if not (getattr(q, "op", None) == "get_attr" and _WEIGHT.match(str(q.target))) or \
                (qmin, qmax) not in ((0, 15), (0, 255)):
            continue
        views = [u for u in n.users if u.op == "call_function" and u.target in
                 (torch.ops.aten.view.default, torch.ops.aten.reshape.default)]
        if len(views) != 1 or len(n.users) != 1:
            continue
        n_out, k = (int(d) for d in views[0].meta["val"].shape)
        out[str(q.target)] = Int4Weight(get_attr(gm, str(q.target)).numpy(), get_attr(gm, str(s.target)).numpy(),
                                        get_attr(gm, str(z.target)).numpy(), n_out, k, 4 if qmax == 15 else 8)
    return out


def _pack_nibbles(a: np.ndarray) -> np.ndarray:
    """Pairs of 4-bit values along the last axis into bytes, the first in the low nibble
    (an odd length is padded with a zero nibble)."""
    a = a.astype(np.uint8)
    if a.shape[-1] % 2:
        a = np.concatenate([a, np.zeros(a.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (a[..., 0::2] | (a[..., 1::2] << 4)).astype(np.uint8)


def lower_matmul_nbits(path: str, layers: dict[str, Int4Weight], graph_name: str = "main") -> list[str]:
    """Replace each int4 layer's DequantizeLinear -> Reshape -> Transpose -> MatMul/Gemm
    chain in the ONNX file at `path` with one MatMulNBits; saves the file in place.

    Returns:
        the initializer names of the layers lowered (all of `layers`).
    Raises:
        BackendError: naming the graph and layer whose chain has another shape.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(path)
    g = model.graph
    consumers: dict[str, list] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    done, drop, replace = [], set(), {}
    for node in g.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in layers:
            continue
        name = node.input[0]
        lw = layers[name]
        chain = _chain(node, consumers)
        if chain is None:
            raise BackendError(f"graph '{graph_name}': int4 layer '{name}': expected DequantizeLinear -> Reshape -> "
                               "Transpose -> MatMul/Gemm after export, found another pattern; the layer would run "
                               "as a float matmul on a dequantized weight. Exclude it from quantize_weights_int4")
        reshape, transpose, mm = chain
        base = name[:-2]
        nb, bs = lw.k // lw.block_size, lw.block_size
        pack = _pack_nibbles if lw.bits == 4 else (lambda a: a.astype(np.uint8))
        inits = [numpy_helper.from_array(pack(lw.codes.reshape(lw.n, nb, bs)), f"{base}_nbits_b"),
                 numpy_helper.from_array(lw.scales.astype(np.float32).reshape(-1), f"{base}_nbits_scales")]
        ins = [mm.input[0], f"{base}_nbits_b", f"{base}_nbits_scales"]
        if not np.all(lw.zero_points == 2 ** (lw.bits - 1)):      # MatMulNBits' default zero point
            inits.append(numpy_helper.from_array(pack(lw.zero_points.reshape(lw.n, nb)).reshape(-1),
                                                 f"{base}_nbits_zp"))
            ins.append(f"{base}_nbits_zp")
        else:
            ins.append("")
        if mm.op_type == "Gemm" and len(mm.input) > 2 and mm.input[2]:
            ins += ["", mm.input[2]]                 # g_idx unused, then the bias
        new = helper.make_node("MatMulNBits", ins, list(mm.output), name=f"{base}_matmul_nbits", domain=_MS_DOMAIN,
                               K=lw.k, N=lw.n, bits=lw.bits, block_size=bs, accuracy_level=0)
        g.initializer.extend(inits)
        replace[id(mm)] = new
        drop.update({id(node), id(reshape), id(transpose)} - {id(None)})
        done.append(name)
    missing = sorted(set(layers) - set(done))
    if missing:
        raise BackendError(f"graph '{graph_name}': int4 layers {missing[:4]} were not found as DequantizeLinear on "
                           "their codes in the exported model (folded or renamed by the exporter); they would not "
                           "run as MatMulNBits")
    kept = [replace.get(id(n), n) for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(kept)
    _drop_unused(g)
    if not any(o.domain == _MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MS_DOMAIN, 1))
    onnx.save(model, path)
    return done


def _chain(dq, consumers):
    """(Reshape or None, Transpose [1, 0], MatMul/Gemm) below a DequantizeLinear, or None."""
    def only(value, op):
        users = consumers.get(value, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None
    # the Reshape is gone when the view is a no-op (one block per row: K == block_size)
    reshape = only(dq.output[0], "Reshape")
    transpose = only((reshape or dq).output[0], "Transpose")
    if not transpose or list(next((a.ints for a in transpose.attribute if a.name == "perm"), [])) != [1, 0]:
        return None
    users = consumers.get(transpose.output[0], [])
    if len(users) != 1 or users[0].op_type not in ("MatMul", "Gemm") or list(users[0].input[1:2]) != \
            [transpose.output[0]]:
        return None
    mm = users[0]
    if mm.op_type == "Gemm":
        attrs = {a.name: a for a in mm.attribute}
        flags = {k: (attrs[k].i if k in attrs else 0) for k in ("transA", "transB")}
        scal = {k: (attrs[k].f if k in attrs else 1.0) for k in ("alpha", "beta")}
        if flags != {"transA": 0, "transB": 0} or scal != {"alpha": 1.0, "beta": 1.0}:
            return None
    return reshape, transpose, mm


def _drop_unused(g) -> None:
    """Remove nodes and initializers nothing reads any more (the float chains replaced)."""
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input} | outputs
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
