"""Train vit_mnist on the 4500 training digits (28x28): random affine
augmentation (rotation +-12 deg, scale 0.9-1.1, shift +-3 px), AdamW + cosine
schedule, label smoothing, and distillation from the judge CNN (DeiT-style
soft targets, T = 2; a ViT alone on 4500 digits plateaued at 0.956 here);
reports accuracy on the 500 held-out digits.

    python examples/vit_mnist/train.py --epochs 100    # what shipped: 1 thread, see train_log.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _judge():
    import importlib.util
    spec = importlib.util.spec_from_file_location("judge_model", os.path.join(os.path.dirname(HERE), "judge", "model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.load_judge()


def affine(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random rotation, scale and shift per image (zero fill, bilinear)."""
    n = x.shape[0]
    ang = np.deg2rad(rng.uniform(-12, 12, n))
    sc = rng.uniform(0.9, 1.1, n)
    sh = rng.uniform(-3, 3, (n, 2)) * 2 / x.shape[-1]
    theta = np.zeros((n, 2, 3), np.float32)
    theta[:, 0, 0], theta[:, 0, 1] = np.cos(ang) / sc, -np.sin(ang) / sc
    theta[:, 1, 0], theta[:, 1, 1] = np.sin(ang) / sc, np.cos(ang) / sc
    theta[:, :, 2] = sh
    grid = torch.nn.functional.affine_grid(torch.from_numpy(theta), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, align_corners=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    from safetensors.torch import save_file
    from pared.workloads.data import mnist
    from model import WEIGHTS, ViTClassifier
    teacher = _judge()

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(a.seed)
    xtr, ytr = (torch.from_numpy(v) for v in mnist("train", 28))
    xte, yte = (torch.from_numpy(v) for v in mnist("test", 28))
    model = ViTClassifier()
    peak, bs = 2e-3, 64
    opt = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=0.05)
    steps, warm = a.epochs * (len(xtr) // bs), 300
    t0, step = time.time(), 0
    for ep in range(a.epochs):
        model.train()
        perm = torch.from_numpy(rng.permutation(len(xtr)))
        for i in range(0, len(xtr) - bs + 1, bs):
            idx = perm[i:i + bs]
            lr = peak * min(1.0, (step + 1) / warm) * 0.5 * (1 + np.cos(np.pi * step / steps))
            for g in opt.param_groups:
                g["lr"] = lr
            xb = affine(xtr[idx], rng)
            logits = model(xb)
            with torch.no_grad():
                soft = (teacher(torch.nn.functional.interpolate(xb, size=16, mode="area")) / 2.0).softmax(-1)
            kd = torch.nn.functional.kl_div((logits / 2.0).log_softmax(-1), soft, reduction="batchmean") * 4.0
            loss = 0.5 * torch.nn.functional.cross_entropy(logits, ytr[idx], label_smoothing=0.1) + 0.5 * kd
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
        model.eval()
        with torch.inference_mode():
            acc = float((model(xte).argmax(-1) == yte).float().mean())
        print(f"epoch {ep + 1:3d}  {time.time() - t0:6.0f} s  loss {loss.item():.3f}  held-out acc {acc:.4f}", flush=True)
    meta = {"held_out_accuracy": acc, "epochs": a.epochs, "seed": a.seed, "threads": a.threads,
            "minutes": round((time.time() - t0) / 60, 1),
            "params": sum(p.numel() for p in model.parameters())}
    tmp = WEIGHTS + ".tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp,
              metadata={k: str(v) for k, v in meta.items()})
    os.replace(tmp, WEIGHTS)
    with open(os.path.join(HERE, "train_log.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"done: {meta}")


if __name__ == "__main__":
    main()
