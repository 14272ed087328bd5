"""Moving digits: two MNIST digits bouncing in a 32x32 frame, generated on the fly
from a seed (Moving MNIST, from the shipped digits of pared.workloads.data).

Each digit is a 16x16 MNIST image (the judge's size) whose top-left corner moves
on the integer grid [0, 16] x [0, 16] with a constant velocity, each component
in {-2, -1, 1, 2} px/frame, reflected elastically off the walls. The two digits
are composited with max (as Moving MNIST). Everything is a function of the seed:
`video(seed, frames)` gives the same clip every time.

    clip = video(seed, frames, split="train")   -> Clip(frames [T,1,32,32] in [0,1],
                                                        pos [T,2,2] (digit, (row, col)),
                                                        vel [T,2,2], labels [2], digits [2,1,16,16])
    batch(seeds, frames, split)                 -> frames [B,T,1,32,32] in [-1,1] (torch)

Splits: 'train' draws from the 4500 training digits, 'test' from the 500 held-out
ones (pared.workloads.data's split), so evaluation clips hold digits never seen.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAME = 32          # frame side, px
DIGIT = 16          # digit side, px (what the judge reads)
LIMIT = FRAME - DIGIT   # top-left corner coordinate range [0, LIMIT]
SPEEDS = (-2, -1, 1, 2)


@dataclass(frozen=True)
class Clip:
    frames: np.ndarray     # [T, 1, FRAME, FRAME] float32 in [0, 1]
    pos: np.ndarray        # [T, 2, 2] int64: per digit, the (row, col) of its top-left corner
    vel: np.ndarray        # [T, 2, 2] int64: the velocity that moved it into this frame (vel[0]: the initial one)
    labels: np.ndarray     # [2] int64
    digits: np.ndarray     # [2, 1, DIGIT, DIGIT] float32 in [0, 1]


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    from pared.workloads.data import mnist
    return mnist(split, DIGIT)


def step(pos: np.ndarray, vel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One frame of motion: move by vel, reflect off [0, LIMIT] (elastic: the overshoot
    folds back and that velocity component flips). Works on any [..., 2] int arrays."""
    p = pos + vel
    v = vel.copy()
    low, high = p < 0, p > LIMIT
    p = np.where(low, -p, p)
    p = np.where(high, 2 * LIMIT - p, p)
    v = np.where(low | high, -v, v)
    return p, v


def trajectory(pos0: np.ndarray, vel0: np.ndarray, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and velocities [frames, ...] from an initial state (pos[0] = pos0)."""
    pos, vel = [np.asarray(pos0)], [np.asarray(vel0)]
    for _ in range(frames - 1):
        p, v = step(pos[-1], vel[-1])
        pos.append(p)
        vel.append(v)
    return np.stack(pos), np.stack(vel)


def render(digits: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Frames [T, 1, FRAME, FRAME]: each digit pasted at its position, composited with max."""
    t = pos.shape[0]
    out = np.zeros((t, 1, FRAME, FRAME), np.float32)
    for i in range(t):
        for k in range(digits.shape[0]):
            r, c = (int(v) for v in pos[i, k])
            view = out[i, 0, r:r + DIGIT, c:c + DIGIT]
            np.maximum(view, digits[k, 0], out=view)
    return out


def video(seed: int, frames: int, split: str = "train") -> Clip:
    """The clip of `seed`: two distinct digits of `split`, random start and velocity."""
    x, y = _digits(split)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    idx = rng.choice(len(x), 2, replace=False)
    pos0 = rng.integers(0, LIMIT + 1, size=(2, 2))
    vel0 = rng.choice(np.array(SPEEDS), size=(2, 2))
    pos, vel = trajectory(pos0, vel0, frames)
    digits = x[idx]
    return Clip(render(digits, pos), pos.astype(np.int64), vel.astype(np.int64), y[idx].astype(np.int64), digits)


def batch(seeds, frames: int, split: str = "train"):
    """Clips of `seeds` as one torch tensor [B, T, 1, FRAME, FRAME] in [-1, 1]."""
    import torch
    return torch.from_numpy(np.stack([video(int(s), frames, split).frames for s in seeds]) * 2 - 1)
