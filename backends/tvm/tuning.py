"""MetaSchedule tuning databases: where tuned schedules come from, how a build replays them.

Every TVM build runs one pipeline (schedule.pipeline): TVM's CPU legalization and
fusion, then `replay` (schedules looked up in tuning databases by the fused
PrimFunc's structure), then pared's default schedules for every function no
database knows, then lowering. Tuning (`tune`) extracts its tasks from the
module after the same fusion, so a record it writes is found again by any later
build of a graph that has that fused function, in any artifact.

Databases consulted, first match wins:
  1. the user's own, written by tuning (backend option ``tune: true``) under
     ``cache_dir`` (default ``~/.cache/pared/tvm``): ``meta_schedule/``, or
     ``meta_schedule-rpc-KEY/`` for a device tuned over RPC (never replayed for the host);
  2. the directories in the backend option ``databases`` and in the environment
     variable ``PARED_TVM_DATABASES`` (os.pathsep-separated);
  3. the databases shipped beside the reference workloads:
     ``examples/<workload>/tvm_tuning/<target name>/`` (written by benchmarks/tvm_tune.py).
``databases: false`` turns replay off (pared's default schedules only): the
"untuned" arm of `pared bench --target tvm-cpu`.

A database directory holds MetaSchedule's JSON pair (database_workload.json,
database_tuning_record.json). Shipped ones are pruned to the best record per
workload (`prune`). Replay measures nothing and needs no tuning dependency.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

from pared.ir.errors import BackendError

log = logging.getLogger("pared.backends.tvm")

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
#: the source tree's reference workloads (examples/<name>/tvm_tuning/<target>/)
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))), "examples")
ENV = "PARED_TVM_DATABASES"


def cache_root(cache_dir: str | None) -> str:
    return cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "pared", "tvm")


def work_dir(cache_dir: str | None, rpc: Mapping[str, Any] | None = None) -> str:
    """Where tuning writes: one database per place candidates are measured (this host, or an RPC key)."""
    return os.path.join(cache_root(cache_dir), "meta_schedule" + (f"-rpc-{rpc['key']}" if rpc else ""))


def is_database(path: str) -> bool:
    return os.path.isfile(os.path.join(path, WORKLOAD_FILE)) and os.path.isfile(os.path.join(path, RECORD_FILE))


def shipped(target_name: str) -> list[str]:
    """The reference workloads' databases for this target, by workload name."""
    return sorted(d for d in glob.glob(os.path.join(EXAMPLES, "*", "tvm_tuning", target_name)) if is_database(d))


def databases_option(value: Any) -> list[str] | bool:
    """The `databases` backend option: a directory or a list of them (each a MetaSchedule JSON
    database), true (the default: only the standard places) or false (no replay).

    Raises:
        BackendError: a value of another type, or a directory without a database.
    """
    if value is None or value is True:
        return []
    if value is False:
        return False
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, (list, tuple)) or not all(isinstance(p, str) for p in paths):
        raise BackendError(f"tvm backend option 'databases' takes a directory, a list of directories, true or "
                           f"false, got {value!r}")
    for p in paths:
        if not is_database(p):
            raise BackendError(f"tvm backend option 'databases': {p} holds no MetaSchedule database "
                               f"({WORKLOAD_FILE} and {RECORD_FILE})")
    return list(paths)


def sources(target_name: str, cache_dir: str | None, extra: Sequence[str] | bool = ()) -> list[str]:
    """The database directories a build of `target_name` replays, in the order they are consulted."""
    if extra is False:
        return []
    found = [work_dir(cache_dir)] if is_database(work_dir(cache_dir)) else []
    env = [p for p in os.environ.get(ENV, "").split(os.pathsep) if p]
    for p in env:
        if not is_database(p):
            log.warning("%s: %s holds no MetaSchedule database; ignored", ENV, p)
    found += [p for p in list(extra) + env if is_database(p)]
    found += shipped(target_name)
    out: list[str] = []
    for p in found:
        if os.path.realpath(p) not in {os.path.realpath(q) for q in out}:
            out.append(p)
    return out


def open_databases(dirs: Iterable[str]):
    """One MetaSchedule database over `dirs` (first match wins), or None for none."""
    dirs = list(dirs)
    if not dirs:
        return None
    from tvm.s_tir import meta_schedule as ms

    dbs = [ms.database.JSONDatabase(os.path.join(d, WORKLOAD_FILE), os.path.join(d, RECORD_FILE),
                                    allow_missing=False) for d in dirs]
    return dbs[0] if len(dbs) == 1 else ms.database.OrderedUnionDatabase(*dbs)


def replay(database):
    """A module pass: each PrimFunc a database has a record for gets that record's schedule (marked
    scheduled, so the default rules leave it); the others pass unchanged. Counts go to `stats`."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="pared.tvm.replay_tuning")
    def _replay(mod, _ctx):
        if database is None:
            return mod
        with database:
            return relax.transform.MetaScheduleApplyDatabase()(mod)

    return _replay


def scheduled_count(mod) -> tuple[int, int]:
    """(PrimFuncs marked scheduled, all PrimFuncs) of a module."""
    import tvm
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return sum(1 for f in funcs if f.attrs is not None and bool(f.attrs.get("tirx.is_scheduled", False))), len(funcs)


def tune(mod, tvm_target, *, trials: int, work: str, rpc: Mapping[str, Any] | None, name: str,
         runner: Any = "local") -> None:
    """Tune the fused PrimFuncs of `mod` (a module after schedule.fuse) into the database at `work`."""
    from tvm.s_tir.meta_schedule import relax_integration as ri
    from tvm.s_tir.meta_schedule.tune import tune_tasks

    os.makedirs(work, exist_ok=True)
    families = intrinsic_families(tvm_target)
    load_intrinsics(families)  # before the tune contexts: TuneContext imports the whole package otherwise
    cost_model = cost_model_name()
    log.info("graph '%s': tuning with MetaSchedule (%d trials, %s cost model, measured %s), database in %s", name,
             trials, cost_model, f"on {rpc['key']} via the RPC tracker {rpc['tracker']}" if rpc else "here", work)
    _unnamed_handlers_off(logging.getLogger("tvm.s_tir.meta_schedule"))
    with tvm_target:
        chosen = heavy_tasks(ri.extract_tasks(mod, tvm_target))
        log.info("graph '%s': %d tasks tuned: %s", name, len(chosen), ", ".join(t.task_name for t in chosen))
        contexts, weights = ri.extracted_tasks_to_tune_contexts(chosen, work, seed=0)
        tune_tasks(tasks=contexts, task_weights=weights, work_dir=work, max_trials_global=int(trials),
                   cost_model=cost_model, runner=runner, builder=_builder(families))
    timeouts = build_timeouts(work)
    if timeouts:
        log.warning("graph '%s': MetaSchedule's builder timed out on %d candidate(s) (a loaded machine?); "
                    "the functions with no working candidate keep default schedules", name, timeouts)


#: TVM's package of tensor intrinsics, which MetaSchedule imports whole (TuneContext, and its builder
#: in every worker before each candidate's build): its CUDA module alone generates hundreds of MMA
#: variants, most of the 32-46 s the import takes on a 2-core AMD EPYC host, which is more than the
#: builder's 30 s timeout per candidate, so every candidate failed there
#: (benchmarks/tvm_tuning_intrinsics.py).
INTRIN_PACKAGE = "tvm.s_tir.tensor_intrin"


def intrinsic_families(tvm_target) -> tuple[str, ...] | None:
    """The modules of INTRIN_PACKAGE a target's schedules can tensorize with: for a CPU (LLVM) target
    the one of its architecture; None (the whole package) for any other kind of target."""
    if tvm_target.kind.name != "llvm":
        return None
    triple = str(tvm_target.attrs.get("mtriple", "") or "").lower()
    if triple.startswith(("aarch64", "arm")):
        return ("arm_cpu",)
    if triple.startswith("riscv"):
        return ("riscv_cpu",)
    return ("x86",)


def load_intrinsics(families: Sequence[str] | None) -> None:
    """Register the tensor intrinsics of `families` (modules of INTRIN_PACKAGE) without running the
    package's __init__, which imports every family: the package goes into sys.modules as a namespace
    over its folder, so a later `import` of it is a no-op and any other family still imports on
    demand. `None`, or a package already imported, imports it the ordinary way."""
    import importlib
    import importlib.util
    import sys

    if families is None or INTRIN_PACKAGE in sys.modules:
        importlib.import_module(INTRIN_PACKAGE)
    else:
        parent_name, _, leaf = INTRIN_PACKAGE.rpartition(".")
        parent = importlib.import_module(parent_name)
        package = importlib.util.module_from_spec(importlib.util.find_spec(INTRIN_PACKAGE))
        sys.modules[INTRIN_PACKAGE] = package
        setattr(parent, leaf, package)
    for family in families or ():
        importlib.import_module(f"{INTRIN_PACKAGE}.{family}")


def _builder(families: Sequence[str] | None):
    """MetaSchedule's local builder whose workers load only `families` of intrinsics when they start
    (an initializer runs outside the per-candidate timeout; the default build's own import of the
    package is then a no-op)."""
    import functools

    from tvm.s_tir.meta_schedule.builder import LocalBuilder
    return LocalBuilder(initializer=functools.partial(load_intrinsics, families))


def cost_model_name() -> str:
    """MetaSchedule's learned cost model needs xgboost (pared[tune]: xgboost-cpu; the xgboost wheel pulls
    CUDA libraries); without it the search ranks candidates at random and measures the same count."""
    import importlib.util
    return "xgb" if importlib.util.find_spec("xgboost") is not None else "random"


def build_timeouts(work: str) -> int:
    """Candidates MetaSchedule's LocalBuilder killed for taking too long, from its logs under `work`."""
    logs = os.path.join(work, "logs")
    if not os.path.isdir(logs):
        return 0
    n = 0
    for f in os.listdir(logs):
        with open(os.path.join(logs, f), errors="replace") as fh:
            n += fh.read().count("LocalBuilder: Timeout")
    return n


#: fused functions tuning measures, by a substring of their name: the arithmetic-heavy ones. Copies,
#: transposes and elementwise functions keep the default schedules (schedule.Elementwise), which
#: they are close to already; MetaSchedule spends ~25 s per search round on any task here (it starts
#: its builder and runner processes per round), so tuning them too would double the time for nothing.
HEAVY_OPS = ("matmul", "conv", "softmax", "layer_norm", "group_norm", "rms_norm", "gelu", "attention", "dense",
             "mean", "sum", "max", "erf", "tanh")


def heavy_tasks(tasks: list) -> list:
    """The extracted tasks tuning measures: those named for a HEAVY_OPS op, each once (all tasks
    where none is)."""
    heavy = [t for t in tasks if any(op in t.task_name for op in HEAVY_OPS)]
    return heavy or list(tasks)


def _unnamed_handlers_off(logger: logging.Logger) -> None:
    """MetaSchedule rebuilds its loggers' dictConfig from the names of the handlers its logger has; a
    handler someone attached without a name (a test harness's capture handler, one a host program
    added) makes it fail in str.format on None at the second tuning in a process. Those handlers are
    detached from MetaSchedule's logger (its own console and file handlers are named)."""
    for h in list(logger.handlers):
        if h.get_name() is None:
            logger.removeHandler(h)


def prune(src: str, dst: str) -> dict:
    """Copy the database at `src` to `dst` keeping only the fastest record of each workload (what
    replay uses) and the workloads that have one; returns {workloads, records_before}."""
    if not is_database(src):
        raise BackendError(f"{src} holds no MetaSchedule database")
    with open(os.path.join(src, WORKLOAD_FILE)) as f:
        workloads = [line for line in f.read().splitlines() if line.strip()]
    best: dict[int, tuple[float, str]] = {}
    n = 0
    with open(os.path.join(src, RECORD_FILE)) as f:
        for line in f:
            if not line.strip():
                continue
            n += 1
            index, rec = json.loads(line)
            secs = rec[1] if len(rec) > 1 else None
            if not secs:
                continue    # a candidate that failed to build or run
            mean = sum(float(s) for s in secs) / len(secs)
            if index not in best or mean < best[index][0]:
                best[index] = (mean, line.strip())
    keep = sorted(best)
    renumber = {old: new for new, old in enumerate(keep)}
    from pared.backends.signing import atomic_write
    os.makedirs(dst, exist_ok=True)
    atomic_write(os.path.join(dst, WORKLOAD_FILE), "".join(workloads[i] + "\n" for i in keep).encode())
    lines = []
    for old in keep:
        _, rec = json.loads(best[old][1])
        lines.append(json.dumps([renumber[old], rec], separators=(",", ":")) + "\n")
    atomic_write(os.path.join(dst, RECORD_FILE), "".join(lines).encode())
    return {"workloads": len(keep), "records_before": n}


def describe(path: str) -> str:
    """A database directory as the manifest names it: a shipped one by its workload and target
    (examples/<workload>/tvm_tuning/<target>), others by path with the home folder as ~."""
    real = os.path.realpath(path)
    if real.startswith(os.path.realpath(EXAMPLES) + os.sep):
        return "examples/" + os.path.relpath(real, os.path.realpath(EXAMPLES))
    home = os.path.expanduser("~")
    return "~" + real[len(home):] if real.startswith(home + os.sep) else real
