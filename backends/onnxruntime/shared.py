"""Store the initializers that several graphs of one artifact hold once.

Graph variants of one Program (a cache pass's `full` / `reuse`, timestep_quant's
per-bucket graphs) are exported one ONNX file each, and each file embeds every
weight it reads: four variants sharing one set of int8 weights would store it
four times. After every graph is lowered, an initializer whose bytes appear in
two or more files (and that is at least `MIN_BYTES`) is written once to
`shared.weights` and each file refers to it as ONNX external data (location,
offset, length), which ONNX Runtime reads when it builds each session. Files
that already use external data (graphs over 1 GB) are left alone.

At run time `SharedWeights` reads each range of `shared.weights` once per process
into a numpy buffer wrapped as an OrtValue, and every session of the artifact is
handed the same OrtValue for its initializer (SessionOptions.add_initializer), so
the variants also share the weights in memory (see runtime.OrtGraph for when).
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping

import numpy as np

from pared.backends.artifact import SharedFile
from pared.ir.errors import ArtifactError

SHARED_FILE = "shared.weights"
#: initializers smaller than this stay in their file (the bookkeeping would outweigh them)
MIN_BYTES = 1024
#: offsets in the shared file are aligned to this (ORT may map the file)
ALIGN = 64
#: ONNX element types (TensorProto.DataType) read into numpy buffers at run time; an
#: initializer of another type (bfloat16, float8, ...) is left to ORT, which reads its own copy
NUMPY_TYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
               10: "float16", 11: "float64", 12: "uint32", 13: "uint64"}


def share_initializers(entries: Mapping[str, dict], outdir: str) -> dict[str, dict]:
    """Move initializers held by two or more graph files into one shared file.

    Args:
        entries: graph name -> manifest entry (as lower_graph returns it).
        outdir: the directory the files are in.
    Returns:
        the entries, with `shared.weights` added to the `files` of each graph
        that now reads from it and `shared_initializers` (how many) recorded.
    """
    import onnx
    from onnx import external_data_helper as ext

    plain = {g: e for g, e in entries.items() if e.get("backend") == "onnxruntime" and len(e.get("files", [])) == 1}
    if len(plain) < 2:
        return dict(entries)
    models = {g: onnx.load(os.path.join(outdir, e["file"])) for g, e in plain.items()}
    holders: dict[str, set] = {}
    for g, m in models.items():
        for init in m.graph.initializer:
            key = _key(init)
            if key is not None:
                holders.setdefault(key, set()).add(g)
    shared = {k for k, gs in holders.items() if len(gs) >= 2}
    if not shared:
        return dict(entries)
    offsets: dict[str, tuple[int, int]] = {}
    out = {g: dict(e) for g, e in entries.items()}
    with open(os.path.join(outdir, SHARED_FILE), "wb") as f:
        for g, m in models.items():
            moved = 0
            for init in m.graph.initializer:
                key = _key(init)
                if key not in shared:
                    continue
                if key not in offsets:
                    pad = (-f.tell()) % ALIGN
                    f.write(b"\0" * pad)
                    offsets[key] = (f.tell(), len(init.raw_data))
                    f.write(init.raw_data)
                offset, length = offsets[key]
                ext.set_external_data(init, SHARED_FILE, offset=offset, length=length)
                init.ClearField("raw_data")
                init.data_location = onnx.TensorProto.EXTERNAL
                moved += 1
            if moved:
                onnx.save(m, os.path.join(outdir, plain[g]["file"]))
                out[g]["files"] = list(out[g]["files"]) + [SHARED_FILE]
                out[g]["shared_initializers"] = moved
    return out


def _key(init: Any) -> str | None:
    """A content key for an initializer stored as raw bytes of at least MIN_BYTES, else None."""
    if init.data_location == 1 or len(init.raw_data) < MIN_BYTES:     # 1: EXTERNAL
        return None
    h = hashlib.sha256(init.raw_data).hexdigest()
    return f"{init.data_type}:{tuple(init.dims)}:{h}"


def shared_references(model: Any) -> list[tuple[str, int, int | None, int, tuple[int, ...]]]:
    """The initializers of an ONNX model (loaded without its external data) stored in
    `shared.weights`: [(name, offset, length or None, ONNX element type, dims)]."""
    out = []
    for init in model.graph.initializer:
        if init.data_location != 1:                                    # 1: EXTERNAL
            continue
        info = {e.key: e.value for e in init.external_data}
        if info.get("location") != SHARED_FILE:
            continue
        length = int(info["length"]) if "length" in info else None
        out.append((init.name, int(info.get("offset", 0)), length, int(init.data_type), tuple(int(d) for d in init.dims)))
    return out


class SharedWeights(SharedFile):
    """The tensors of one artifact's `shared.weights` as OrtValues, each read once per
    process and handed to every session that reads it (the mirror of the TVM backend's
    WeightStore). Held weakly: when every graph of the artifact is gone, so are the buffers.

    An OrtValue made by `ortvalue_from_numpy` points into its numpy buffer (no copy on the
    CPU) and keeps it alive; a session given one with `add_initializer` uses that buffer
    instead of its own, and must not outlive it (runtime.make_session ties them together).
    """

    def __init__(self, path: str):
        self.path = path
        self.size = os.path.getsize(path)
        self._values: dict[tuple, Any] = {}

    @classmethod
    def get(cls, path: str, where: str) -> "SharedWeights":
        """The store of `path`, shared by every graph that reads it while any holds it.

        Raises:
            ArtifactError: `path` is missing (`where` names the graph that reads it).
        """
        return cls.open(path, missing=f"{where} reads its weights from {SHARED_FILE}, which is missing ({path}); "
                                      "re-export the artifact")

    def __len__(self) -> int:
        return len(self._values)

    def initializers(self, refs: list[tuple[str, int, int | None, int, tuple[int, ...]]], where: str) -> dict[str, Any]:
        """name -> OrtValue for each of `refs` (as `shared_references` gives them) whose type
        numpy holds; equal ranges (offset, length, type, dims) get the same OrtValue.

        Raises:
            ArtifactError: a range outside the file, or whose length does not fit its type and dims.
        """
        import onnxruntime as ort

        out = {}
        with self._lock:
            for name, offset, length, elem, dims in refs:
                if elem not in NUMPY_TYPES:
                    continue
                dtype = np.dtype(NUMPY_TYPES[elem])
                n = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
                if (length is not None and length != n) or offset < 0 or offset + n > self.size:
                    raise ArtifactError(
                        f"{where}: initializer '{name}' ({dtype} {list(dims)}, {n} bytes) reads bytes "
                        f"[{offset}, {offset + (length if length is not None else n)}) of {self.path}, which has "
                        f"{self.size} bytes; the artifact is damaged, re-export it")
                key = (offset, n, elem, dims)
                value = self._values.get(key)
                if value is None:
                    arr = np.fromfile(self.path, dtype=dtype, count=n // dtype.itemsize, offset=offset).reshape(dims)
                    value = ort.OrtValue.ortvalue_from_numpy(arr)
                    self._values[key] = value
                out[name] = value
        return out
