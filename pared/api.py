"""The front door: `optimize()` and the `Optimized` result.

    opt = pared.optimize(model, (x,), target="cpu", pipeline=[...] or "p.yaml")
    opt.report        # fidelity and speed vs. eager, measured side by side
    opt.save("out/")  # the torch-free artifact

Flow: capture -> passes -> lower to a staging artifact -> run it against the
eager model on the example and the held-out inputs, or the calibration inputs
(in-sample) when none are held out (fidelity) -> time both alternately on the
same fixed thread count (speed) -> `save()` writes the final artifact atomically
with the report in its manifest.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import warnings
import weakref
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree

import pared
from pared.analysis.search import InProcess, Trials, make_trials
from pared.backends.artifact import read_manifest, write_artifact
from pared.backends.executor import Executor
from pared.backends.lower import device_targets, lower_program
from pared.backends.measure import default_profiler
from pared.backends.signing import UnsignedCodeWarning
from pared.fidelity import Fidelity, side_by_side, summarize
from pared.ir.capture import capture, normalize_inputs
from pared.ir.errors import FidelityError
from pared.ir.isa import host_cpu
from pared.ir.program import Program
from pared.ir.transform import PassContext, PassManager
from pared.targets import Target, get_target

log = logging.getLogger("pared")


def _host_provider(target: Target) -> str | None:
    """None when this host runs the target's ONNX Runtime provider; otherwise
    the CPU provider, which checks and times the same ONNX graphs here."""
    if target.backend != "onnxruntime":
        return None
    import onnxruntime
    return None if target.provider in onnxruntime.get_available_providers() else "CPUExecutionProvider"


def _own_executor(staging: str, **kwargs: Any) -> Executor:
    """An Executor on the staging artifact this process just built: its TVM libraries
    are our own, so the warning about loading unsigned code does not apply."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsignedCodeWarning)
        return Executor(staging, **kwargs)


class Optimized:
    """The result of `optimize`: the rewritten Program, its lowered artifact and the report.

    Call it like the model (torch tensors or numpy arrays in; the same kind
    out, in the model's output structure). `save(dir)` writes the artifact.
    """

    def __init__(self, program: Program, target: Target, staging: str, manifest: dict, report: dict):
        self.program = program
        self.target = target
        self._staging = staging
        self._manifest = manifest
        self.report = report
        self.executor = _own_executor(staging, provider=_host_provider(target))
        self._cleanup = weakref.finalize(self, shutil.rmtree, os.path.dirname(staging), True)

    def __call__(self, *inputs: Any) -> Any:
        """One call of the optimized model. State carried by the Plan (caches)
        persists across calls until `reset()`, as in the Executor."""
        if self.executor is None:
            raise pared.ArtifactError(f"this artifact was built for {self.target.name} and cannot run on this "
                                      "host; save() it and run it there")
        as_torch = any(isinstance(x, torch.Tensor) for x in inputs)
        arrays = [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in inputs]
        out = self.executor(*arrays)
        if as_torch:
            return pytree.tree_map(lambda a: torch.from_numpy(np.asarray(a)) if isinstance(a, np.ndarray) else a, out)
        return out

    def reset(self) -> None:
        """Start a new request (clear the Plan's carried state)."""
        if self.executor is not None:
            self.executor.reset()

    def save(self, path: str, *, sign_key: str | None = None) -> str:
        """Write the artifact directory (atomically) and return its path.

        Args:
            sign_key: an Ed25519 private key file (`pared keygen`): the artifact is
                written signed (signature.json), loadable with trusted_keys=[its .pub].
        """
        def build(tmp: str) -> dict:
            for rel in self._manifest["files"]:
                dst = os.path.join(tmp, rel)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copyfile(os.path.join(self._staging, rel), dst)
            m = {k: v for k, v in self._manifest.items() if k not in ("files", "format", "schema_version")}
            m["report"] = self.report
            return m
        return write_artifact(path, build, sign_key=sign_key)

    def __repr__(self) -> str:
        f = self.report.get("fidelity", {})
        s = self.report.get("speed", {}).get("speedup_vs_eager")
        return (f"Optimized(target={self.target.name!r}, graphs={list(self.program.graphs)}, "
                f"cosine_min={f.get('cosine_min')}, speedup={s})")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Run with every submodule in eval mode, restoring each one's own flag after.

    Inference graphs must not capture dropout or batch-norm updates; the user's
    modes are put back exactly, so the model ends as it came.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, flag in modes:
            m.training = flag


def _input_sets(calibration: Any) -> list[tuple]:
    if calibration is None or callable(calibration):
        return []
    if isinstance(calibration, torch.Tensor):
        return [(calibration,)]
    out = []
    for item in calibration:
        out.append(normalize_inputs(item))
    return out


def flat_tensors(args: tuple, kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    """The tensors of one call `(args, kwargs)`, in the order capture makes them graph inputs
    (the order an artifact's run_flat takes)."""
    return [v for v in pytree.tree_leaves((args, dict(kwargs))) if isinstance(v, torch.Tensor)]


def optimize(model: torch.nn.Module, example_inputs: Any, *, kwargs: Mapping[str, Any] | None = None,
             target: "str | Target | Mapping" = "cpu", pipeline: Any = None, calibration: Any = None,
             fidelity: "Fidelity | Mapping[str, float] | None" = None, allow_fidelity_loss: bool = False,
             dynamic_shapes: Any = None, bench_repeats: int = 10, backend_options: Mapping[str, Any] | None = None,
             progress: Callable[[str], None] | None = None, holdout: Any = None,
             bench_threads: int | None = None, search: Any = None) -> Optimized:
    """Capture, rewrite, lower and check a model.

    Args:
        model: the PyTorch module (left untouched: parameters, buffers and
            train/eval mode are not changed).
        example_inputs: a tensor or tuple of positional inputs.
        kwargs: keyword inputs (non-tensor values are baked in).
        target: a target name (`cpu`, `tvm-cpu`, `tvm-native`, `tvm-aarch64`, `cuda`), a
            device-profile YAML path, or a Target.
        pipeline: None (no rewrites), a pipeline YAML path, or a list of pass
            specs (`"name"`, `{"name": {options}}`, or Pass objects).
        calibration: a list of input tuples, or a callable loop for iterative
            models; what the passes calibrate on.
        holdout: inputs the passes never see, to judge fidelity on (a list of
            input tuples, or a callable loop); fidelity is checked on the example
            plus these. Without it the calibration inputs are checked instead,
            which is an in-sample check: the report says so
            (`report["fidelity"]["in_sample"]`, `["judged_on"]`).
        fidelity: bounds (see pared.fidelity.Fidelity); default cosine >= 0.999
            and relative L2 <= 1e-2 on every output.
        allow_fidelity_loss: keep a result that misses the bounds instead of raising.
        dynamic_shapes: torch.export dynamic shapes for the inputs.
        bench_repeats: rounds of the side-by-side timing (0 skips timing).
        bench_threads: intra-op threads for both sides of the timing (torch, and
            the ONNX Runtime / TVM pool); default the target's `threads`, else
            torch's current count. Recorded as `report["speed"]["threads"]`.
        backend_options: passed to the backend (TVM: `tune`, `tune_trials`, `cache_dir`).
        progress: called with a short message at each stage (and each finished search trial).
        search: how the passes' searches (a `target:` goal) run their trials: None (in process,
            or the pipeline file's `search:`), "ray" (a local Ray), or a mapping
            {executor: in_process | ray, address: "auto" | "ray://head:10001", width: N (trials
            per round), seed: S, trials: N (of a two-objective search), num_cpus: N (a local
            Ray)}, or a pared.analysis.search.Trials. Recorded as `report["search"]`.
    Returns:
        Optimized.
    Raises:
        CaptureError, PipelineError, PassError, BackendError, TargetError,
        FidelityError (unless allow_fidelity_loss), OptionError (a bad `search`, naming the option).
    """
    say = progress or (lambda m: log.info(m))
    trials = None if search is None else make_trials(search)
    tgt = get_target(target).resolve()        # a host target takes this CPU's instruction set
    bounds = Fidelity.of(fidelity)
    args = normalize_inputs(example_inputs)
    kwargs = dict(kwargs or {})

    if bench_threads is not None and bench_threads < 1:
        raise ValueError(f"bench_threads must be >= 1, got {bench_threads}")
    threads = bench_threads or tgt.threads or torch.get_num_threads()

    with eval_mode(model):
        return _optimize(model, args, kwargs, tgt, bounds, pipeline, calibration, holdout, allow_fidelity_loss,
                         dynamic_shapes, bench_repeats, threads, backend_options, say, search, trials)


def _optimize(model, args, kwargs, tgt, bounds, pipeline, calibration, holdout, allow_fidelity_loss,
              dynamic_shapes, bench_repeats, threads, backend_options, say, search, trials) -> Optimized:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    say(f"capturing {type(model).__name__}")
    program = capture(model, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes)
    timings["capture_s"] = time.perf_counter() - t0

    from pared.pipeline import build_passes, load_pipeline
    if isinstance(pipeline, (str, os.PathLike)):
        spec = load_pipeline(os.fspath(pipeline))
        passes = build_passes(spec)
        if trials is None and spec.search is not None:
            trials = make_trials(spec.search)
    else:
        passes = build_passes(list(pipeline or []))
    trials = trials or InProcess()
    ctx = PassContext(calibration=calibration, target=tgt, measure=default_profiler(), progress=say, trials=trials)
    t0 = time.perf_counter()
    try:
        program, history = PassManager(passes).run(program, ctx)
    finally:
        searched = trials.describe()
        if not isinstance(search, Trials):      # one the caller made stays theirs (a Ray it started runs on)
            trials.close()
    timings["passes_s"] = time.perf_counter() - t0

    staging_root = tempfile.mkdtemp(prefix="pared-build-")
    staging = os.path.join(staging_root, "artifact")
    t0 = time.perf_counter()
    target_json = tgt.to_json()

    devices = device_targets(program)

    def build(tmp: str) -> dict:
        graphs = lower_program(program, target_json, tmp, progress=say, devices=devices,
                               **dict(backend_options or {}))
        return _manifest(program, target_json, graphs, history, devices)

    try:
        write_artifact(staging, build)
    except BaseException:
        shutil.rmtree(staging_root, ignore_errors=True)
        raise
    timings["lower_s"] = time.perf_counter() - t0
    manifest = dict(read_manifest(staging))
    report: dict[str, Any] = {"target": tgt.name, "passes": [
        {"name": n, "modified": r.modified, "stats": dict(r.stats), "seconds": round(dt, 3)} for n, r, dt in history],
        "timings": {k: round(v, 3) for k, v in timings.items()}, "search": searched}

    cross = {d: Target.from_json(t, where=f"device '{d}'") for d, t in devices.items()}
    cross = {d: t for d, t in cross.items() if t.is_cross}
    if tgt.is_cross or cross:
        report["fidelity"] = {"skipped": f"built for {tgt.tvm_target.get('mtriple')}; cannot run on this host"
                              if tgt.is_cross else
                              "device(s) " + ", ".join(f"'{d}' built for {t.tvm_target.get('mtriple')}"
                                                      for d, t in cross.items())
                              + "; they cannot run on this host"}
        report["speed"] = {"skipped": "cross build"}
        opt = Optimized.__new__(Optimized)
        opt.program, opt.target, opt._staging, opt._manifest, opt.report = program, tgt, staging, manifest, report
        opt.executor = None
        opt._cleanup = weakref.finalize(opt, shutil.rmtree, staging_root, True)
        return opt

    opt = Optimized(program, tgt, staging, manifest, report)
    # judged on inputs the passes never saw when the caller holds some out; else in-sample
    judged = holdout if holdout is not None else calibration
    in_sample = holdout is None and (callable(calibration) or bool(_input_sets(calibration)))
    say("checking fidelity against eager PyTorch" + (" (in-sample: on the calibration inputs)" if in_sample else ""))
    check_sets = [(args, kwargs)] + [(c, {}) for c in _input_sets(judged)]
    pairs = []
    with torch.no_grad():
        for a, kw in check_sets:
            ref = [t.detach().cpu().numpy() for t in pytree.tree_leaves(model(*a, **kw))
                   if isinstance(t, torch.Tensor)]
            opt.executor.reset()
            got = opt.executor.run_flat(*[t.detach().cpu().numpy() for t in flat_tensors(a, kw)])
            pairs.append((ref, got))
    if callable(judged):
        # an iterative model is judged on the whole run (a sampler's final sample), not one call
        say("checking the whole loop against eager PyTorch")
        pairs.append(_loop_pair(judged, model, opt.executor))
    figures = summarize(pairs)
    report["fidelity"] = dict(figures, bounds={k: v for k, v in bounds.__dict__.items()}, in_sample=in_sample,
                              judged_on=("example + holdout" if holdout is not None else
                                         "example + calibration (in-sample)" if in_sample else "example only"))
    if _host_provider(tgt):
        report["fidelity"]["checked_on"] = (f"CPUExecutionProvider ({tgt.provider} is not in this host's "
                                            "onnxruntime; the ONNX graphs are the same)")
    bad = bounds.violations(figures)
    report["fidelity"]["passed"] = not bad
    if bench_repeats > 0:
        say(f"timing eager PyTorch and the artifact side by side ({threads} thread(s) each)")
        report["speed"] = _time_side_by_side(model, args, kwargs, opt, staging, threads, bench_repeats)
    if bad and not allow_fidelity_loss:
        raise FidelityError(f"optimized model misses the fidelity bound: {'; '.join(bad)} "
                            "(pass allow_fidelity_loss=True to keep it, or loosen `fidelity`)", report["fidelity"])
    return opt


def _time_side_by_side(model: torch.nn.Module, args: tuple, kwargs: dict, opt: Optimized, staging: str,
                       threads: int, repeats: int) -> dict:
    """Median ms of eager and of the artifact, alternating, both on `threads` intra-op
    threads (torch's count is put back after); the artifact is timed by its own
    Executor on that count unless the target already fixes it."""
    feed = [t.detach().cpu().numpy() for t in flat_tensors(args, kwargs)]
    timed = (opt.executor if opt.executor.target.get("threads") == threads else
             _own_executor(staging, threads=threads, provider=_host_provider(opt.target)))

    def eager() -> None:
        with torch.no_grad():
            model(*args, **kwargs)

    def artifact() -> None:
        timed.reset()
        timed.run_flat(*feed)

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sp = side_by_side({"eager": eager, "artifact": artifact}, repeats=repeats, warmup=2)
        torch_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    return {"eager_ms": round(sp["median_s"]["eager"] * 1e3, 3),
            "artifact_ms": round(sp["median_s"]["artifact"] * 1e3, 3),
            "speedup_vs_eager": round(sp["speedup"]["artifact"], 3),
            "repeats": sp["repeats"], "threads": threads, "torch_threads": torch_threads,
            "artifact_threads": int(timed.target.get("threads") or 0), **sp["env"]}


def _loop_pair(loop: Callable, model: torch.nn.Module, executor: Any) -> tuple[list, list]:
    """Run the calibration loop once through the eager model and once through the
    artifact (fresh request); returns (reference leaves, artifact leaves) as numpy."""
    def leaves(out: Any) -> list:
        return [np.asarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)
                for v in pytree.tree_leaves(out)]

    def through_artifact(*args: Any) -> Any:
        arrays = [a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a) for a in args]
        out = executor(*arrays)
        return pytree.tree_map(lambda v: torch.from_numpy(v) if isinstance(v, np.ndarray) else v, out)

    with torch.no_grad():
        ref = leaves(loop(model))
    executor.reset()
    got = leaves(loop(through_artifact))
    executor.reset()
    return ref, got


def _manifest(program: Program, target_json: dict, graphs: dict, history: Sequence,
              devices: Mapping[str, dict] | None = None) -> dict:
    records = program.records.to_json()     # "Type" / "Type@graph" -> the record's JSON (Executor.records reads it)
    return {
        **({"devices": dict(devices)} if devices else {}),
        "pared_version": pared.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target": target_json,
        "build_cpu": host_cpu().to_json(),
        "inputs": list(program.plan.inputs),
        "output_structure": program.output_structure,
        "graphs": graphs,
        "plan": program.plan.to_json(),
        "records": records,
        "superseded_records": _superseded(history, records),
        "pipeline": [{"name": n, "modified": r.modified} for n, r, _ in history],
    }


def _superseded(history: Sequence, final: Mapping[str, Any]) -> dict:
    """The measurements a later rewrite invalidated (what the compiler saw before it rewrote:
    `pared report` draws them): key -> {"by": the pass that dropped it, "record": its JSON as
    last seen}. Records the final program still has are not repeated."""
    out: dict = {}
    before: dict = {}
    for name, result, _ in history:
        now = result.program.records.to_json()
        for key, rec in before.items():
            if key not in now and key not in final:
                out[key] = {"by": name, "record": rec}
        before = now
    return out
