"""Train the judge CNN on the 4500 training digits (16x16) with random shifts
of up to 2 pixels; report accuracy on the 500 held-out digits.

    python examples/judge/train.py        # 1 thread, about 3 minutes here
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def shift(x: torch.Tensor, rng: np.random.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation per image (zero fill)."""
    n, _, h, w = x.shape
    p = max_shift
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    dx, dy = rng.integers(0, 2 * p + 1, n), rng.integers(0, 2 * p + 1, n)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def main(epochs: int = 30, seed: int = 0) -> None:
    from safetensors.torch import save_file
    from pared.workloads.data import mnist
    from model import WEIGHTS, Judge, score

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    xtr, ytr = (torch.from_numpy(a) for a in mnist("train", 16))
    xte, yte = mnist("test", 16)
    model = Judge()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(xtr) // 64)
    lr_at = lambda s: 2e-3 * 0.5 * (1 + np.cos(np.pi * s / steps))
    t0, step = time.time(), 0
    for ep in range(epochs):
        model.train()
        perm = torch.from_numpy(rng.permutation(len(xtr)))
        for i in range(0, len(xtr) - 63, 64):
            idx = perm[i:i + 64]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = torch.nn.functional.cross_entropy(model(shift(xtr[idx], rng)), ytr[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        model.eval()
        s = score(xte, yte, model)
        print(f"epoch {ep + 1:3d}  {time.time() - t0:6.0f} s  loss {loss.item():.3f}  held-out acc {s['accuracy']:.4f}",
              flush=True)
    meta = {"held_out_accuracy": s["accuracy"], "epochs": epochs, "seed": seed,
            "minutes": round((time.time() - t0) / 60, 1)}
    tmp = WEIGHTS + ".tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp,
              metadata={k: str(v) for k, v in meta.items()})
    os.replace(tmp, WEIGHTS)
    with open(os.path.join(HERE, "train_log.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"done: {meta}")


if __name__ == "__main__":
    main()
