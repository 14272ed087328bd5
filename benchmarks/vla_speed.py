"""Per-call latency of the Meta-World VLA policy, eager vs. its plain ORT artifact, both heads,
alternated in one process (REVIEW §8.3: the earlier 2.90x came from an eager time taken under load).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/vla_speed.py [--repeats 25] [--threads 1]

One policy call is one batch-1 observation -> action chunk (diffusion head: backbone + 10 DDIM
steps unrolled; token head: backbone + 16 greedy decoding steps). Each round calls eager PyTorch
(inference mode) and the artifact once on the same held-out demonstration observation (the
observations cycle over 8 held-out steps), in rotating order; medians over rounds. Checks the
artifact's chunk against eager's on those observations. Writes benchmarks/results/vla_speed.json;
run it on a quiet machine (the host's load average is recorded before and after).
"""
from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pared  # noqa: E402
from pared.backends.executor import Executor  # noqa: E402
from pared.bench import write_results  # noqa: E402
from pared.fidelity import side_by_side  # noqa: E402
from pared.workloads import get_workload, torch_callable  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "vla_speed.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = {"what": "one VLA policy call (batch 1), eager PyTorch (inference mode) vs. the plain ORT artifact, "
                   "alternating rounds, median", "threads": a.threads, "repeats": a.repeats,
           "load_average_before": os.getloadavg(), "heads": {}}
    for head in ("diffusion", "tokens"):
        w = get_workload("vla_metaworld", head=head)
        model = w.build()
        example = w.example_inputs()
        with tempfile.TemporaryDirectory() as tmp:
            print(f"{head}: building the plain artifact", flush=True)
            opt = pared.optimize(model, example, target="cpu", pipeline=[], bench_repeats=0)
            art = Executor(opt.save(os.path.join(tmp, head)), threads=a.threads)
            obs = [w._demo_inputs(int(i)) for i in w.heldout_steps(8)]
            eager_fn = torch_callable(model)
            diff = max(float(np.max(np.abs(np.asarray(eager_fn(*x)) - np.asarray(art(*x))))) for x in obs)
            k = {"eager": 0, "artifact": 0}

            def runner(name, fn):
                def call():
                    fn(*obs[k[name] % len(obs)])
                    k[name] += 1
                return call
            print(f"{head}: timing, {a.repeats} alternating rounds", flush=True)
            timing = side_by_side({"eager": runner("eager", eager_fn), "artifact": runner("artifact", art)},
                                  repeats=a.repeats, warmup=3)
        med = timing["median_s"]
        out["heads"][head] = {"median_ms": {n: round(v * 1e3, 3) for n, v in med.items()},
                              "min_ms": {n: round(v * 1e3, 3) for n, v in timing["min_s"].items()},
                              "artifact_vs_eager": med["eager"] / med["artifact"],
                              "action_max_abs_diff": diff}
        print(head, out["heads"][head], flush=True)
    out["load_average_after"] = os.getloadavg()
    write_results(a.json, out)


if __name__ == "__main__":
    main()
