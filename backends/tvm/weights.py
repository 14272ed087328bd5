"""A TVM artifact's weights: parameters of each graph, stored once in one file.

Each graph's Relax module is built with its weights as constants (a quantized
graph's weight-side work — int4 dequantize, int8 column sums — folded at build),
then every constant of at least `MIN_BYTES` is lifted out of `main` into a
trailing parameter (a constant whose elements are all equal is made at run time
by `full` instead). The shared library holds only code; the values go to a
weights file, and the manifest entry lists them in parameter order:

    "params": [{"key": "<sha256>", "dtype": "float32", "shape": [64, 64],
                "offset": 0, "bytes": 16384}, ...],  "weights_file": "tvm.weights"

`key` is a content hash (dtype, shape, bytes). A weight-only layer's float weight
(int4 or int8 codes dequantized at build, see backends/tvm/quant.py) is stored as the
codes it came from instead: the record gains `"derive": {"op": "dequantize_blocks",
...}` and its `bytes` are the packed codes (two int4 codes a byte), the block scales
and zero points; WeightStore dequantizes them once at load, exactly as the graph does
((code - zero point) * scale in float32, then the graph's view / transpose), and
checks the result against `key`. On disk an int4 weight takes ~0.66 of a byte per
element instead of 4; in memory and speed it is the float weight, as before.
After every graph is lowered,
`merge` rewrites the per-graph files into one `tvm.weights` holding each key
once, so graph variants of one Program (a cache pass's full / forecast graphs,
timestep buckets) store the weights they share once. At run time `WeightStore`
reads the file once per process and hands every graph of the artifact the same
device tensors, so variants also share them in memory. Torch-free at run time.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from pared.backends.artifact import SharedFile
from pared.ir.errors import ArtifactError

#: the one weights file of a TVM artifact
WEIGHTS_FILE = "tvm.weights"
#: constants smaller than this stay inside the shared library
MIN_BYTES = 1024
#: offsets in a weights file are aligned to this
ALIGN = 64


def _key(arr: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}:{tuple(arr.shape)}:".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def lift(mod: Any, min_bytes: int = MIN_BYTES) -> tuple[Any, list[tuple[str, np.ndarray]]]:
    """`main` with each constant of at least `min_bytes` replaced by a new trailing
    parameter (equal constants become one parameter).

    Returns:
        the module and [(key, value)] in the order of the added parameters.
    """
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _Lift(PyExprMutator):
        def __init__(self, mod=None):
            super().__init__(mod)
            self.vars: dict[str, Any] = {}
            self.values: list[tuple[str, np.ndarray]] = []

        def visit_generic_const_(self, op):
            value = getattr(op, "value", None)
            if not hasattr(value, "numpy"):
                return op
            arr = value.numpy()
            if arr.nbytes < min_bytes:
                return op
            flat = arr.reshape(-1)
            if flat.size and (flat == flat[0]).all():
                # a splat (a folded zeros_like): made at run time, not stored
                return relax.op.full(arr.shape, relax.const(flat[0], str(arr.dtype)), str(arr.dtype))
            key = _key(arr)
            if key not in self.vars:
                self.vars[key] = relax.Var(f"w{len(self.vars)}", relax.TensorType(arr.shape, str(arr.dtype)))
                self.values.append((key, arr))
            return self.vars[key]

    fn = mod["main"]
    lifter = _Lift(mod)
    body = lifter.visit_expr(fn.body)
    if not lifter.values:
        return mod, []
    params = list(fn.params) + [lifter.vars[k] for k, _ in lifter.values]
    new = relax.Function(params, body, None, fn.is_pure, fn.attrs)
    # the leading params are the graph's inputs, the rest weights: what LiftTransformParams reads
    # to move weight-only work (schedule.prepack_weights) out of `main`
    new = new.with_attr("num_input", len(fn.params))
    mod.update_func(mod.get_global_var("main"), new)     # the module is the caller's fresh build
    return mod, lifter.values


def fold_transposes(mod: Any) -> tuple[Any, int]:
    """`main` with every transpose (permute_dims) of a constant replaced by the transposed
    constant: a linear layer's weight is stored in the layout its matmul reads, instead of
    transposed on every call. Only transposes are folded: they keep the constant's size (a
    general constant fold would also materialize weights broadcast over the batch). Returns the
    module and how many were folded."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _Fold(PyExprMutator):
        def __init__(self, mod=None):
            super().__init__(mod)
            self.folded = 0

        def visit_call_(self, op):
            new = super().visit_call_(op)
            if getattr(new.op, "name", "") != "relax.permute_dims":
                return new
            value = getattr(new.args[0], "value", None)
            if not hasattr(value, "numpy"):
                return new
            arr = value.numpy()
            axes = new.attrs.axes
            perm = [int(x) for x in axes] if axes is not None else None
            self.folded += 1
            return relax.const(np.ascontiguousarray(np.transpose(arr, perm)), str(arr.dtype))

    fn = mod["main"]
    folder = _Fold(mod)
    body = folder.visit_expr(fn.body)
    if not folder.folded:
        return mod, 0
    mod.update_func(mod.get_global_var("main"), relax.Function(fn.params, body, None, fn.is_pure,
                                                               fn.attrs))
    return mod, folder.folded


# -- weights derived from weight-only codes ---------------------------------------------------
#: what a derived weight's `derive` says
DERIVE_OP = "dequantize_blocks"


@dataclass(frozen=True)
class Codes:
    """A weight-only layer's codes, block scales and zero points (as the fx graph holds them) and
    how the graph lays out their dequantized values: `view` (a reshape, or None) then `transpose`."""
    codes: np.ndarray            # [groups, block] uint8 / int8
    scales: np.ndarray           # [groups] float32
    zero_points: np.ndarray      # [groups] integer
    bits: int                    # 4 or 8
    view: tuple[int, ...] | None
    transpose: bool

    def dequantized(self) -> np.ndarray:
        """The float32 weight exactly as the graph computes it: (code - zero point) * scale."""
        z = self.zero_points.astype(np.float32)[:, None]
        w = (self.codes.astype(np.float32) - z) * self.scales.astype(np.float32)[:, None]
        if self.view is not None:
            w = w.reshape(self.view)
        return np.ascontiguousarray(w.T) if self.transpose else w


def weight_only_codes(gm: Any) -> dict[str, Codes]:
    """The weight-only layers of an fx GraphModule, by the key of the float weight each one's
    codes dequantize to in every layout the graph gives it (as dequantized, after its view, after
    the view and a transpose): `quantized_decomposed.dequantize_per_channel` over constant
    uint8 / int8 codes [groups, block] with per-group scales and zero points along axis 0."""
    import torch

    out: dict[str, Codes] = {}

    def const(node: Any) -> np.ndarray | None:
        if getattr(node, "op", None) != "get_attr":
            return None
        obj = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part, None)
        return obj.detach().cpu().numpy() if isinstance(obj, torch.Tensor) else None

    for n in gm.graph.nodes:
        if n.op != "call_function" or str(n.target) != "quantized_decomposed.dequantize_per_channel.default":
            continue
        codes, scales, zps = (const(a) for a in n.args[:3])
        if codes is None or scales is None or zps is None or codes.ndim != 2 or codes.dtype not in (np.uint8, np.int8):
            continue
        if len(n.args) < 6 or n.args[3] != 0 or scales.shape != (codes.shape[0],) or zps.shape != scales.shape:
            continue
        qmin, qmax = int(n.args[4]), int(n.args[5])
        bits = 4 if qmax - qmin <= 15 and -8 <= qmin and qmax <= 15 else 8
        if bits == 4 and (codes.min(initial=0) < qmin or codes.max(initial=0) > qmax):
            continue
        layouts = [(None, False)]
        users = list(n.users)
        if len(users) == 1 and str(users[0].target) in ("aten.view.default", "aten.reshape.default"):
            shape = tuple(int(d) for d in users[0].args[1])
            layouts.append((shape, False))
            after = list(users[0].users)
            if len(shape) == 2 and len(after) == 1 and str(after[0].target) in ("aten.t.default",):
                layouts.append((shape, True))
        for view, transpose in layouts:
            c = Codes(codes, scales.astype(np.float32), zps, bits, view, transpose)
            out.setdefault(_key(c.dequantized()), c)
    return out


def _pack(c: Codes) -> tuple[bytes, dict]:
    """The stored bytes of `c` (codes, two int4 a byte; scales; zero points) and its `derive` record."""
    flat = np.ascontiguousarray(c.codes).reshape(-1).view(np.uint8)
    if c.bits == 4:
        nib = flat & 0x0F
        if nib.size % 2:
            nib = np.concatenate([nib, np.zeros(1, np.uint8)])
        codes = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)
    else:
        codes = flat
    zdt = np.int8 if c.zero_points.min(initial=0) >= -128 and c.zero_points.max(initial=0) <= 127 else np.int32
    parts = [codes.tobytes(), c.scales.astype(np.float32).tobytes(), c.zero_points.astype(zdt).tobytes()]
    derive = {"op": DERIVE_OP, "bits": c.bits, "codes_dtype": str(c.codes.dtype), "groups": int(c.codes.shape[0]),
              "block": int(c.codes.shape[1]), "zero_point_dtype": np.dtype(zdt).name,
              "view": None if c.view is None else list(c.view), "transpose": c.transpose}
    return b"".join(parts), derive


def derive(raw: np.ndarray, d: Mapping[str, Any], where: str) -> np.ndarray:
    """The float32 weight a derived record's bytes (`raw`, uint8) stand for (see _pack).

    Raises:
        ArtifactError: an unknown op or fields that do not fit the bytes.
    """
    try:
        if d.get("op") != DERIVE_OP:
            raise ValueError(f"unknown op {d.get('op')!r}")
        bits, groups, block = int(d["bits"]), int(d["groups"]), int(d["block"])
        n = groups * block
        ncode = (n + 1) // 2 if bits == 4 else n
        zdt = np.dtype(d["zero_point_dtype"])
        cdt = np.dtype(d["codes_dtype"])
        if raw.size != ncode + 4 * groups + zdt.itemsize * groups or cdt not in (np.uint8, np.int8) or bits not in (4, 8):
            raise ValueError(f"{raw.size} bytes do not hold {groups} x {block} {bits}-bit codes")
        packed = raw[:ncode]
        if bits == 4:
            nib = np.empty(2 * ncode, np.uint8)
            nib[0::2], nib[1::2] = packed & 0x0F, packed >> 4
            nib = nib[:n]
            codes = ((nib.astype(np.int16) ^ 8) - 8).astype(np.int8) if cdt == np.int8 else nib
        else:
            codes = packed.view(cdt)
        scales = raw[ncode:ncode + 4 * groups].view(np.float32)
        zps = raw[ncode + 4 * groups:].view(zdt)
        view = None if d.get("view") is None else tuple(int(v) for v in d["view"])
        return Codes(codes.reshape(groups, block), scales, zps, bits, view, bool(d.get("transpose"))).dequantized()
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{where}: a packed weight's record does not fit its bytes ({e}); re-export the "
                            "artifact") from None


def write(path: str, values: Sequence[tuple[str, np.ndarray]], codes: Mapping[str, Codes] | None = None) -> list[dict]:
    """Write the values (each key once) to `path`; their manifest records, in order. A value whose
    key is in `codes` (weight_only_codes) is stored as those codes (a `derive` record)."""
    records, offsets, stored = [], {}, {}
    with open(path, "wb") as f:
        for key, arr in values:
            if key not in offsets:
                f.write(b"\0" * ((-f.tell()) % ALIGN))
                offsets[key] = f.tell()
                c = (codes or {}).get(key)
                if c is not None and arr.dtype == np.float32:
                    data, how = _pack(c)
                    f.write(data)
                    stored[key] = {"bytes": len(data), "derive": how}
                else:
                    f.write(np.ascontiguousarray(arr).tobytes())
                    stored[key] = {"bytes": int(arr.nbytes)}
            records.append({"key": key, "dtype": str(arr.dtype), "shape": list(arr.shape),
                            "offset": offsets[key], **stored[key]})
    return records


def merge(entries: Mapping[str, dict], outdir: str) -> dict[str, dict]:
    """Rewrite the graphs' own weights files into one `WEIGHTS_FILE` holding each key
    once; entries point at it (`shared_params`: how many of a graph's parameters
    another graph also reads)."""
    own = {g: e for g, e in entries.items() if e.get("params") and e.get("weights_file")}
    if not own:
        return dict(entries)
    readers: dict[str, int] = {}
    for e in own.values():
        for key in {p["key"] for p in e["params"]}:
            readers[key] = readers.get(key, 0) + 1
    out = {g: dict(e) for g, e in entries.items()}
    tmp = os.path.join(outdir, WEIGHTS_FILE + ".part")
    offsets: dict[str, int] = {}
    stored: dict[str, dict] = {}      # key -> how its first writer stored it (bytes, derive)
    with open(tmp, "wb") as f:
        for g, e in own.items():
            src = os.path.join(outdir, e["weights_file"])
            with open(src, "rb") as s:
                for p in e["params"]:
                    if p["key"] in offsets:
                        continue
                    s.seek(p["offset"])
                    data = s.read(p["bytes"])
                    f.write(b"\0" * ((-f.tell()) % ALIGN))
                    offsets[p["key"]] = f.tell()
                    stored[p["key"]] = {k: p[k] for k in ("bytes", "derive") if k in p}
                    f.write(data)
    for g, e in own.items():
        os.remove(os.path.join(outdir, e["weights_file"]))
        params = [dict({k: v for k, v in p.items() if k != "derive"}, offset=offsets[p["key"]], **stored[p["key"]])
                  for p in e["params"]]
        files = [f for f in e.get("files", [e.get("file")]) if f != e["weights_file"]] + [WEIGHTS_FILE]
        out[g].update(params=params, weights_file=WEIGHTS_FILE, files=files,
                      shared_params=sum(1 for p in e["params"] if readers[p["key"]] > 1))
    os.replace(tmp, os.path.join(outdir, WEIGHTS_FILE))
    return out


class WeightStore(SharedFile):
    """The values of one weights file as TVM tensors on one device, made once per key."""

    def __init__(self, path: str, device: Any):
        self.path = path
        self.device = device
        self.size = os.path.getsize(path)
        self._tensors: dict[str, Any] = {}

    @classmethod
    def get(cls, path: str, device: Any) -> "WeightStore":
        """The store of `path` on `device` (shared by every graph that reads it while any holds it).

        Raises:
            ArtifactError: the file is missing.
        """
        return cls.open(path, device, missing=f"{os.path.dirname(path)}: the weights file "
                                              f"{os.path.basename(path)} is missing; re-export the artifact")

    def tensors(self, params: Sequence[Mapping[str, Any]], where: str) -> list:
        """The device tensors of `params` (manifest records), in order.

        Raises:
            ArtifactError: a record outside the file or whose bytes do not fit its shape.
        """
        import tvm

        out = []
        with self._lock:
            for p in params:
                t = self._tensors.get(p["key"])
                if t is None:
                    dtype = np.dtype(p["dtype"])
                    shape = tuple(int(d) for d in p["shape"])
                    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                    stored = int(p["bytes"]) if "derive" in p else n
                    if stored != int(p["bytes"]) or int(p["offset"]) + stored > self.size:
                        raise ArtifactError(f"{where}: weight {p['key'][:12]} ({p['dtype']} {list(shape)}) does "
                                            f"not fit {os.path.basename(self.path)} ({self.size} bytes)")
                    if "derive" in p:
                        raw = np.fromfile(self.path, dtype=np.uint8, count=stored, offset=int(p["offset"]))
                        arr = derive(raw, p["derive"], where)
                        if arr.shape != shape or arr.dtype != dtype or _key(arr) != p["key"]:
                            raise ArtifactError(f"{where}: weight {p['key'][:12]} dequantized from its codes is not "
                                                "the weight the graph was built with; re-export the artifact")
                    else:
                        arr = np.fromfile(self.path, dtype=dtype, count=n // dtype.itemsize,
                                          offset=int(p["offset"])).reshape(shape)
                    t = tvm.runtime.tensor(arr, self.device)
                    self._tensors[p["key"]] = t
                out.append(t)
        return out
