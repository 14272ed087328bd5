"""Compare video_ar checkpoints on held-out clips, side by side in one run: the teacher-forced x0
error (at t = 1, as a share of an empty frame's error, and at t = 0.5) and a short rollout's
identity, velocity error and PSNR (full cache, DDIM 8 steps), the same clips and noise for each.

    .venv/bin/python benchmarks/video_ar_weights.py [--weights A.safetensors,B.safetensors] [--clips 16]

Default: the shipped weights, examples/video_ar/runs/stem8.safetensors (the overlapping-stem
run, not shipped), runs/stem8b.safetensors (80 more minutes of teacher forcing from stem8),
runs/prev2.safetensors (stem8b given its last 2 frames' pixels as inputs, 65 more minutes),
runs/prev2b.safetensors (36 more minutes from prev2), runs/prev2c.safetensors (100 more minutes
from prev2b, one thread), runs/prev2d.safetensors (90 more minutes from prev2c, one thread),
runs/digitw.safetensors (85 more minutes from prev2d with the digit pixels' loss weighted 5x),
runs/deep8.safetensors (prev2d grown to 8 blocks, the 2 new ones starting as identities, 95 more
minutes) and
runs/prev2_scratch.safetensors (that architecture from random weights, 60 minutes). Writes
benchmarks/results/video_ar_weights.json. A quick screen for a training run; the shipped model's
full figures are benchmarks/video_ar_quality.py's.
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

DEFAULT = ",".join(os.path.join("examples", "video_ar", f) for f in ("weights.safetensors", "runs/stem8.safetensors",
                                                                  "runs/stem8b.safetensors", "runs/prev2.safetensors",
                                                                  "runs/prev2b.safetensors", "runs/prev2c.safetensors",
                                                                  "runs/prev2d.safetensors", "runs/digitw.safetensors",
                                                                  "runs/deep8.safetensors",
                                                                  "runs/prev2_scratch.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=DEFAULT, help="comma-separated checkpoints (paths from the repository root)")
    ap.add_argument("--clips", type=int, default=16, help="held-out clips (test seeds 0..clips-1)")
    ap.add_argument("--frames", type=int, default=16, help="rollout length, context included")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "video_ar_weights.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    mdl, data, q = (example_module("video_ar"), example_module("video_ar", "data.py"),
                    example_module("video_ar", "quality.py"))
    train = mdl.TRAIN_FRAMES
    clips = [data.video(i, max(a.frames, train), "test") for i in range(a.clips)]
    truth = torch.from_numpy(np.stack([c.frames[:train] for c in clips]) * 2 - 1).float()
    empty = float(((truth[:, 1:] + 1) ** 2).mean())
    spans = {"frames 2-7": (2, train), f"frames {train}-{a.frames - 1}": (train, a.frames)}
    out = {}
    for path in a.weights.split(","):
        t0 = time.perf_counter()
        m = mdl.build_model(os.path.join(ROOT, path))
        g = torch.Generator().manual_seed(0)
        tf = {}
        with torch.no_grad():
            for tv in (1.0, 0.5):
                t_clean = torch.full((a.clips, train - 1), mdl.CTX_T)
                t_noisy = torch.full((a.clips, train - 1), tv)
                ac, sc = mdl.alpha_sigma(t_clean[..., None, None, None])
                an, sn = mdl.alpha_sigma(t_noisy[..., None, None, None])
                clean = ac * truth[:, :-1] + sc * torch.randn(truth[:, :-1].shape, generator=g)
                noisy = an * truth[:, 1:] + sn * torch.randn(truth[:, 1:].shape, generator=g)
                pred = m.sequence(clean, t_clean, noisy, t_noisy, torch.arange(1, train))
                tf[tv] = float(((pred - truth[:, 1:]) ** 2).mean())
        ctx = truth[:, :mdl.CONTEXT_FRAMES]
        gen = mdl.rollout(m, ctx, a.frames, steps=8).numpy()
        meas = q.measure((np.clip(gen, -1, 1) + 1) / 2, [c for c in clips])
        out[path] = {
            "stem": m.stem,
            "prev_frames": m.prev_frames,
            "teacher_forced_mse_t1_vs_empty_frame": round(tf[1.0] / empty, 4),
            "teacher_forced_mse_t05": round(tf[0.5], 5),
            "rollout": {name: {k: round(float(np.mean(meas[k][lo:hi])), 4)
                               for k in ("identity", "velocity_error", "psnr_db")} for name, (lo, hi) in spans.items()},
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(path, out[path], flush=True)
    write_results(a.json, {"benchmark": "video_ar_weights", "clips": a.clips, "frames": a.frames, "steps": 8,
                           "split": "test (held-out digits)", "threads": 1, "checkpoints": out})
    print(f"wrote {a.json}", flush=True)


if __name__ == "__main__":
    main()
