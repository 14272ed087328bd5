"""`make demo`: cache the trained class-conditional DiT across DDIM steps, ship it
as an ONNX Runtime artifact, sample digits with it in a process where torch
cannot be imported, and print speed and fidelity beside the uncached model.

    python examples/dit_cache_demo.py [--samples 100] [--pipeline examples/pipelines/dit_cache.yaml]
    python examples/dit_cache_demo.py --workload dit_moe_mnist      # `make demo-moe`: expert_cache

Writes artifacts/<pipeline>/ (the artifact) and artifacts/<pipeline>_samples.png
(the cached model's digits, one row per class; the uncached model's grid is
examples/<workload>/samples.png).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PIPELINES = {"dit_mnist": "dit_cache.yaml", "dit_moe_mnist": "dit_moe_cache.yaml"}

# run by pared.testing.run_torch_free: `import torch` fails in that process
TORCH_FREE = """
import json, sys, time
import numpy as np
import pared
from pared.workloads.samplers import NoiseSchedule, ddim_sample
a = json.loads({args!r})
ex = pared.load(a["artifact"])
imgs, counts, t0 = [], {{}}, time.perf_counter()
for j in range(a["batches"]):
    ex.reset()
    labels = (np.arange(j * a["batch"], (j + 1) * a["batch"]) % 10).astype(np.int64)
    imgs.append(ddim_sample(ex, (a["batch"], 1, a["size"], a["size"]), labels, schedule=NoiseSchedule.linear(),
                            steps=a["steps"], cfg_scale=a["cfg"], null_label=a["null"], seed=j))
    for r in ex.trace:
        counts[r] = counts.get(r, 0) + 1
np.save(a["out"], np.concatenate(imgs))
print(json.dumps({{"seconds": time.perf_counter() - t0, "routines": counts, "torch_imported": "torch" in sys.modules}}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--workload", default="dit_mnist", choices=sorted(PIPELINES))
    p.add_argument("--pipeline", help="default: dit_cache.yaml for dit_mnist, dit_moe_cache.yaml for dit_moe_mnist")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    a.pipeline = a.pipeline or os.path.join(HERE, "pipelines", PIPELINES[a.workload])
    stem = os.path.splitext(os.path.basename(a.pipeline))[0]

    import pared
    from pared.fidelity import side_by_side
    from pared.pipeline import build_passes, load_pipeline
    from pared.testing import run_torch_free
    from pared.workloads import DiTWorkload, example_module, torch_callable
    from rich.console import Console
    from rich.table import Table

    console = Console()
    torch.set_num_threads(1)
    wl = DiTWorkload(a.workload, batch=10, samples=a.samples)
    model = wl.build()
    spec = load_pipeline(a.pipeline)
    with console.status(f"optimizing {a.workload} with caching for target 'cpu'") as status:
        opt = pared.optimize(model, wl.example_inputs(), target=spec.target or "cpu", pipeline=build_passes(spec),
                             calibration=wl.calibration(), fidelity=spec.fidelity, bench_repeats=0,
                             progress=lambda m: status.update(m))
        path = opt.save(os.path.join(ROOT, "artifacts", stem))

        status.update(f"sampling {a.samples} digits from the artifact in a torch-free process")
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "samples.npy")
            mod = example_module(a.workload)
            args = json.dumps({"artifact": path, "out": out, "batches": a.samples // wl.batch, "batch": wl.batch,
                               "steps": wl.steps, "cfg": wl.cfg_scale, "null": mod.NULL_LABEL, "size": mod.SIZE})
            info = json.loads(run_torch_free(TORCH_FREE.format(args=args), timeout=1800).strip().splitlines()[-1])
            cached = np.load(out)

        status.update(f"sampling {a.samples} digits with the uncached eager model")
        eager = torch_callable(model)
        t0 = time.perf_counter()
        reference = wl.run(eager)
        eager_s = time.perf_counter() - t0
        fid = wl.fidelity(reference, cached)

        status.update("timing one batch: eager vs. the artifact, alternating")
        ex = pared.load(path, threads=1)
        sp = side_by_side({"eager": lambda: wl.task(eager), "artifact": lambda: wl.task(ex, ex.reset)},
                          repeats=a.repeats, warmup=1)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid = example_module("dit_mnist", "evaluate.py").grid
    png = os.path.join(ROOT, "artifacts", f"{stem}_samples.png")
    plt.imsave(png, grid(wl.to_pixels(cached), wl.all_labels(), per_class=min(10, a.samples // 10)),
               cmap="gray", vmin=0, vmax=1)

    t = Table(title=f"pared demo: {a.workload} (trained, DDIM-50, CFG 1.5) cached -> ONNX Runtime, CPU",
              show_header=False)
    t.add_row("pipeline", os.path.relpath(a.pipeline, os.getcwd()))
    t.add_row("artifact", f"{os.path.relpath(path, os.getcwd())} (graphs: {', '.join(opt.program.graphs)})")
    t.add_row("routines per run", ", ".join(f"{k} {v}" for k, v in info["routines"].items())
              + f"  (torch imported while sampling: {info['torch_imported']})")
    t.add_row(f"fidelity, {a.samples} samples", f"PSNR {fid['psnr_db']:.1f} dB vs. the uncached samples; judge accuracy "
                                                f"{fid['judge_acc_optimized']:.3f} (uncached {fid['judge_acc_reference']:.3f})")
    med = sp["median_s"]
    t.add_row("speed, one batch of 10", f"eager {med['eager'] * 1e3:.0f} ms, artifact {med['artifact'] * 1e3:.0f} ms "
                                        f"-> {med['eager'] / med['artifact']:.2f}x (median of {sp['repeats']}, "
                                        "alternating, 1 thread)")
    t.add_row("whole run", f"eager {eager_s:.1f} s, torch-free artifact {info['seconds']:.1f} s")
    t.add_row("grid", os.path.relpath(png, os.getcwd()) + f"  (uncached: examples/{a.workload}/samples.png)")
    console.print(t)


if __name__ == "__main__":
    main()
