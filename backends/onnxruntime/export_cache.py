"""A content-addressed cache of exported ONNX files, opt-in (`PARED_EXPORT_CACHE=DIR`).

torch.onnx.export is most of a lowering's time (a DiT step: re-trace, decompositions,
translation and the optimizer, 8 s; the VLA policy call, 18 s), and the same graph is exported
again and again: a plain artifact and a pipeline's untouched graphs, `pared bench`'s arms, a
second `pared optimize` of the same model. With the variable set, an export is looked up by a key
over everything it depends on, and a file found there is copied instead of exporting again:

- the versions of torch, onnxscript, onnx_ir and onnx, and the source of pared itself (every
  .py file of the package: its passes' ops, the custom translations, the optimizer's rules);
- the custom translation table as passed (each op's name and its function's source);
- the graph: its code (nodes, names, targets, literals), every tensor it reads (parameters,
  buffers, constants: name, dtype, shape, bytes), the types and settings of any modules it calls,
  its input and output names, its example inputs (dtype, shape, values) and dynamic dimensions;
- whether the exporter's optimizer ran.

Only a finished export is stored (written to a temporary folder, renamed into place: a reader
never sees half a file, and of two processes storing the same key one wins); a failed export
stores nothing. What lower_graph then does with the file (run it in ORT against the fx graph,
check its integer kernels) runs as before, hit or miss. Files with external data are not cached.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import os
import shutil
import tempfile
from typing import Any, Callable, Mapping

import torch

from pared.ir.program import Graph

ENV = "PARED_EXPORT_CACHE"
#: the file inside an entry's folder
FILE = "model.onnx"
#: a line per lookup, "hit" or "miss", appended by every process that uses the folder
COUNTS = "lookups.log"

_source_digest: str | None = None


def cache_dir() -> str | None:
    """The cache folder named by PARED_EXPORT_CACHE, or None when the variable is unset or empty."""
    d = os.environ.get(ENV, "").strip()
    return os.path.abspath(d) if d else None


def _versions() -> str:
    out = []
    for dist in ("torch", "onnxscript", "onnx_ir", "onnx"):
        try:
            out.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{dist}=none")
    return ";".join(out)


def pared_source_digest() -> str:
    """sha256 over every .py file of the pared package (path and bytes), computed once a process."""
    global _source_digest
    if _source_digest is None:
        # the package folder: backends/onnxruntime/ sits two levels under it (pared/backends is a link)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        h = hashlib.sha256()
        files = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
        for f in sorted(files):
            h.update(os.path.relpath(f, root).encode())
            with open(f, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
        _source_digest = h.hexdigest()
    return _source_digest


def _tensor(h: "hashlib._Hash", name: str, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.is_quantized or t.layout != torch.strided or t.device.type != "cpu":
        h.update(repr(t).encode())      # not reached by pared's graphs; still a key, if a slow one
        return
    h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _source_of(fn: Any) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return repr(fn)


def export_key(graph: Graph, *, optimize: bool, translations: Mapping[Any, Callable] | None) -> str:
    """The cache key of exporting `graph` (see the module's docstring for what it covers)."""
    h = hashlib.sha256()
    gm = graph.module
    h.update(f"{_versions()}|pared={pared_source_digest()}|optimize={optimize}\n".encode())
    for op, fn in sorted((translations or {}).items(), key=lambda kv: str(kv[0])):
        h.update(f"translation {op}\n{_source_of(fn)}\n".encode())
    h.update(gm.code.encode())
    seen = set()
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        seen.add(name)
        _tensor(h, name, t)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in seen:
            seen.add(node.target)
            value: Any = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            if isinstance(value, torch.Tensor):
                _tensor(h, node.target, value)
            elif isinstance(value, torch.nn.Module):
                h.update(f"{node.target}|{type(value).__module__}.{type(value).__qualname__}|{value.extra_repr()}".encode())
            else:
                h.update(f"{node.target}|{type(value).__qualname__}|{value!r}".encode())
        elif node.op == "call_module":
            m = gm.get_submodule(node.target)
            h.update(f"{node.target}|{type(m).__module__}.{type(m).__qualname__}|{m.extra_repr()}".encode())
    h.update(f"|in={graph.input_names}|out={graph.output_names}|dyn={graph.dynamic_dims}|".encode())
    for i, x in enumerate(graph.example_inputs):
        _tensor(h, f"input{i}", x)
    return h.hexdigest()


def fetch(key: str, path: str) -> bool:
    """Copy the cached file of `key` to `path`; False when the cache has none (or is off)."""
    root = cache_dir()
    if root is None:
        return False
    src = os.path.join(root, key[:2], key, FILE)
    if not os.path.isfile(src):
        _count(root, "miss")
        return False
    tmp = f"{path}.part"
    shutil.copyfile(src, tmp)
    os.replace(tmp, path)
    _count(root, "hit")
    return True


def _count(root: str, kind: str) -> None:
    """Append one lookup to the folder's COUNTS log (one short line in append mode: lines of
    concurrent processes do not interleave). A log that cannot be written is skipped."""
    try:
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, COUNTS), "a") as f:
            f.write(kind + "\n")
    except OSError:
        pass


def counts(root: str | None = None) -> dict[str, int]:
    """{"hit": n, "miss": m}: the lookups logged in the cache folder (default: PARED_EXPORT_CACHE's)
    since it was created."""
    root = root or cache_dir()
    got = {"hit": 0, "miss": 0}
    path = os.path.join(root, COUNTS) if root else None
    if path and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.strip() in got:
                    got[line.strip()] += 1
    return got


def store(key: str, path: str) -> None:
    """Store the exported file at `path` under `key` (a no-op when the cache is off, the file has
    external data, or another process stored the key first)."""
    root = cache_dir()
    if root is None or os.path.exists(path + ".data"):
        return
    parent = os.path.join(root, key[:2])
    final = os.path.join(parent, key)
    if os.path.exists(final):
        return
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{key[:8]}-", dir=parent)
    try:
        shutil.copyfile(path, os.path.join(tmp, FILE))
        try:
            os.rename(tmp, final)          # atomic; fails when another process stored it first
        except OSError:
            pass
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":      # `python -m pared.backends.onnxruntime.export_cache [DIR]`: the lookups so far
    import sys
    folder = sys.argv[1] if len(sys.argv) > 1 else cache_dir()
    if not folder:
        sys.exit(f"usage: python -m pared.backends.onnxruntime.export_cache DIR (or set {ENV})")
    c = counts(folder)
    total = c["hit"] + c["miss"]
    print(f"ONNX export cache {folder}: {c['hit']} hits, {c['miss']} misses"
          + (f" ({100 * c['hit'] / total:.0f}% of {total} lookups)" if total else ""))
