"""Quality of video_ar rollouts, per frame position: do the digits keep their
identity, and do they move as the bouncing physics says?

The clips come from data.video(seed, frames, 'test') (held-out digits); the model
gets the first CONTEXT_FRAMES ground-truth frames and generates the rest. Since
the physics is deterministic, every generated frame has a known true frame.

- tracker: analysis by synthesis. Both digits start at their true positions in
  frame 0; each next frame is explained by rendering the two digit images at
  positions within +-SEARCH px of the previous ones (least squared error). It
  never looks at the physics after frame 0. (Blob centroids merge whenever the
  two digits overlap, which in a 32x32 frame is most of the time.)
- identity: the judge (examples/judge) classifies the 16x16 crop at the tracked
  position (`identity`) and at the true position (`identity_at_physics`, which
  also fails when the digit is in the wrong place); accuracy vs the true labels.
- motion: velocity error, the L2 distance (px/frame) between the tracked
  displacement and the true one; `position_error` likewise for positions.
- psnr_db: of the generated frame vs the true frame ([0, 1] range).

Ground-truth clips run through the same measures give the ceiling (overlapping
digits cost the judge some accuracy even on true frames).

    evaluate(model, seeds, frames, steps=8, window=None) -> {"per_frame": {...}, ...}
"""
from __future__ import annotations

import time

import numpy as np
import torch

SEARCH = 4          # px; the fastest digit moves 2 px per axis per frame
INK = 0.2           # a pixel of a digit image above this is ink


def track(frames: np.ndarray, digits: np.ndarray, pos0: np.ndarray, sweeps: int = 2) -> np.ndarray:
    """Positions [T, 2, 2] of the two digits in frames [T, 1, 32, 32] (in [0, 1]).

    Analysis by synthesis: frame i is explained by rendering both digit images
    (max-composited, as the data is drawn) at candidate positions within +-SEARCH of
    frame i-1's; coordinate descent over the two digits (`sweeps` rounds) picks the
    pair with the least squared error."""
    from pared.workloads import example_module
    data = example_module("video_ar", "data.py")
    d, lim = data.DIGIT, data.LIMIT
    t = frames.shape[0]
    out = np.zeros((t, 2, 2), np.int64)
    out[0] = pos0

    def paste(k: int, r: int, c: int) -> np.ndarray:
        img = np.zeros((data.FRAME, data.FRAME), np.float32)
        img[r:r + d, c:c + d] = digits[k, 0]
        return img

    for i in range(1, t):
        cur = out[i - 1].copy()
        for _ in range(sweeps):
            for k in range(2):
                other = paste(1 - k, *cur[1 - k])
                pr, pc = out[i - 1, k]
                cands = [(r, c) for r in range(max(0, pr - SEARCH), min(lim, pr + SEARCH) + 1)
                         for c in range(max(0, pc - SEARCH), min(lim, pc + SEARCH) + 1)]
                renders = np.stack([np.maximum(other, paste(k, r, c)) for r, c in cands])
                err = ((renders - frames[i, 0][None]) ** 2).sum(axis=(1, 2))
                cur[k] = cands[int(np.argmin(err))]
        out[i] = cur
    return out


def crops(frames: np.ndarray, pos: np.ndarray, digits: np.ndarray | None = None) -> np.ndarray:
    """[T, 2, 1, 16, 16] crops of frames [T, 1, 32, 32] at positions [T, 2, 2]. With
    `digits` ([2, 1, 16, 16]), the pixels where the *other* digit's image (placed at
    its position) has ink are blanked, so the judge reads one digit, not the overlap."""
    d = 16
    out = np.stack([np.stack([frames[i, :, r:r + d, c:c + d] for r, c in pos[i]]) for i in range(len(frames))])
    if digits is None:
        return out
    out = out.copy()
    for i in range(len(frames)):
        for k in range(2):
            (r, c), (ro, co) = pos[i, k], pos[i, 1 - k]
            other = np.zeros(frames.shape[-2:], np.float32)
            other[ro:ro + d, co:co + d] = digits[1 - k, 0]
            out[i, k, 0][other[r:r + d, c:c + d] > INK] = 0.0
    return out


def measure(gen: np.ndarray, clips: list, judge=None) -> dict:
    """Per-frame measures of generated clips gen [B, T, 1, 32, 32] (in [0, 1]) against
    the true clips (data.Clip). Lists of length T (frame 0's velocity error is 0 by
    construction of the tracker)."""
    from pared.workloads import example_module
    judge_mod = example_module("judge")
    judge = judge or judge_mod.load_judge()
    b, t = gen.shape[:2]
    tracked = np.stack([track(gen[i], clips[i].digits, clips[i].pos[0]) for i in range(b)])   # [B, T, 2, 2]
    true = np.stack([c.pos[:t] for c in clips])
    labels = np.stack([c.labels for c in clips])                                              # [B, 2]

    def accuracy(pos: np.ndarray, masked: bool = True) -> np.ndarray:
        x = np.stack([crops(gen[i], pos[i], clips[i].digits if masked else None)
                      for i in range(b)]).reshape(-1, 1, 16, 16)
        with torch.inference_mode():
            pred = torch.cat([judge(torch.from_numpy(x[j:j + 512])).argmax(-1)
                              for j in range(0, len(x), 512)]).numpy().reshape(b, t, 2)
        return (pred == labels[:, None, :]).mean(axis=(0, 2))

    d_tr = np.diff(tracked, axis=1, prepend=tracked[:, :1])
    d_true = np.diff(true, axis=1, prepend=true[:, :1])
    vel_err = np.linalg.norm(d_tr - d_true, axis=-1)                     # [B, T, 2]
    pos_err = np.linalg.norm(tracked - true, axis=-1)
    truth = np.stack([c.frames[:t] for c in clips])
    mse = ((gen - truth) ** 2).mean(axis=(2, 3, 4))
    r = lambda a: [round(float(v), 4) for v in a]
    return {"identity": r(accuracy(tracked)), "identity_at_physics": r(accuracy(true)),
            "identity_unmasked": r(accuracy(tracked, masked=False)),
            "velocity_error": r(vel_err.mean(axis=(0, 2))), "velocity_exact": r((vel_err == 0).mean(axis=(0, 2))),
            "position_error": r(pos_err.mean(axis=(0, 2))),
            "psnr_db": r(10 * np.log10(1.0 / np.maximum(mse.mean(0), 1e-10)))}


def evaluate(model, seeds, frames: int, *, steps: int = 8, window: int | None = None, split: str = "test",
             sample_seed: int = 0, judge=None) -> dict:
    """Roll the model out on the clips of `seeds` and measure it; also measure the true clips."""
    from pared.workloads import example_module
    data = example_module("video_ar", "data.py")
    mdl = example_module("video_ar")
    clips = [data.video(int(s), frames, split) for s in seeds]
    x = torch.from_numpy(np.stack([c.frames for c in clips]) * 2 - 1)
    t0 = time.perf_counter()
    gen = mdl.rollout(model, x[:, :mdl.CONTEXT_FRAMES], frames, steps=steps, window=window, seed=sample_seed)
    sec = time.perf_counter() - t0
    gen = ((gen.clamp(-1, 1) + 1) / 2).numpy()
    return {"generated": measure(gen, clips, judge), "ground_truth": measure(np.stack([c.frames for c in clips]),
                                                                             clips, judge), "frames": gen,
            "rollout_seconds": sec}
