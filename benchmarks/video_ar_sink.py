"""Does a video_ar checkpoint read its first frames? Each checkpoint rolls out the same held-out
clips (same noise) with the full cache, a uniform window of --budget frames and StreamingLLM's
sink + window (the 2 true context frames + the last --budget - 2), eagerly, measured per frame by
examples/video_ar/quality.py. A model whose rollouts lean on the true first frames scores better
with the sink than with the window once the window has let them go (past frame --budget); one that
does not read them scores alike. A screen for a training run (the head-aware policies' full
comparison is benchmarks/video_ar_kv.py).

    .venv/bin/python benchmarks/video_ar_sink.py [--weights A.safetensors,B.safetensors] [--clips 32]
        [--frames 32] [--budget 6]

Default: runs/deep8 (the best teacher-forced checkpoint), runs/anchor and runs/anchor3 (deep8 with
its last head's ALiBi slope 0, trained with degraded later context: train.py --anchor-heads 1
--degrade-frac 0.5, and --degrade-frac 0.75 --degrade-depth 3). Writes
benchmarks/results/video_ar_sink.json.
"""
from __future__ import annotations

import argparse
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pared.bench import write_results  # noqa: E402
from pared.workloads import example_module  # noqa: E402

DEFAULT = ",".join(os.path.join("examples", "video_ar", "runs", f"{n}.safetensors")
                   for n in ("deep8", "anchor", "anchor3"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=DEFAULT, help="comma-separated checkpoints (paths from the repository root)")
    ap.add_argument("--clips", type=int, default=32, help="held-out clips (test seeds 0..clips-1)")
    ap.add_argument("--frames", type=int, default=32, help="rollout length, context included")
    ap.add_argument("--budget", type=int, default=6, help="frames the window and sink + window keep")
    ap.add_argument("--steps", type=int, default=8, help="DDIM steps per frame")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "video_ar_sink.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    from pared.ir.kvcache import KVLayout, uniform_policy
    mdl, st, data, q = (example_module("video_ar"), example_module("video_ar", "stream.py"),
                        example_module("video_ar", "data.py"), example_module("video_ar", "quality.py"))
    k, tr = mdl.CONTEXT_FRAMES, mdl.TRAIN_FRAMES
    clips = [data.video(i, a.frames, "test") for i in range(a.clips)]
    context = (np.stack([c.frames[:k] for c in clips]) * 2 - 1).astype(np.float32)
    judge = example_module("judge").load_judge()
    spans = {f"frames {k}-{tr - 1}": (k, tr), f"frames {tr}-{2 * tr - 1}": (tr, 2 * tr),
             f"frames {2 * tr}-{a.frames - 1}": (2 * tr, a.frames)}
    arms = {"full": None, f"window {a.budget}": uniform_policy("window", a.budget),
            f"sink 2 + window {a.budget - 2}": uniform_policy("sink_window", a.budget, 2)}
    out = {}
    for path in a.weights.split(","):
        m = mdl.build_model(os.path.join(ROOT, path))
        res = {"anchor_heads": m.anchor_heads, "depth": m.depth}
        for name, pol in arms.items():
            t0 = time.perf_counter()
            s = (st.streamer(m, frames=a.frames) if pol is None
                 else st.streamer(m, layout=KVLayout.uniform(pol, m.depth, m.heads, mdl.TOKENS)))
            gen = st.rollout(st.torch_call(s), context, a.frames, steps=a.steps, seed=0, prev_frames=m.prev_frames)
            meas = q.measure((np.clip(gen, -1, 1) + 1) / 2, clips, judge)
            res[name] = {sp: {key: round(float(np.mean(meas[key][lo:hi])), 4) for key in ("identity", "velocity_error")}
                         for sp, (lo, hi) in spans.items() if hi > lo}
            res[name]["identity_per_frame"] = [round(float(x), 4) for x in meas["identity"]]
            res[name]["seconds"] = round(time.perf_counter() - t0, 1)
            print(path, name, {sp: v for sp, v in res[name].items() if sp.startswith("frames")}, flush=True)
        out[path] = res
    write_results(a.json, {"benchmark": "video_ar_sink", "clips": a.clips, "frames": a.frames, "budget_frames": a.budget,
                           "steps": a.steps, "split": "test (held-out digits)", "threads": 1, "checkpoints": out})
    print(f"wrote {a.json}", flush=True)


if __name__ == "__main__":
    main()
