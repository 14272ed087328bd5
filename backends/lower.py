"""Lower every graph of a Program for a target (torch side)."""
from __future__ import annotations

import difflib
import importlib
import json
import time
from typing import Any, Callable, Mapping

from pared.ir.errors import BackendError
from pared.ir.program import Program

_BACKENDS = {"onnxruntime": "pared.backends.onnxruntime.lower", "tvm": "pared.backends.tvm.lower"}


#: the target fields that change what a lowering writes (the others name the device, give the cost
#: model's figures or the runtime's thread count): devices equal in these share one lowering
LOWERING_FIELDS = ("backend", "provider", "tvm_target", "cross_compiler", "ort_opt_level", "ort_disabled_optimizers",
                   "arch", "isa", "int8_weights")


def lowering_key(target: Mapping[str, Any]) -> str:
    """Two targets with the same key get the same model files from the lowering."""
    return json.dumps({f: target.get(f) for f in LOWERING_FIELDS}, sort_keys=True, default=str)


def device_targets(program: Program) -> dict[str, dict]:
    """device -> target JSON for the devices the program's records place graphs on (a record's
    `device_targets` field: PartitionPlan's, from its deployment). Empty: one target for all.

    Raises:
        BackendError: two records giving one device different lowerings.
    """
    out: dict[str, dict] = {}
    src: dict[str, str] = {}
    for key, rec in program.records.items():
        for dev, tj in (getattr(rec, "device_targets", None) or {}).items():
            if dev in out and lowering_key(out[dev]) != lowering_key(tj):
                raise BackendError(f"device '{dev}' is target '{out[dev].get('name')}' in record {src[dev]} and "
                                   f"'{tj.get('name')}' in record {key}: one device, one target")
            out.setdefault(dev, dict(tj))
            src.setdefault(dev, str(key))
    return out


def placements(program: Program) -> dict[str, list]:
    """graph -> the devices the Plan runs it on, in plan order (None: a call naming no device),
    and the Plan's first device for a graph another device runs: a remote call that fails runs
    it there (backends.executor)."""
    calls = program.plan.calls()
    home = next((c.device for c in calls if c.device is not None), None)
    out: dict[str, list] = {}
    for g in program.graphs:
        devs = list(dict.fromkeys(c.device for c in calls if c.graph == g)) or [home]
        if home is not None and home not in devs:
            devs.append(home)
        out[g] = devs
    return out


def lower_program(program: Program, target: Mapping[str, Any], outdir: str,
                  progress: Callable[[str], None] | None = None, devices: Mapping[str, Mapping] | None = None,
                  **options: Any) -> dict:
    """Lower each graph into `outdir`.

    Args:
        program: the Program.
        target: the target as JSON (Target.to_json()).
        outdir: an existing directory the model files are written to.
        progress: called with a message before each graph.
        devices: device -> target JSON: each graph is lowered for the targets of the devices the
            Plan runs it on (`placements`; a device not named here: `target`), once per distinct
            lowering (`lowering_key`). Its entry is keyed by the graph's name for the first such
            lowering and `graph@device` for each other; every entry records `graph` and the
            `devices` it serves. None or empty: every graph once, for `target`.
        options: backend options (e.g. TVM `tune=True`); each backend takes those it knows.
    Returns:
        entry key -> manifest entry (file, files, inputs, outputs, check, ...).
    """
    jobs: list[tuple[str, str, Mapping[str, Any], list]] = []    # (key, graph, target, devices)
    if devices:
        for g, devs in placements(program).items():
            groups: dict[str, list] = {}
            tj: dict[str, Mapping[str, Any]] = {}
            for d in devs:
                t = devices.get(d, target) if d is not None else target
                k = lowering_key(t)
                groups.setdefault(k, []).append(d)
                tj.setdefault(k, t)
            for i, (k, ds) in enumerate(groups.items()):
                jobs.append((g if i == 0 else f"{g}@{ds[0]}", g, tj[k], ds))
    else:
        jobs = [(g, g, target, []) for g in program.graphs]
    mods = {t["backend"]: importlib.import_module(_BACKENDS[t["backend"]]) for _, _, t, _ in jobs}
    known = {b: tuple(getattr(m, "OPTIONS", ())) for b, m in mods.items()}
    for key in options:
        if not any(key in k for k in known.values()):
            every = sorted({o for k in known.values() for o in k})
            close = difflib.get_close_matches(key, every, n=1)
            hint = (f"; did you mean '{close[0]}'?" if close else
                    f"; it takes: {', '.join(every)}" if every else "; it takes none")
            b = "' / '".join(mods)
            raise BackendError(f"backend '{b}' (target '{target['name']}'): unknown option '{key}'{hint}")
    entries: dict[str, dict] = {}
    by_backend: dict[str, dict] = {}
    for key, g, t, devs in jobs:
        if progress:
            progress(f"lowering graph '{g}' for {t['name']}" + (f" (device {', '.join(map(str, devs))})"
                                                               if devices else ""))
        t0 = time.perf_counter()
        mod = mods[t["backend"]]
        entry = mod.lower_graph(_graph_for(program, g, t), key, t, outdir,
                                **{k: v for k, v in options.items() if k in known[t["backend"]]})
        entry["lower_seconds"] = round(time.perf_counter() - t0, 3)
        if devices:
            entry.update(graph=g, devices=list(devs))
        entries[key] = entry
        by_backend.setdefault(t["backend"], {})[key] = entry
    # a backend may post-process its set (ORT: store initializers several graphs share once)
    for b, mine in by_backend.items():
        finish = getattr(mods[b], "finish_program", None)
        if finish is not None:
            entries.update(finish(mine, outdir))
    return {key: entries[key] for key, *_ in jobs}


def _graph_for(program: Program, name: str, target: Mapping[str, Any]) -> "Any":
    """The graph lowered for `target`: for TVM, whose schedules do not split a symbolic extent
    (a streamed step's cache capacity), with the dimensions the Plan's state pins made static
    (Program.pinned_by_state)."""
    if target.get("backend") == "tvm":
        return program.pinned_by_state(name)
    return program.graphs[name]
