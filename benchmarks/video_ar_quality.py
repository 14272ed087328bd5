"""Long-rollout quality of video_ar (examples/video_ar), per frame position: identity
(the judge on each digit's crop) and motion consistency (a tracker against the
bouncing physics), for rollouts 4-8x the training length, held-out digits, fixed seeds.

    .venv/bin/python benchmarks/video_ar_quality.py [--clips 32] [--frames 64] [--steps 8] [--windows 0,7]

Each clip starts from CONTEXT_FRAMES (2) ground-truth frames; the model generates
the rest, DDIM with --steps steps per frame, its K/V cache holding every earlier
frame (window 0) or the last W frames (window W, a FIFO). The same measures on the
true clips give the ceiling. Measures are defined in examples/video_ar/quality.py.
Writes benchmarks/results/video_ar_quality.json (per-frame lists and means over
frame ranges: within the training length, up to 4x, 4x to 8x), and with --plot a
PNG of the curves and examples/video_ar/samples.png (generated over true frames).
"""
from __future__ import annotations

import argparse
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pared.bench import write_results  # noqa: E402
from pared.workloads import example_module  # noqa: E402

MEASURES = ("identity", "identity_at_physics", "identity_unmasked", "velocity_error", "velocity_exact",
            "position_error", "psnr_db")


def ranges(train: int, frames: int, context: int) -> dict:
    out = {f"frames {context}-{train - 1} (in training length)": (context, train)}
    if frames > train:
        out[f"frames {train}-{min(frames, 4 * train) - 1} (up to 4x)"] = (train, min(frames, 4 * train))
    if frames > 4 * train:
        out[f"frames {4 * train}-{frames - 1} (4x to {frames / train:g}x)"] = (4 * train, frames)
    return out


def summarize(per_frame: dict, spans: dict) -> dict:
    return {name: {k: round(float(np.mean(v[a:b])), 4) for k, v in per_frame.items()} for name, (a, b) in spans.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=32, help="held-out clips (seeds 0..clips-1 of split 'test')")
    ap.add_argument("--frames", type=int, default=64, help="rollout length, context included")
    ap.add_argument("--steps", type=int, default=8, help="DDIM steps per frame")
    ap.add_argument("--windows", default="0,7", help="KV windows in frames to compare; 0 is the full cache")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "video_ar_quality.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    mdl = example_module("video_ar")
    q = example_module("video_ar", "quality.py")
    model = mdl.build_model()
    from safetensors import safe_open
    with safe_open(mdl.WEIGHTS, "pt") as f:
        weights_meta = dict(f.metadata() or {})
    seeds = list(range(a.clips))
    spans = ranges(mdl.TRAIN_FRAMES, a.frames, mdl.CONTEXT_FRAMES)
    results, frames_of = {}, {}
    truth = None
    for w in (int(v) for v in a.windows.split(",")):
        name = "full" if w == 0 else f"window_{w}"
        t0 = time.time()
        r = q.evaluate(model, seeds, a.frames, steps=a.steps, window=w or None)
        sec = time.time() - t0
        truth = r["ground_truth"]
        frames_of[name] = r["frames"]
        results[name] = {"per_frame": r["generated"], "summary": summarize(r["generated"], spans),
                         "seconds": round(sec, 1),
                         "ms_per_frame": round(1000 * r["rollout_seconds"] / (a.frames - mdl.CONTEXT_FRAMES), 1)}
        s = results[name]["summary"]
        print(f"{name}: {sec:.0f} s", flush=True)
        for span, v in s.items():
            print(f"  {span}: identity {v['identity']:.3f}  velocity error {v['velocity_error']:.3f} px/frame  "
                  f"psnr {v['psnr_db']:.1f} dB", flush=True)
    truth = {k: v for k, v in truth.items() if k != "psnr_db"}
    data = {
        "workload": "video_ar", "weights": weights_meta, "split": "test (held-out digits)", "seeds": seeds,
        "train_frames": mdl.TRAIN_FRAMES, "context_frames": mdl.CONTEXT_FRAMES, "rollout_frames": a.frames,
        "ddim_steps": a.steps, "timing": "seconds: rollout of all clips as one batch plus the measures; "
                                          "ms_per_frame: the rollout alone over the generated frames "
                                          "(eager, CPU, the whole batch per frame)", "ctx_t": mdl.CTX_T, "threads": a.threads,
        "measures": {
            "identity": "judge accuracy on the 16x16 crop at the tracked position, other digit's ink blanked",
            "identity_at_physics": "the same at the true (physics) position",
            "identity_unmasked": "judge accuracy on the raw crop at the tracked position",
            "velocity_error": "mean L2 (px/frame) between tracked and true displacement",
            "velocity_exact": "share of digits whose tracked displacement equals the true one",
            "position_error": "mean L2 (px) between tracked and true position",
            "psnr_db": "PSNR of the generated frame vs the true frame, over the clips' mean MSE",
        },
        "ground_truth": {"per_frame": truth, "summary": summarize(truth, spans)},
        "policies": results,
    }
    write_results(a.json, data)
    print(f"wrote {a.json}")
    if a.plot:
        plot(data, frames_of, os.path.splitext(a.json)[0] + ".png")


def plot(data: dict, frames_of: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for name, r in [("ground truth", data["ground_truth"])] + list(data["policies"].items()):
        for i, k in enumerate(("identity", "velocity_error", "psnr_db")):
            if k in r["per_frame"]:
                ax[i].plot(r["per_frame"][k], label=name)
    for i, k in enumerate(("identity (judge, tracked crop)", "velocity error (px/frame)", "PSNR vs truth (dB)")):
        ax[i].set_title(k)
        ax[i].set_xlabel("frame")
        ax[i].axvline(data["train_frames"] - 0.5, color="gray", ls=":")
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    # a strip of the first clips: generated (full cache) above the true frames, every 4th frame
    data_mod = example_module("video_ar", "data.py")
    gen = frames_of.get("full", next(iter(frames_of.values())))
    rows = []
    for i in range(min(3, len(gen))):
        true = data_mod.video(data["seeds"][i], gen.shape[1], "test").frames
        for src in (gen[i], true):
            rows.append(np.concatenate([np.pad(src[j, 0], 1, constant_values=0.5) for j in range(0, gen.shape[1], 4)], 1))
    plt.imsave(os.path.join(os.path.dirname(example_module("video_ar").__file__), "samples.png"),
               np.concatenate(rows, 0), cmap="gray", vmin=0, vmax=1)


if __name__ == "__main__":
    main()
