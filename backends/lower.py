"""Lower every graph of a Program for a target (torch side)."""
from __future__ import annotations

import difflib
import importlib
import time
from typing import Any, Callable, Mapping

from pared.ir.errors import BackendError
from pared.ir.program import Program

_BACKENDS = {"onnxruntime": "pared.backends.onnxruntime.lower", "tvm": "pared.backends.tvm.lower"}


def lower_program(program: Program, target: Mapping[str, Any], outdir: str,
                  progress: Callable[[str], None] | None = None, **options: Any) -> dict:
    """Lower each graph into `outdir`.

    Args:
        program: the Program.
        target: the target as JSON (Target.to_json()).
        outdir: an existing directory the model files are written to.
        progress: called with a message before each graph.
        options: backend options (e.g. TVM `tune=True`).
    Returns:
        graph name -> manifest entry (file, files, inputs, outputs, check, ...).
    """
    mod = importlib.import_module(_BACKENDS[target["backend"]])
    known = tuple(getattr(mod, "OPTIONS", ()))
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = (f"; did you mean '{close[0]}'?" if close else
                    f"; it takes: {', '.join(known)}" if known else "; it takes none")
            raise BackendError(f"backend '{target['backend']}' (target '{target['name']}'): unknown option "
                               f"'{key}'{hint}")
    entries = {}
    for name, graph in program.graphs.items():
        if progress:
            progress(f"lowering graph '{name}' for {target['name']}")
        t0 = time.perf_counter()
        entry = mod.lower_graph(graph, name, target, outdir, **options)
        entry["lower_seconds"] = round(time.perf_counter() - t0, 3)
        entries[name] = entry
    # a backend may post-process the whole set (ORT: store initializers several graphs share once)
    finish = getattr(mod, "finish_program", None)
    return finish(entries, outdir) if finish is not None else entries
