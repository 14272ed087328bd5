"""The side-by-side benchmark of a reference workload (`pared bench --workload NAME`).

    result = bench_workload("dit_mnist", pipeline="examples/pipelines/dit_mnist.yaml")

In one process it builds three contenders and times the workload's task with
each, in alternating rounds (median, min and max of the rounds):

    eager           the trained PyTorch model
    backend_plain   the model lowered with no passes to the same target
    optimized       the model lowered with the pipeline

then runs the workload's whole fidelity set with `eager` and `optimized` and
compares them (the workload decides the figures). Thread counts are fixed for
every contender (torch intra-op threads, ONNX Runtime / TVM pool) and recorded;
OMP_WAIT_POLICY is set to PASSIVE and ONNX Runtime does not spin.
"""
from __future__ import annotations

import collections
import os
import platform
import tempfile
import time
from typing import Any, Callable, Mapping

from pared.bench import portable_path, timing_stats, trace_summary, param_bytes, write_results


def _own_executor(path: str, threads: int) -> Any:
    """An Executor on an artifact this run just built: its TVM libraries are our own, so the
    warning about loading unsigned code does not apply."""
    import warnings

    from pared.backends.executor import Executor
    from pared.backends.signing import UnsignedCodeWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsignedCodeWarning)
        return Executor(path, threads=threads)


def bench_workload(name: str, *, pipeline: str | None = "default", target: str | None = None, threads: int = 1,
                   repeats: int = 5, json_out: str | None = None, workload_options: Mapping[str, Any] | None = None,
                   progress: Callable[[str], None] | None = None,
                   backend_options: Mapping[str, Any] | None = None, profile: int = 0) -> dict:
    """Measure one workload; returns (and optionally writes) the result record.

    Args:
        name: a workload of pared.workloads.
        pipeline: a pipeline file, "default" (examples/pipelines/<name>.yaml, or
            none when the workload has none), or None for no passes.
        target: a target name (cpu, tvm-cpu, ...); default: the pipeline file's, else cpu.
        threads: intra-op threads for every contender.
        repeats: timed rounds (each round runs every contender once).
        workload_options: size options for the workload (samples, steps, batch, ...).
        backend_options: lowering options over the pipeline file's `backend:` (every contender).
        profile: when > 0, every artifact contender's task is also profiled kernel by kernel, over
            this many rounds after the timing (pared.backends.profile; `kernels` in the result).
    """
    import torch
    import pared
    from pared.pipeline import build_passes, load_pipeline
    from pared.fidelity import side_by_side
    from pared.workloads import get_workload, torch_callable
    from pared.analysis.cost import trace_flops
    from pared.ir.transform import capture_needs

    say = progress or (lambda m: None)
    torch.set_num_threads(threads)
    wopts = dict(workload_options or {})
    wl = get_workload(name, **wopts)
    if pipeline == "default":
        pipeline = wl.pipeline
    spec = load_pipeline(pipeline) if pipeline else None
    passes = build_passes(spec) if spec else []
    if "loop" in capture_needs(passes) and wopts.get("decoder") != "loop":
        # a decoding pass rewrites the decoding loop: every contender gets the model in its loop form
        # (the same function; eager, plain and optimized compared like with like)
        wl = get_workload(name, **{**wopts, "decoder": "loop"})
    target = target or (spec.target if spec and spec.target else "cpu")
    backend_options = {**(dict(spec.backend) if spec else {}), **dict(backend_options or {})}
    say(f"{wl.summary}; pipeline {pipeline or '(none)'}; target {target}; {threads} thread(s)")
    model = wl.build()
    example, calib = wl.example_inputs(), wl.calibration()

    work = tempfile.mkdtemp(prefix="pared-bench-")
    contenders: dict[str, Any] = {}
    programs = {}
    from pared.targets import get_target
    tvm_arms = get_target(target).backend == "tvm"
    if tvm_arms:
        # a TVM target is also timed against itself with no tuning database (pared's default schedules
        # only) and against ONNX Runtime (target cpu), all three lowered with no passes
        for label, t, opts in (("tvm_untuned", target, dict(backend_options, databases=False)),
                               ("ort", "cpu", {})):
            say(f"building {label}")
            opt = pared.optimize(model, example, target=t, pipeline=[], calibration=calib, bench_repeats=0,
                                 allow_fidelity_loss=True, backend_options=opts, progress=lambda m: None,
                                 holdout=[])
            contenders[label] = _own_executor(opt.save(os.path.join(work, label)), threads)
    for label, plist in (("backend_plain", []), ("optimized", passes)):
        if label == "optimized" and not plist:
            # no passes: the optimized artifact is the plain one; built once, loaded twice (own sessions)
            programs[label] = programs["backend_plain"]
            contenders[label] = _own_executor(os.path.join(work, "backend_plain"), threads)
            continue
        say(f"building {label}")
        dyn = wl.dynamic_shapes() if "dynamic_batch" in capture_needs(plist) else None
        # fidelity is the workload's own run below; optimize checks the example only (holdout=[]), not
        # every calibration input again (the VLA calibrates on 1024 observations)
        opt = pared.optimize(model, example, target=target, pipeline=plist, calibration=calib,
                             bench_repeats=0, allow_fidelity_loss=True, backend_options=backend_options,
                             dynamic_shapes=dyn, progress=lambda m: None, holdout=[],
                             search=spec.search if spec else None)
        path = opt.save(os.path.join(work, label))
        programs[label] = opt.program
        contenders[label] = _own_executor(path, threads)
    if tvm_arms and passes:
        # the pipeline's program on ONNX Runtime too: TVM's optimized build against ORT's, like with like
        # (an INT8 pipeline: TVM's integer matmuls against ORT's QGemm / MatMulInteger kernels)
        say("building ort_optimized")
        opt = pared.optimize(model, example, target="cpu", pipeline=passes, calibration=calib, bench_repeats=0,
                             allow_fidelity_loss=True, progress=lambda m: None, holdout=[],
                             search=spec.search if spec else None)
        contenders["ort_optimized"] = _own_executor(opt.save(os.path.join(work, "ort_optimized")), threads)
    eager = torch_callable(model)

    def run_task(label: str):
        if label == "eager":
            return lambda: wl.task(eager)
        ex = contenders[label]
        return lambda: wl.task(ex, ex.reset)

    arms = ("eager", "backend_plain", "optimized") + (("tvm_untuned", "ort") if tvm_arms else ()) + \
        (("ort_optimized",) if "ort_optimized" in contenders else ())
    say(f"timing {' / '.join(arms)}, {repeats} alternating rounds")
    timing = side_by_side({k: run_task(k) for k in arms}, repeats=repeats, warmup=1)
    kernels = {}
    if profile > 0:
        from pared.backends.profile import profile_kernels
        for k in arms:
            if k != "eager" and not (k == "optimized" and not passes):
                say(f"profiling {k}, {profile} rounds")
                kernels[k] = profile_kernels(contenders[k], run_task(k), rounds=profile)

    # FLOPs the pipeline removed, over the calls the task made (the plan may pick cheaper routines)
    # (both sides from the graphs their plans ran: a plain program may loop over a graph too)
    plain = contenders["backend_plain"]
    plain.reset()
    wl.task(plain, None)
    base = trace_flops(programs["backend_plain"], plain.graph_trace)
    ex = contenders["optimized"]
    ex.reset()
    wl.task(ex, None)
    # the state each plan carries at the end of the task (a KV cache; features reused across calls)
    state_bytes = {"reference": plain.state_bytes, "optimized": ex.state_bytes}
    trace = ex.trace
    # the graphs each call of the task ran, before the fidelity runs reset the executors
    task_graphs = {"reference": plain.graph_trace, "optimized": ex.graph_trace}
    spent = trace_flops(programs["optimized"], ex.graph_trace)
    remaining = spent / base if base else 1.0

    say("fidelity run: eager")
    t0 = time.perf_counter()
    ref = wl.run(eager)
    say(f"fidelity run: optimized (eager took {time.perf_counter() - t0:.0f} s)")
    got = wl.run(ex, ex.reset)
    fid = wl.fidelity(ref, got)

    med = timing["median_s"]
    result = {
        "workload": name, "summary": wl.summary, "pipeline": portable_path(pipeline), "target": target,
        "passes": [getattr(p, "name", str(p)) for p in passes],
        "torch_threads": torch.get_num_threads(), "ort_threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "repeats": timing["repeats"],
        "timings_ms": {k: timing_stats(timing, k) for k in arms},
        "calls_per_task": wl.calls_per_task,
        "speedup": {"vs_eager": med["eager"] / med["optimized"],
                    "vs_backend_plain": med["backend_plain"] / med["optimized"],
                    "backend_plain_vs_eager": med["eager"] / med["backend_plain"]},
        "ideal_speedup": 1.0 / remaining if remaining > 0 else None,
        "flops_per_task": {"reference": int(base),
                           "optimized": int(spent)},
        "trace": trace_summary(trace),
        # graphs run per program call of the task (a decoding loop's head calls; a cache plan's variants)
        "graph_calls_per_call": {k: {g: n / max(len(t), 1) for g, n in sorted(collections.Counter(
            g for graphs in t for g in graphs).items())} for k, t in task_graphs.items()},
        "fidelity": fid,
        "weight_bytes": {"reference": param_bytes(programs["backend_plain"]),
                         "optimized": param_bytes(programs["optimized"])},
        "state_bytes": state_bytes,
        "host": {"machine": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
    }
    if tvm_arms:
        result["tvm"] = tvm_summary(med, os.path.join(work, "backend_plain"))
    if kernels:
        result["kernels"] = kernels
    precision = precision_summary(programs["optimized"], trace)
    if precision is not None:
        result["precision"] = precision
    reuse = reuse_summary(programs["optimized"], trace)
    if reuse is not None:
        result["token_reuse"] = reuse
    spec = speculative_summary(programs["optimized"], task_graphs["optimized"])
    if spec is not None:
        result["speculative"] = spec
    dispatch = dispatch_summary(programs["optimized"])
    if dispatch is not None:
        result["moe_dispatch"] = dispatch
    if json_out:
        write_results(json_out, result)
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    return result


def tvm_summary(median_s: Mapping[str, float], plain_artifact: str) -> dict:
    """For a TVM target: the plain build (tuned schedules replayed where a database has them) against
    the same build with default schedules only and against ONNX Runtime, as ratios of median task
    times (above 1: the plain TVM build is slower), and how many of its fused functions were tuned."""
    import json
    with open(os.path.join(plain_artifact, "manifest.json")) as f:
        graphs = json.load(f).get("graphs", {})
    schedules = {g: e.get("schedules") for g, e in graphs.items() if isinstance(e, dict) and e.get("schedules")}
    out = {"tuned_vs_ort": median_s["backend_plain"] / median_s["ort"],
           "untuned_vs_ort": median_s["tvm_untuned"] / median_s["ort"],
           "untuned_vs_tuned": median_s["tvm_untuned"] / median_s["backend_plain"],
           "schedules": schedules}
    if "ort_optimized" in median_s:
        out["optimized_vs_ort_optimized"] = median_s["optimized"] / median_s["ort_optimized"]
    return out


def precision_summary(program, trace) -> dict | None:
    """For a program with dynamic_precision's decisions: the share of calls at each width in
    `trace` (the runner's labels per call; the first label of a call is the motion select's, the
    selects of one call agree) and the memory ratio at those shares; None without them."""
    rec = program.records.get("DynamicPrecisionDecisions")
    if rec is None:
        return None
    widths = {lv.label: lv.bits for lv in rec.levels}
    calls = [next((p for p in str(t).split("/") if p in widths), None) for t in trace]
    calls = [c for c in calls if c is not None]
    if not calls:
        return {"level_shares": {}, "memory_ratio": rec.memory_ratio()}
    shares = {lab: n / len(calls) for lab, n in sorted(collections.Counter(calls).items())}
    return {"level_shares": shares, "bits": widths, "memory_ratio": rec.memory_ratio(shares)}


def dispatch_summary(program) -> dict | None:
    """For a program with moe_dispatch's decisions: the expert rows computed per call against the
    dense form's, the busiest expert's pairs against the layer's mean (per layer, calibration run),
    the share of the calibration's pairs dropped, and the record's measure against the dense
    program; None without them."""
    rec = program.records.get("MoEDispatchPlan")
    if rec is None:
        return None
    rows, dense = rec.expert_rows
    layers = [{"region": x.region, "capacities": list(x.capacities), "most_seen": list(x.most_seen),
               "busiest_vs_mean": (round(max(x.most_seen) / (x.tokens * x.top_k / len(x.most_seen)), 3)
                                   if min(x.most_seen) >= 0 else None),
               "dropped": x.dropped} for x in rec.layers]
    return {"capacity": rec.capacity, "margin": rec.margin, "expert_rows": rows, "dense_rows": dense,
            "rows_ratio": round(rows / dense, 4), "layers": layers, "measured": dict(rec.measured)}


def speculative_summary(program, graph_trace) -> dict | None:
    """For a program with speculative_decode's plan: its drafter and acceptance, the decoding head's
    calls per program call in `graph_trace` (the graphs each call ran; a variant `head.<label>` or a
    fused `head+...` counts as the head) and the tokens fixed per head call (tokens / head calls:
    the mean accepted run plus the head's own token); None without it."""
    rec, loop = program.records.get("SpeculativePlan"), program.records.get("DecodeLoop")
    if rec is None or loop is None or not graph_trace:
        return None
    heads = [sum(g == loop.head or g.startswith((loop.head + ".", loop.head + "+")) for g in graphs)
             for graphs in graph_trace]
    mean = sum(heads) / len(heads)
    return {"drafter": rec.drafter, "radius": rec.radius, "lossless": rec.lossless, "tokens": rec.tokens,
            "head_calls_per_call": mean, "tokens_per_head_call": rec.tokens / mean if mean else None,
            "calls": len(heads)}


def reuse_summary(program, trace) -> dict | None:
    """For a program with token_reuse's decisions: the share of calls in `trace` (the runner's
    labels per call) that ran cold (a request's first call), full (too few static tokens) or at
    each reuse level, and the mean visual tokens reused per call at the last block; None without
    them."""
    recs = [r for k, r in program.records.items() if k.split("@")[0] == "TokenReuseDecisions"]
    if not recs:
        return None
    reuse = {lv.label: lv.reuse for lv in recs[0].levels}
    calls = []
    for t in trace:
        parts = str(t).split("/")
        if "cold" in parts:
            calls.append("cold")
        elif "warm" in parts and parts.index("warm") + 1 < len(parts):
            calls.append(parts[parts.index("warm") + 1])
    if not calls:
        return {"level_shares": {}, "mean_reused": 0.0}
    shares = {lab: n / len(calls) for lab, n in sorted(collections.Counter(calls).items())}
    return {"level_shares": shares, "mean_reused": sum(reuse.get(c, 0) for c in calls) / len(calls),
            "calls": len(calls)}
