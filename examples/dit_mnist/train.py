"""Train dit_mnist: DDPM (linear schedule, 1000 steps, epsilon MSE) on the 4500
training digits of pared.workloads.data.mnist at 16x16, EMA of the weights, labels
dropped to the null class 10% of the time (for classifier-free guidance).

    python examples/dit_mnist/train.py --steps 407       # the shipped weights: three segments,
    python examples/dit_mnist/train.py --steps 1910 --init examples/dit_mnist/weights.safetensors
    python examples/dit_mnist/train.py --steps 891 --lr 3e-4 --init examples/dit_mnist/weights.safetensors

(they were trained by time, 15 + 72 + 25 min on 1 thread here; their step counts are in
train_log.json). Every segment restarts the seed, the optimizer and its warmup.
Deterministic for a given seed, thread count and torch build in principle; the
replay has not been checked bit for bit against the shipped file. Writes the EMA weights
(atomically, every few minutes and at the end) to weights.safetensors beside
this file, and a log of the loss to train_log.json.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

from pared.workloads.training import (Progress, atomic_save, ema_update, load_init, optimizer_step, start,
                                      write_train_log)

HERE = os.path.dirname(os.path.abspath(__file__))


def disable_builtin_label_dropout(model: torch.nn.Module) -> None:
    """diffusers gives every DiT block its own label embedder, each dropping labels
    on its own draw; a model trained that way never sees a fully unconditional
    input. Labels are dropped once per sample in the loop instead."""
    for m in model.modules():
        if hasattr(m, "dropout_prob") and hasattr(m, "embedding_table"):
            m.dropout_prob = 0.0


def train(model: torch.nn.Module, out_path: str, *, minutes: float, batch: int = 128, lr: float = 4e-4,
          ema_decay: float = 0.999, null_label: int = 10, p_uncond: float = 0.1, seed: int = 0,
          threads: int = 1, aux_loss=None, save_every_min: float = 5.0, init: str | None = None,
          steps: int | None = None) -> dict:
    """Train `model` for `minutes`, or exactly `steps` optimizer steps when given; `init`:
    continue from saved EMA weights (a fresh optimizer with a new warmup; the log records
    the chain)."""
    from pared.workloads.data import mnist
    from pared.workloads.samplers import NoiseSchedule

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    x_all, y_all = mnist("train", 16)
    x_all = torch.from_numpy(x_all * 2 - 1)
    y_all = torch.from_numpy(y_all)
    sched = NoiseSchedule.linear(1000)
    abar = torch.from_numpy(sched.alphas_cumprod).float()

    previous = load_init(model, init)
    disable_builtin_label_dropout(model)
    ema, opt, n_params = start(model, lr)
    print(f"training {n_params / 1e6:.2f}M parameters for {f'{steps} steps' if steps is not None else f'{minutes} min'}, "
          f"batch {batch}, {threads} thread(s)", flush=True)
    t0, step = time.time(), 0
    progress = Progress(out_path, every=50, smoothing=0.02, save_every_min=save_every_min)
    while True:
        elapsed = time.time() - t0
        if (step >= steps) if steps is not None else (elapsed > minutes * 60):
            break
        idx = torch.from_numpy(rng.integers(0, len(x_all), batch))
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.from_numpy(rng.random(batch) < p_uncond)] = null_label
        t = torch.from_numpy(rng.integers(0, 1000, batch))
        noise = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        warm = min(1.0, (step + 1) / 200)
        for g in opt.param_groups:
            g["lr"] = lr * warm
        pred = model(xt, t.float(), y)
        loss = torch.nn.functional.mse_loss(pred, noise)
        total = loss + (aux_loss(model) if aux_loss is not None else 0.0)
        optimizer_step(opt, model, total)
        ema_update(ema, model, step, ema_decay)
        step += 1
        progress.after(step, loss.item(), elapsed, ema)
    meta = {"step": step, "minutes": round((time.time() - t0) / 60, 1), "final_loss": round(progress.loss, 5),
            "params": n_params, "batch": batch, "threads": threads, "seed": seed, "lr": lr, "ema_decay": ema_decay}
    if previous:
        meta["continued_from"] = previous
    atomic_save(ema, out_path, meta)
    log_path = os.path.splitext(out_path)[0].replace("weights", "train_log") + ".json"
    write_train_log(log_path, meta, progress.log, continued=bool(init))
    print(f"done: {meta}", flush=True)
    return meta


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=75.0)
    p.add_argument("--steps", type=int, help="stop after this many steps (instead of --minutes)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=4e-4, help="peak learning rate (after a 200-step warmup)")
    p.add_argument("--out", default=os.path.join(HERE, "weights.safetensors"))
    p.add_argument("--init", help="continue from these EMA weights (e.g. the shipped ones)")
    a = p.parse_args()
    sys.path.insert(0, HERE)
    from model import EpsModel
    torch.manual_seed(a.seed)
    train(EpsModel(), a.out, minutes=a.minutes, batch=a.batch, lr=a.lr, seed=a.seed, threads=a.threads,
          init=a.init, steps=a.steps)


if __name__ == "__main__":
    main()
