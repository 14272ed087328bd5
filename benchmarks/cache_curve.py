"""Speed vs. fidelity of pared's cache passes on dit_mnist, beside diffusers' own
cache hooks on the eager model (the peers users have today), in one run; on
dit_moe_mnist, expert_cache (MoECa) beside the block-level passes.

    python benchmarks/cache_curve.py                       # ~15 min here, 1 thread
    python benchmarks/cache_curve.py --samples 20 --repeats 3 --json benchmarks/results/cache_curve.json
    python benchmarks/cache_curve.py --workload dit_moe_mnist --no-peers \
        --json benchmarks/results/cache_curve_moe.json --png benchmarks/cache_curve_moe.png

Every contender draws the same samples (same seeds, labels, DDIM-50, CFG 1.5).
Speed: one batch of sampling per contender per round, contenders alternating,
median over rounds; speedups are against the uncached eager model and against the
uncached artifact on the same backend. Fidelity: PSNR of the samples against the
uncached eager samples, and the judge's accuracy. Writes JSON and a PNG chart.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from pared.bench import write_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

PARED = [
    ("interval_cache N=2", [{"interval_cache": {"interval": 2}}]),
    ("interval_cache N=3", [{"interval_cache": {"interval": 3}}]),
    ("delta_cache N=3", [{"delta_cache": {"interval": 3}}]),
    ("residual_cache 0.1", [{"residual_cache": {"threshold": 0.1}}]),
    ("residual_cache 0.2", [{"residual_cache": {"threshold": 0.2}}]),
    ("residual_cache 0.3", [{"residual_cache": {"threshold": 0.3, "max_consecutive": 3}}]),
    ("taylor_cache N=3", [{"taylor_cache": {"interval": 3}}]),
    ("magnitude_cache 0.12", [{"magnitude_cache": {"threshold": 0.12}}]),
    ("cfg_skip 0.99", [{"cfg_skip": {"threshold": 0.99}}]),
    # every block cached (FORA over the whole stack; TaylorSeer forecasting it)
    ("interval_cache all N=4", [{"interval_cache": {"interval": 4, "first": 0, "last": -1}}]),
    ("interval_cache all N=5", [{"interval_cache": {"interval": 5, "first": 0, "last": -1}}]),
    ("taylor_cache all N=2", [{"taylor_cache": {"interval": 2, "first": 0, "last": -1}}]),
    ("taylor_cache all N=3", [{"taylor_cache": {"interval": 3, "first": 0, "last": -1}}]),
    ("taylor_cache all N=4", [{"taylor_cache": {"interval": 4, "first": 0, "last": -1}}]),
    ("taylor_cache all N=5", [{"taylor_cache": {"interval": 5, "first": 0, "last": -1}}]),
    ("taylor_cache all N=6", [{"taylor_cache": {"interval": 6, "first": 0, "last": -1}}]),
]

# dit_moe_mnist: expert-level reuse (MoECa) against block-level reuse, one curve
PARED_MOE = [
    ("expert_cache 0.1", [{"expert_cache": {"threshold": 0.1, "refresh": 0}}]),
    ("expert_cache 0.2", [{"expert_cache": {"threshold": 0.2, "refresh": 0}}]),
    ("expert_cache 0.3", [{"expert_cache": {"threshold": 0.3, "refresh": 0}}]),
    ("expert_cache refresh=1 0.2", [{"expert_cache": {"threshold": 0.2, "refresh": 1}}]),
    ("expert_cache static N=4 refresh=2", [{"expert_cache": {"interval": 4, "refresh": 2}}]),
    ("residual_cache 0.1", [{"residual_cache": {"threshold": 0.1}}]),
    ("residual_cache 0.2", [{"residual_cache": {"threshold": 0.2}}]),
    ("residual_cache 0.4", [{"residual_cache": {"threshold": 0.4}}]),
    ("residual_cache 0.6", [{"residual_cache": {"threshold": 0.6}}]),
    ("interval_cache all N=4", [{"interval_cache": {"interval": 4, "first": 0, "last": -1}}]),
    ("taylor_cache all N=5", [{"taylor_cache": {"interval": 5, "first": 0, "last": -1}}]),
]


def _hooked(model, apply, steps: int):
    """A deep copy of `model` with diffusers hooks on its DiT, as a numpy denoiser
    with a cache context per call and a reset per request."""
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context
    m = copy.deepcopy(model)
    apply(m.dit)
    step = [0]

    def call(x, t, y):
        with torch.inference_mode():
            _set_cache_context(m.dit, CacheContext("batch", step_index=step[0], num_inference_steps=steps))
            try:
                out = m(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y))
            finally:
                _set_cache_context(m.dit, None)
        step[0] += 1
        return out.numpy()

    def reset():
        HookRegistry.check_if_exists_or_initialize(m.dit).reset_stateful_hooks()
        step[0] = 0
    return call, reset


def _mag_ratios(model, wl) -> list[float]:
    """MagCache needs per-model magnitude ratios: run its calibration mode once and
    read the ratios it prints."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache
    call, reset = _hooked(model, lambda d: apply_mag_cache(d, MagCacheConfig(calibrate=True,
                                                                              num_inference_steps=wl.steps)), wl.steps)
    buf = io.StringIO()
    reset()
    with contextlib.redirect_stdout(buf):
        wl.sample(call, 0)
    found = re.findall(r"\[([-0-9.,eE\s]+)\]", buf.getvalue())
    if not found:
        raise RuntimeError(f"MagCache calibration printed no ratios: {buf.getvalue()[:300]!r}")
    return [float(v) for v in found[-1].split(",")]


def peers(model, wl, keep=lambda label: True):
    from diffusers.hooks import (FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig,
                                 apply_first_block_cache, apply_mag_cache, apply_taylorseer_cache)
    out = []
    for th in (0.1, 0.2):
        out.append((f"diffusers FirstBlockCache {th}", *_hooked(
            model, lambda d, th=th: apply_first_block_cache(d, FirstBlockCacheConfig(threshold=th)), wl.steps)))
    ratios = _mag_ratios(model, wl) if any(keep(f"diffusers MagCache {t}") for t in (0.12, 0.24)) else None
    for th in (0.12, 0.24) if ratios else ():
        out.append((f"diffusers MagCache {th}", *_hooked(
            model, lambda d, th=th: apply_mag_cache(d, MagCacheConfig(threshold=th, num_inference_steps=wl.steps,
                                                                       mag_ratios=ratios, max_skip_steps=3)),
            wl.steps)))
    for n in (3,):
        # the default identifiers hook nothing on DiTTransformer2DModel: point them at attn1 / ff
        cfg = TaylorSeerCacheConfig(cache_interval=n, disable_cache_before_step=3, max_order=1,
                                    taylor_factors_dtype=torch.float32,
                                    cache_identifiers=[r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"])
        out.append((f"diffusers TaylorSeerCache N={n}", *_hooked(
            model, lambda d, cfg=cfg: apply_taylorseer_cache(d, cfg), wl.steps)))
    return [o for o in out if keep(o[0])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workload", default="dit_mnist")
    p.add_argument("--json", default=os.path.join(HERE, "results", "cache_curve.json"))
    p.add_argument("--png", default=os.path.join(HERE, "cache_curve.png"))
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--only", help="regex: keep only the contenders it matches (eager and pared uncached stay)")
    a = p.parse_args()

    import pared
    from pared.backends.executor import Executor
    from pared.fidelity import side_by_side
    from pared.workloads import DiTWorkload, psnr_db, torch_callable

    torch.set_num_threads(a.threads)
    wl = DiTWorkload(a.workload, batch=10, samples=a.samples)
    model = wl.build()
    eager = torch_callable(model)
    work = tempfile.mkdtemp(prefix="pared-curve-")
    contenders = {"eager": (eager, None)}
    built = {}
    keep = (lambda label: re.search(a.only, label) is not None) if a.only else (lambda label: True)
    listed = PARED_MOE if a.workload == "dit_moe_mnist" else PARED
    for label, plist in [("pared uncached", [])] + [s for s in listed if keep(s[0])]:
        t0 = time.perf_counter()
        dyn = wl.dynamic_shapes() if any("cfg_skip" in p for p in plist) else None
        opt = pared.optimize(model, wl.example_inputs(), target="cpu", pipeline=["temporal_redundancy", *plist] if plist else [],
                             calibration=wl.calibration(), bench_repeats=0, allow_fidelity_loss=True,
                             dynamic_shapes=dyn)
        ex = Executor(opt.save(os.path.join(work, re.sub(r"\W+", "_", label))), threads=a.threads)
        contenders[label] = (ex, ex.reset)
        built[label] = opt
        print(f"built {label} in {time.perf_counter() - t0:.0f} s", flush=True)
    if not a.no_peers:
        for label, call, reset in peers(model, wl, keep):
            contenders[label] = (call, reset)

    print(f"fidelity: {a.samples} samples per contender", flush=True)
    ref = wl.run(eager)
    figures = {}
    for label, (fn, reset) in contenders.items():
        got = ref if label == "eager" else wl.run(fn, reset)
        f = wl.fidelity(ref, got)
        trace = None
        if isinstance(fn, Executor):
            fn.reset()
            wl.task(fn)
            trace = {r: fn.trace.count(r) for r in dict.fromkeys(fn.trace)}
        figures[label] = {"psnr_db": round(f["psnr_db"], 2), "judge_acc": f["judge_acc_optimized"], "trace": trace}
        print(f"  {label:32s} psnr {f['psnr_db']:6.2f} dB  judge {f['judge_acc_optimized']:.3f}  {trace or ''}",
              flush=True)

    print(f"timing: {len(contenders)} contenders, {a.repeats} alternating rounds of one batch each", flush=True)
    tasks = {label: (lambda fn=fn, reset=reset: wl.task(fn, reset)) for label, (fn, reset) in contenders.items()}
    timing = side_by_side(tasks, repeats=a.repeats, warmup=1)
    med = timing["median_s"]
    rows = []
    for label in contenders:
        row = {"contender": label, "median_ms": round(med[label] * 1e3, 1),
               "speedup_vs_eager": round(med["eager"] / med[label], 3),
               "speedup_vs_uncached_artifact": round(med["pared uncached"] / med[label], 3)
               if isinstance(contenders[label][0], Executor) else None, **figures[label]}
        rows.append(row)
        print(f"  {label:32s} {row['median_ms']:9.1f} ms  {row['speedup_vs_eager']:5.2f}x eager  "
              f"psnr {row['psnr_db']:6.2f}", flush=True)
    result = {"workload": wl.summary, "samples": a.samples, "repeats": a.repeats, "threads": a.threads,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "torch": torch.__version__, "rows": rows}
    write_results(a.json, result, indent=1)
    _plot(rows, a.png, a.workload, peers=not a.no_peers)
    print(f"wrote {a.json} and {a.png}")


def _plot(rows, path: str, workload: str = "dit_mnist", peers: bool = True) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 5))
    groups: dict[str, list] = {}
    for r in rows:
        if r["contender"] == "eager":
            continue
        key = re.sub(r"\s+[-0-9.=N]+$", "", r["contender"])
        groups.setdefault(key, []).append(r)
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["speedup_vs_eager"])
        psnr = [min(r["psnr_db"], 80) for r in rs]
        ax.plot([r["speedup_vs_eager"] for r in rs], psnr, "o-" if key.startswith(("interval", "delta", "residual", "pared")) else "s--",
                label=key)
    ax.axhline(30, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("speedup vs. uncached eager PyTorch (one batch, DDIM-50, CFG 1.5)")
    ax.set_ylabel("PSNR vs. uncached samples (dB, capped at 80)")
    ax.set_title(f"{workload}: caching, pared artifacts (ORT)" + (" vs. diffusers hooks (eager)" if peers else ""))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
