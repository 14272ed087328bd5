"""A TVM artifact's weights: parameters of each graph, stored once in one file.

Each graph's Relax module is built with its weights as constants (a quantized
graph's weight-side work — int4 dequantize, int8 column sums — folded at build),
then every constant of at least `MIN_BYTES` is lifted out of `main` into a
trailing parameter (a constant whose elements are all equal is made at run time
by `full` instead). The shared library holds only code; the values go to a
weights file, and the manifest entry lists them in parameter order:

    "params": [{"key": "<sha256>", "dtype": "float32", "shape": [64, 64],
                "offset": 0, "bytes": 16384}, ...],  "weights_file": "tvm.weights"

`key` is a content hash (dtype, shape, bytes). After every graph is lowered,
`merge` rewrites the per-graph files into one `tvm.weights` holding each key
once, so graph variants of one Program (a cache pass's full / forecast graphs,
timestep buckets) store the weights they share once. At run time `WeightStore`
reads the file once per process and hands every graph of the artifact the same
device tensors, so variants also share them in memory. Torch-free at run time.
"""
from __future__ import annotations

import hashlib
import os
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
    mod.update_func(mod.get_global_var("main"), new)     # the module is the caller's fresh build
    return mod, lifter.values


def write(path: str, values: Sequence[tuple[str, np.ndarray]]) -> list[dict]:
    """Write the values (each key once) to `path`; their manifest records, in order."""
    records, offsets = [], {}
    with open(path, "wb") as f:
        for key, arr in values:
            if key not in offsets:
                f.write(b"\0" * ((-f.tell()) % ALIGN))
                offsets[key] = f.tell()
                f.write(np.ascontiguousarray(arr).tobytes())
            records.append({"key": key, "dtype": str(arr.dtype), "shape": list(arr.shape),
                            "offset": offsets[key], "bytes": int(arr.nbytes)})
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
                    f.write(data)
    for g, e in own.items():
        os.remove(os.path.join(outdir, e["weights_file"]))
        params = [dict(p, offset=offsets[p["key"]]) for p in e["params"]]
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
                    if n != int(p["bytes"]) or int(p["offset"]) + n > self.size:
                        raise ArtifactError(f"{where}: weight {p['key'][:12]} ({p['dtype']} {list(shape)}) does "
                                            f"not fit {os.path.basename(self.path)} ({self.size} bytes)")
                    arr = np.fromfile(self.path, dtype=dtype, count=n // dtype.itemsize,
                                      offset=int(p["offset"])).reshape(shape)
                    t = tvm.runtime.tensor(arr, self.device)
                    self._tensors[p["key"]] = t
                out.append(t)
        return out
