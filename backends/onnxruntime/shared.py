"""Store the initializers that several graphs of one artifact hold once.

Graph variants of one Program (a cache pass's `full` / `reuse`, timestep_quant's
per-bucket graphs) are exported one ONNX file each, and each file embeds every
weight it reads: four variants sharing one set of int8 weights would store it
four times. After every graph is lowered, an initializer whose bytes appear in
two or more files (and that is at least `MIN_BYTES`) is written once to
`shared.weights` and each file refers to it as ONNX external data (location,
offset, length), which ONNX Runtime reads when it builds each session. Files
that already use external data (graphs over 1 GB) are left alone.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping

SHARED_FILE = "shared.weights"
#: initializers smaller than this stay in their file (the bookkeeping would outweigh them)
MIN_BYTES = 1024
#: offsets in the shared file are aligned to this (ORT may map the file)
ALIGN = 64


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
