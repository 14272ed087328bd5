"""Does sharing one ONNX Runtime activation arena per process (pared's default since stop 27)
change the speed of pared's artifacts? Each artifact is loaded twice in one process, with the
shared arena and with an arena per session (`Executor(shared_arena=False)`: ORT's default, and
pared's before), and the workload's own task is timed with both, alternating, one thread.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/arena_ab.py [--repeats 9]

Artifacts: dit_mnist with dit_cache.yaml (taylor_cache: three variant sessions) and
dit_full.yaml (4 timestep buckets x taylor_cache: twelve sessions), vit_mnist with vit_tome.yaml,
minilm with minilm_int8.yaml, and the plain lowering of each. Same artifact, same data, same
thread count in both arms; only the arena differs. Writes benchmarks/results/arena_ab.json.
"""
from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))

import torch  # noqa: E402

import pared  # noqa: E402
from pared.backends.executor import Executor  # noqa: E402
from pared.bench import write_results  # noqa: E402
from pared.fidelity import side_by_side  # noqa: E402
from pared.pipeline import build_passes, load_pipeline  # noqa: E402
from pared.workloads import EXAMPLES, get_workload  # noqa: E402

#: (workload, pipeline file or None for the plain lowering)
ARTIFACTS = (("dit_mnist", None), ("dit_mnist", "dit_cache.yaml"), ("dit_mnist", "dit_full.yaml"),
             ("vit_mnist", None), ("vit_mnist", "vit_tome.yaml"), ("minilm", None), ("minilm", "minilm_int8.yaml"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "arena_ab.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, file in ARTIFACTS:
            label = f"{name}/{file or 'plain'}"
            wl = get_workload(name)
            model, example, calib = wl.build(), wl.example_inputs(), wl.calibration()
            if file:
                spec = load_pipeline(os.path.join(EXAMPLES, "pipelines", file))
                target, passes = spec.target, build_passes(spec)
            else:
                target, passes = "cpu", []
            print(f"building {label}", flush=True)
            opt = pared.optimize(model, example, target=target, pipeline=passes, calibration=calib, bench_repeats=0,
                                 allow_fidelity_loss=True, holdout=[])
            path = opt.save(os.path.join(tmp, label.replace("/", "_")))
            arms = {"shared_arena": Executor(path, threads=1), "own_arenas": Executor(path, threads=1,
                                                                                      shared_arena=False)}
            runs = {k: (lambda ex=ex: wl.task(ex, ex.reset)) for k, ex in arms.items()}
            print(f"timing {label}: {a.repeats} alternating rounds", flush=True)
            timing = side_by_side(runs, repeats=a.repeats, warmup=1)
            med = timing["median_s"]
            rows[label] = {"sessions": len(opt.program.graphs), "median_ms": {k: v * 1e3 for k, v in med.items()},
                           "own_over_shared": med["own_arenas"] / med["shared_arena"], "timing": timing}
            print(f"{label}: shared {med['shared_arena'] * 1e3:.1f} ms, own arenas {med['own_arenas'] * 1e3:.1f} ms "
                  f"({rows[label]['own_over_shared']:.3f}x)", flush=True)
    write_results(a.json, {"what": "one ORT activation arena per process vs one per session, the same artifact "
                                   "loaded twice, the workload's task alternating, 1 thread",
                           "repeats": a.repeats, "artifacts": rows})


if __name__ == "__main__":
    main()
