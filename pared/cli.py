"""The `pared` command line.

    pared optimize PIPELINE.yaml [--out DIR]       capture, rewrite, lower, check, save
    pared inspect FILE.py:FUNCTION [--depth N]      regions, op counts, parameters, FLOPs
    pared run ARTIFACT --inputs IN.npz [--out OUT.npz]
    pared bench ARTIFACT [--repeats N]             latency of an artifact
    pared keygen --out KEY                         Ed25519 key pair: KEY (private, 0600) and KEY.pub
    pared sign ARTIFACT --key KEY                  write ARTIFACT/signature.json (over manifest.json)
    pared report ARTIFACT [--out report.html]      one self-contained HTML page of what pared saw and decided
    pared bench --workload NAME [--pipeline P.yaml] [--target T] [--json OUT.json]
                                                   eager vs. plain lowering vs. pipeline, speed and fidelity
    pared bench --placement sweep|served|adapt|dads|trigger|faults|plot|all [--workload W] [--episodes N] [--json OUT.json]
                                                   edge/cloud placement: cut per bandwidth vs oracle (plot),
                                                   trace adaptation, offload trigger, faults under Triton

Errors print one line (no traceback unless --debug). Exit codes: 0 success,
1 a pared error (bad input, failed pass, failed lowering), 2 usage, 3 fidelity
bound missed, 4 an unexpected internal error.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from typing import Any, Mapping, Sequence

from pared.ir.errors import FidelityError, ParedError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FIDELITY, EXIT_INTERNAL = 0, 1, 2, 3, 4


def _console():
    from rich.console import Console
    return Console(stderr=True, highlight=False)


def _out():
    from rich.console import Console
    return Console(highlight=False)


class _Progress:
    """A rich status line that shows the current stage (capture, each pass, each graph)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.status = None

    def __enter__(self):
        if not self.quiet:
            self.status = _console().status("starting")
            self.status.__enter__()
        return self

    def __call__(self, message: str) -> None:
        if self.status is not None:
            self.status.update(message)
            _console().log(message)

    def __exit__(self, *exc):
        if self.status is not None:
            self.status.__exit__(*exc)


def _split_inputs(value: Any) -> tuple[tuple, dict]:
    """A factory's return: a tensor, a tuple of args, or {"args": ..., "kwargs": ...}."""
    if isinstance(value, dict) and set(value) <= {"args", "kwargs"}:
        args = value.get("args", ())
        return (tuple(args) if isinstance(args, (tuple, list)) else (args,)), dict(value.get("kwargs", {}))
    if isinstance(value, (tuple, list)):
        return tuple(value), {}
    return (value,), {}


def cmd_optimize(a: argparse.Namespace) -> int:
    from pared.pipeline import build_passes, load_pipeline, resolve_ref
    from pared.ir.errors import PipelineError

    spec = load_pipeline(a.pipeline)
    base = os.path.dirname(os.path.abspath(a.pipeline))
    for key in ("model", "example_inputs"):
        if not getattr(spec, key):
            raise PipelineError(f"{a.pipeline}: the CLI needs '{key}: path/to/file.py:function'")
    out = a.out or spec.export
    if not out:
        raise PipelineError(f"{a.pipeline}: no output directory; give --out DIR or 'export:' in the file")
    import pared
    model = resolve_ref(spec.model, base)()
    args, kwargs = _split_inputs(resolve_ref(spec.example_inputs, base)())
    calibration = resolve_ref(spec.calibration, base)() if spec.calibration else None
    holdout = resolve_ref(spec.holdout, base)() if spec.holdout else None
    passes = build_passes(spec)
    with _Progress(a.quiet) as progress:
        opt = pared.optimize(model, args, kwargs=kwargs, target=a.target or spec.target or "cpu", pipeline=passes,
                             calibration=calibration, holdout=holdout, fidelity=spec.fidelity,
                             allow_fidelity_loss=a.allow_fidelity_loss, bench_repeats=a.repeats,
                             backend_options=spec.backend, progress=progress,
                             search=dict(spec.search or {}, executor="ray", address=a.search_address)
                             if a.search_address else spec.search)
        path = opt.save(out)
        page = None
        if a.report:
            from pared.report import write_report
            progress("writing the HTML report")
            page = write_report(path)
    _print_report(opt.report, path)
    if page:
        _out().print(f"report: {page}", soft_wrap=True)
    return EXIT_OK


def _print_report(report: dict, path: str) -> None:
    from rich.table import Table
    t = Table(title=f"pared artifact: {path}", show_header=False)
    f = report.get("fidelity", {})
    s = report.get("speed", {})
    t.add_row("target", str(report.get("target")))
    t.add_row("passes", ", ".join(f"{p['name']}{'' if p['modified'] else ' (no change)'}"
                                  for p in report.get("passes", [])) or "(none)")
    if "cosine_min" in f:
        t.add_row("fidelity", f"cosine min {f['cosine_min']:.6f}, rel L2 max {f['rel_l2_max']:.2e}, "
                              f"max abs {f['max_abs']:.2e} over {f['checked_inputs']} input set(s)"
                              + (f" ({f['judged_on']})" if "judged_on" in f else ""))
    if "speedup_vs_eager" in s:
        t.add_row("speed", f"{s['artifact_ms']:.3f} ms vs eager {s['eager_ms']:.3f} ms "
                           f"= {s['speedup_vs_eager']:.2f}x (median of {s['repeats']}, alternating"
                           + (f", {s['threads']} thread(s) each)" if "threads" in s else ")"))
    _out().print(t)


def _load_factory(ref: str):
    from pared.pipeline import resolve_ref
    return resolve_ref(ref, os.getcwd())()


def _print_stacks(out: Any, program: Any) -> None:
    """The repeated block stacks, in the order they run, with their streams, and which one
    the cache passes take by default."""
    from pared.analysis.redundancy import block_regions, block_stacks, primary_io
    from pared.ir.errors import PassError
    stacks = block_stacks(program)
    if not stacks:
        return
    gm = program.main.module
    try:
        default = block_regions(program)[0].path
    except PassError:
        default = None
    out.print("block stacks, in the order they run (a cache pass's `regions` may list several, "
              "e.g. \"a.*, b.*\", to span them):")
    for s in stacks:
        nodes = {n.name: n for n in gm.graph.nodes}
        streams = sum(1 for o in s[0].outputs if hasattr(nodes[o].meta.get("val"), "shape"))
        residual = all(primary_io(gm, r) is not None for r in s)
        parent = s[0].path.rpartition(".")[0]
        out.print(f"  {parent}.*  {len(s)} × {s[0].module_type.rsplit('.', 1)[-1]}, {streams} output(s) each"
                  + ("" if residual else ", no residual path") + ("  (the default)" if s[0].path == default else ""))


def cmd_inspect(a: argparse.Namespace) -> int:
    from rich.tree import Tree
    import pared
    from pared.analysis.cost import profile_graph
    from pared.ir.errors import PipelineError

    made = _load_factory(a.model)
    if isinstance(made, tuple) and len(made) in (2, 3) and hasattr(made[0], "forward"):
        model, inputs = made[0], made[1]
        kwargs = made[2] if len(made) == 3 else {}
    else:
        if not a.inputs:
            raise PipelineError(f"{a.model} returned a model; give --inputs FILE.py:FUNCTION, or return "
                                "(model, example_inputs) from it")
        model = made
        inputs, kwargs = _split_inputs(_load_factory(a.inputs))
    with _Progress(a.quiet) as progress:
        progress(f"capturing {type(model).__name__}")
        program = pared.capture(model, inputs, kwargs=kwargs)
    g = program.main
    cost = profile_graph(g.module)
    regions = program.regions()
    by_path = {r.path: r for r in cost.regions}
    out = _out()
    out.print(f"[bold]{type(model).__name__}[/]: {cost.param_count:,} parameters "
              f"({cost.param_bytes / 1e6:.2f} MB), ~{cost.total_flops / 1e9:.3f} GFLOPs per call, "
              f"{sum(g.op_counts().values())} ops")
    out.print(f"inputs: {', '.join(f'{n} {list(t.shape)} {t.dtype}' for n, t in zip(g.input_names, g.example_inputs))}")
    out.print(f"outputs: {', '.join(g.output_names)}")
    tree = Tree("regions")
    nodes = {"": tree}
    for path, r in regions.items():
        if r.depth > a.depth:
            continue
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        c = by_path.get(path)
        label = f"{path}  [dim]{r.module_type.rsplit('.', 1)[-1]}[/]  {len(r.nodes)} ops"
        if c and cost.total_flops:
            label += f", {100 * c.flops / cost.total_flops:.1f}% FLOPs"
        nodes[path] = nodes.get(parent, tree).add(label)
    out.print(tree)
    _print_stacks(out, program)
    counts = sorted(g.op_counts().items(), key=lambda kv: -kv[1])
    out.print("ops: " + ", ".join(f"{_op_label(k)}×{v}" for k, v in counts[: a.top]))
    return EXIT_OK


def _op_label(op: str) -> str:
    if op.startswith("<built-in function "):
        return op[len("<built-in function "):-1]
    return op.replace("aten.", "")


def cmd_run(a: argparse.Namespace) -> int:
    import numpy as np
    import pared

    ex = pared.load(a.artifact, allow_isa_mismatch=a.allow_isa_mismatch, trusted_keys=a.trusted_key)
    with np.load(a.inputs, allow_pickle=False) as data:
        names = [s["name"] for s in ex.inputs]
        if all(n in data for n in names):
            arrays = [data[n] for n in names]
        else:
            arrays = [data[f"arr_{i}"] for i in range(len(names)) if f"arr_{i}" in data]
            if len(arrays) != len(names):
                raise ParedError(f"{a.inputs}: needs arrays named {names} (or arr_0..arr_{len(names) - 1}); "
                                 f"it has {list(data.keys())}")
    flat = ex.run_flat(*arrays)
    out_names = list(ex.plan.output_names)
    if a.out:
        tmp = a.out + ".tmp.npz"
        np.savez(tmp, **{n: v for n, v in zip(out_names, flat)})
        os.replace(tmp, a.out)
        _out().print(f"wrote {len(flat)} output(s) to {a.out}")
    else:
        for n, v in zip(out_names, flat):
            _out().print(f"{n}: {v.dtype}{list(v.shape)} mean {float(np.mean(v)):.6g} std {float(np.std(v)):.6g}")
    return EXIT_OK


def cmd_keygen(a: argparse.Namespace) -> int:
    from pared.backends.signing import fingerprint, generate_key, load_private_key
    private, public = generate_key(a.out, overwrite=a.force)
    _out().print(f"wrote {private} (private, keep it secret) and {public} (public: give it to whoever loads "
                 f"your artifacts); fingerprint {fingerprint(load_private_key(private).public_key())}",
                 soft_wrap=True)
    return EXIT_OK


def cmd_sign(a: argparse.Namespace) -> int:
    from pared.backends.artifact import sign_artifact
    path = sign_artifact(a.artifact, a.key)
    _out().print(f"signed {a.artifact}: {path}", soft_wrap=True)
    return EXIT_OK


def cmd_report(a: argparse.Namespace) -> int:
    from pared.report import write_report
    path = write_report(a.artifact, a.out, trusted_keys=a.trusted_key)
    _out().print(f"wrote {path} (self-contained: open it in any browser, offline)", soft_wrap=True)
    return EXIT_OK


def cmd_serve(a: argparse.Namespace) -> int:
    from pared.backends.remote import serve
    serve(a.artifact, a.part, grpc_port=a.grpc_port, http_port=a.http_port, metrics_port=a.metrics_port,
          trusted_keys=a.trusted_key, log=lambda m: _out().print(m, soft_wrap=True))
    return EXIT_OK


def _usage(message: str) -> int:
    _console().print(f"[red]usage error:[/] {message}")
    return EXIT_USAGE


def cmd_bench(a: argparse.Namespace) -> int:
    if a.placement:
        return _bench_placement(a)
    if a.workload:
        if a.artifact:
            return _usage("pared bench: give an ARTIFACT or --workload, not both")
        return _bench_workload(a)
    if not a.artifact:
        return _usage("pared bench: give an ARTIFACT directory or --workload NAME")
    for opt in ("pipeline", "target", "samples", "steps", "batch", "head", "episodes", "tasks"):
        if getattr(a, opt) is not None:
            return _usage(f"pared bench: --{opt} needs --workload")
    import numpy as np
    import pared

    a.repeats = 50 if a.repeats is None else a.repeats
    ex = pared.load(a.artifact, threads=a.threads)
    rng = np.random.default_rng(0)
    arrays = []
    for s in ex.inputs:
        shape = s.get("example_shape") or [d if isinstance(d, int) else 1 for d in s["shape"]]
        dt = np.dtype(s["dtype"])
        if dt.kind in "iu":
            arrays.append(rng.integers(0, 2, size=shape).astype(dt))
        elif dt.kind == "b":
            arrays.append(np.ones(shape, dtype=dt))
        else:
            arrays.append(rng.standard_normal(shape).astype(dt))
    for _ in range(a.warmup):
        ex.reset()
        ex.run_flat(*arrays)
    times = []
    for _ in range(a.repeats):
        ex.reset()
        t0 = time.perf_counter()
        ex.run_flat(*arrays)
        times.append(time.perf_counter() - t0)
    times.sort()
    res = {"artifact": a.artifact, "target": ex.target.get("name"), "repeats": a.repeats,
           "median_ms": statistics.median(times) * 1e3, "p90_ms": times[int(0.9 * (len(times) - 1))] * 1e3,
           "min_ms": times[0] * 1e3, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
    if a.profile:
        from pared.backends.profile import profile_kernels

        def once():
            ex.reset()
            ex.run_flat(*arrays)
        res["kernels"] = profile_kernels(ex, once, rounds=a.profile)
    if a.json == "-":
        print(json.dumps(res))
    else:
        if a.json:
            from pared.bench import write_results
            write_results(a.json, res)
        _out().print(f"{a.artifact} ({res['target']}): median {res['median_ms']:.3f} ms, p90 {res['p90_ms']:.3f} ms, "
                     f"min {res['min_ms']:.3f} ms over {a.repeats} runs")
        if "kernels" in res:
            _print_kernels(_out(), "the artifact", res["kernels"])
    return EXIT_OK


def _print_kernels(out: Any, what: str, prof: Mapping[str, Any]) -> None:
    """One line of a kernel profile (pared.backends.profile): time by kind, the costliest kernels."""
    kinds = ", ".join(f"{c} {ms:.1f}" for c, ms in prof["categories"].items() if ms >= 0.05)
    out.print(f"kernels of {what}: {prof['kernel_ms']:.1f} ms a task in {prof['kernels']} kernels ({kinds}); "
              f"outside them {prof['outside_kernels_ms']:.1f} of {prof['task_ms_unprofiled']:.1f} ms unprofiled; "
              f"costliest: " + ", ".join(f"{t['name']} {t['ms']:.1f}" for t in prof["top"][:3]), soft_wrap=True)


_PLACEMENT_WORKLOADS = {"vla_metaworld": "vla", "dit_mnist": "dit"}


def _bench_placement(a: argparse.Namespace) -> int:
    if a.artifact:
        return _usage("pared bench: --placement builds its own artifacts; give no ARTIFACT")
    if a.profile:
        return _usage("pared bench: --profile profiles an ARTIFACT or a --workload's artifacts, not --placement")
    argv = ["--part", a.placement]
    if a.workload:
        if a.workload not in _PLACEMENT_WORKLOADS:
            return _usage(f"pared bench --placement: --workload must be one of {sorted(_PLACEMENT_WORKLOADS)}, "
                          f"got {a.workload!r}")
        argv += ["--workloads", _PLACEMENT_WORKLOADS[a.workload]]
    if a.episodes is not None:
        argv += ["--episodes", str(a.episodes)]
    if a.repeats is not None:
        argv += ["--rounds", str(a.repeats)]
    if a.json not in (None, "-"):
        argv += ["--json", a.json]
    from pared.workloads.placement import main as placement
    r = placement(argv)
    if a.json == "-":
        print(json.dumps(r))
    return EXIT_OK


def _bench_workload(a: argparse.Namespace) -> int:
    from pared.workloads.bench import bench_workload
    opts = {k: getattr(a, k) for k in ("samples", "steps", "batch", "head", "episodes", "tasks", "decoder", "policy",
                                       "calibration_steps", "frames")
            if getattr(a, k) is not None}
    say = (lambda m: None) if a.quiet else (lambda m: _console().print(f"[dim]{m}[/dim]"))
    r = bench_workload(a.workload, pipeline=a.pipeline or "default", target=a.target,
                       threads=a.threads or 1, repeats=5 if a.repeats is None else a.repeats,
                       json_out=a.json if a.json not in (None, "-") else None, workload_options=opts, progress=say,
                       profile=a.profile)
    if a.json == "-":
        print(json.dumps(r))
        return EXIT_OK
    t = r["timings_ms"]
    out = _out()
    out.print(f"{r['summary']}")
    out.print(f"pipeline {r['pipeline'] or '(none)'} -> {r['target']}, {r['torch_threads']} thread(s), "
              f"median of {r['repeats']} rounds (min-max)")
    for k in t:
        out.print(f"  {k:14s} {t[k]['median']:10.1f} ms  ({t[k]['min']:.1f}-{t[k]['max']:.1f})")
    if "tvm" in r:
        v = r["tvm"]
        tuned = sum(x.get("tuned_functions", 0) for x in v["schedules"].values())
        total = sum(x.get("functions", 0) for x in v["schedules"].values())
        out.print(f"TVM: {tuned} of {total} fused functions from tuning databases; time vs ONNX Runtime: "
                  f"tuned {v['tuned_vs_ort']:.2f}x, untuned {v['untuned_vs_ort']:.2f}x "
                  f"(untuned/tuned {v['untuned_vs_tuned']:.2f}x)")
        if "optimized_vs_ort_optimized" in v:
            out.print(f"the pipeline on TVM vs on ONNX Runtime (ort_optimized): {v['optimized_vs_ort_optimized']:.2f}x")
    s = r["speedup"]
    out.print(f"speedup vs eager {s['vs_eager']:.2f}x, vs backend_plain {s['vs_backend_plain']:.2f}x "
              f"(ideal from FLOPs {r['ideal_speedup']:.2f}x)")
    for k, prof in r.get("kernels", {}).items():
        _print_kernels(out, k, prof)
    fid = dict(r["fidelity"])
    per_frame = fid.pop("per_frame", None)
    out.print("fidelity: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in fid.items()))
    if per_frame:           # a streamed workload: the curves per frame position, at a few positions
        n = len(next(iter(per_frame["reference"].values())))
        at = sorted({i for i in (2, 7, 15, 31, 47, n - 1) if i < n})
        out.print("per frame (reference -> optimized) at frames " + ", ".join(map(str, at)) + ":")
        for m in per_frame["reference"]:
            out.print(f"  {m:16s} " + "  ".join(f"{per_frame['reference'][m][i]:.3g}->{per_frame['optimized'][m][i]:.3g}"
                                                for i in at))
    if a.json:
        out.print(f"wrote {a.json}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pared", description="A compiler for redundancy in generative and embodied models.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("optimize", help="run a pipeline file and save the artifact")
    o.add_argument("pipeline")
    o.add_argument("--out", help="artifact directory (default: the file's 'export')")
    o.add_argument("--target", help="override the file's target")
    o.add_argument("--search-address", metavar="ADDR", help="run the passes' search trials on the Ray cluster at "
                   "ADDR (auto, ray://HEAD:10001); overrides the file's search: address")
    o.add_argument("--allow-fidelity-loss", action="store_true", help="save even if the fidelity bound is missed")
    o.add_argument("--repeats", type=int, default=10, help="rounds of side-by-side timing (0: skip)")
    o.add_argument("--report", action="store_true", help="also write the HTML report beside the artifact "
                                                          "(ARTIFACT.report.html; see `pared report`)")
    o.add_argument("-q", "--quiet", action="store_true")
    o.set_defaults(func=cmd_optimize)
    i = sub.add_parser("inspect", help="show a model's regions, ops, parameters and FLOPs")
    i.add_argument("model", help="FILE.py:FUNCTION returning a model, or (model, example_inputs[, kwargs])")
    i.add_argument("--inputs", help="FILE.py:FUNCTION returning example inputs")
    i.add_argument("--depth", type=int, default=3, help="region tree depth shown")
    i.add_argument("--top", type=int, default=15, help="most frequent ops shown")
    i.add_argument("-q", "--quiet", action="store_true")
    i.set_defaults(func=cmd_inspect)
    r = sub.add_parser("run", help="run an artifact on inputs from an .npz file")
    r.add_argument("artifact")
    r.add_argument("--inputs", required=True)
    r.add_argument("--out")
    r.add_argument("--allow-isa-mismatch", action="store_true",
                   help="run an artifact whose INT8 kernels would saturate on this CPU (warns; outputs are wrong)")
    r.add_argument("--trusted-key", action="append", metavar="KEY.pub",
                   help="load only if signed by this public key (repeatable)")
    r.set_defaults(func=cmd_run)
    k = sub.add_parser("keygen", help="make an Ed25519 key pair for signing artifacts")
    k.add_argument("--out", required=True, help="private key file; the public key goes to OUT.pub")
    k.add_argument("--force", action="store_true", help="overwrite existing key files")
    k.set_defaults(func=cmd_keygen)
    sg = sub.add_parser("sign", help="sign an artifact (signature.json over its manifest) with a private key")
    sg.add_argument("artifact")
    sg.add_argument("--key", required=True, help="Ed25519 private key file (pared keygen)")
    sg.set_defaults(func=cmd_sign)
    rp = sub.add_parser("report", help="write one self-contained HTML page of what pared saw and decided")
    rp.add_argument("artifact")
    rp.add_argument("--out", help="the HTML file (default: beside the artifact, ARTIFACT.report.html)")
    rp.add_argument("--trusted-key", action="append", metavar="KEY.pub",
                    help="report only if signed by this public key (repeatable)")
    rp.set_defaults(func=cmd_report)
    sv = sub.add_parser("serve", help="serve a partitioned artifact's remote half with Triton (KServe v2 over gRPC)")
    sv.add_argument("artifact")
    sv.add_argument("--part", default="cloud", help="the device whose graphs to serve (default: cloud)")
    sv.add_argument("--grpc-port", type=int, default=8001)
    sv.add_argument("--http-port", type=int, default=8000)
    sv.add_argument("--metrics-port", type=int, default=8002)
    sv.add_argument("--trusted-key", action="append", metavar="KEY.pub",
                    help="serve only if signed by this public key (repeatable)")
    sv.set_defaults(func=cmd_serve)
    b = sub.add_parser("bench", help="time an artifact, or benchmark a reference workload side by side")
    b.add_argument("artifact", nargs="?")
    b.add_argument("--workload", help="a reference workload: dit_mnist, dit_moe_mnist, vit_mnist, minilm, "
                                      "vla_metaworld, video_ar")
    b.add_argument("--placement", choices=("sweep", "served", "adapt", "dads", "trigger", "faults", "plot", "all"),
                   help="the edge/cloud placement benchmark (pared.workloads.placement): the bandwidth sweep "
                        "against the oracle with a plot, end to end and over a bandwidth trace (sweep), the adaptive "
                        "plan closed loop while the bandwidth changes mid-episode (adapt), the sweep with the cloud half "
                        "served by Triton over the shaped link (served), the DAG min-cut against the "
                        "chain search (dads), RAPID's "
                        "offload trigger closed loop (trigger), the Triton-served half under faults (faults); "
                        "--workload vla_metaworld or dit_mnist limits the sweep to one")
    b.add_argument("--pipeline", help="pipeline file for the workload (default: examples/pipelines/NAME.yaml)")
    b.add_argument("--target", help="target for the workload (default: cpu)")
    b.add_argument("--samples", type=int, help="workload fidelity-set size (DiT samples, ViT digits, video_ar clips)")
    b.add_argument("--steps", type=int, help="sampler steps (DiT workloads; video_ar: DDIM steps per frame)")
    b.add_argument("--frames", type=int, help="video_ar: rollout length in frames, context included (default 64)")
    b.add_argument("--batch", type=int, help="workload batch size (the timed task runs one batch)")
    b.add_argument("--head", choices=("diffusion", "tokens"), help="vla_metaworld: the action head")
    b.add_argument("--episodes", type=int, help="vla_metaworld: closed-loop episodes per task")
    b.add_argument("--tasks", help="vla_metaworld: comma-separated Meta-World tasks (default: all six)")
    b.add_argument("--decoder", choices=("unrolled", "loop"),
                   help="vla_metaworld: the head's loop (greedy decoding, or the DDIM steps) unrolled in one graph, "
                        "or as a loop of the plan (a pass that rewrites that loop picks loop)")
    b.add_argument("--policy", choices=("base", "large", "all_tokens", "wide"),
                   help="vla_metaworld diffusion policy: the shipped one, its larger head (train_large_head.py), "
                        "the one whose backbone sees all 64 visual tokens (vla_diffusion_64.safetensors), or that one "
                        "at twice the ViT / backbone width (vla_diffusion_64_wide.safetensors)")
    b.add_argument("--calibration-steps", type=int, dest="calibration_steps",
                   help="vla_metaworld: calibration observations from the training demonstrations (default 1024)")
    b.add_argument("--repeats", type=int, help="timed rounds (default 50 for an artifact, 5 for a workload)")
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--threads", type=int, help="intra-op threads for every contender (workload default 1)")
    b.add_argument("--profile", type=int, default=0, metavar="ROUNDS",
                   help="also profile the artifact's run (with --workload: each artifact's task) kernel by kernel "
                        "over ROUNDS rounds (ONNX Runtime's profiler, TVM's VM instrument): time by kind of kernel "
                        "and the costliest kernels")
    b.add_argument("--json", nargs="?", const="-", metavar="OUT.json",
                   help="write the result as JSON to OUT.json (no file: print it to stdout)")
    b.add_argument("-q", "--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    logging.basicConfig(level=logging.DEBUG if a.debug else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return a.func(a)
    except FidelityError as e:
        if a.debug:
            raise
        _console().print(f"[red]error:[/] {e}")
        return EXIT_FIDELITY
    except (ParedError, FileNotFoundError, TypeError, ValueError) as e:
        if a.debug:
            raise
        _console().print(f"[red]error:[/] {e}", soft_wrap=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        _console().print("interrupted")
        return 130
    except Exception as e:
        if a.debug:
            raise
        _console().print(f"[red]internal error:[/] {type(e).__name__}: {e} (rerun with --debug for the traceback)",
                         soft_wrap=True)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
