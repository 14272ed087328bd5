"""Behaviour cloning of a larger diffusion action head on the shared, frozen backbone.

    python examples/vla_metaworld/train_large_head.py --minutes 60

The shipped head (3 DiT blocks, width 128, 8 action tokens) is small enough that a policy
call is overhead-bound on a CPU runtime: caching its steps removes FLOPs faster than time.
This head (4 blocks, width 256: about 5x the FLOPs per step) is trained with the same DDPM
epsilon loss on the frozen backbone's `cond` (computed once per training step for the
unshifted image and ``--aug`` shifted copies, as train_tokens.py does). The EMA of its
weights is saved alone (float32, compressed, 18.7 MB) as vla_diffusion_large_head.npz with the
backbone file's sha256; model.load_head_npz puts it on that backbone.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch
import torch.nn.functional as F

from model import VLAPolicy, count_params, file_sha256, load_policy, save_head_npz
from train import (DATA, add_training_args, chunk_index, frozen_copy, load_demos, optimizer_step,
                   split_episodes, warmup_cosine)
from train_tokens import backbone_conds

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock training budget (after the conds)")
    ap.add_argument("--backbone", default=os.path.join(HERE, "vla_diffusion.safetensors"))
    ap.add_argument("--out", default=os.path.join(HERE, "vla_diffusion_large_head.npz"))
    ap.add_argument("--d-head", type=int, default=256)
    ap.add_argument("--head-layers", type=int, default=4)
    ap.add_argument("--aug", type=int, default=3, help="shifted copies per step")
    ap.add_argument("--n-noise", type=int, default=4)
    add_training_args(ap, batch=64, lr=3e-4)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t_start = time.time()
    base, stats, _ = load_policy(args.backbone)
    cfg = dataclasses.replace(base.cfg, d_head=args.d_head, head_layers=args.head_layers)
    policy = VLAPolicy(cfg)
    policy.backbone.load_state_dict(base.backbone.state_dict())
    backbone = policy.backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    head = policy.head
    demos = load_demos(DATA)
    train_mask, _ = split_episodes(demos)
    train_idx = np.nonzero(train_mask)[0]
    chunks = torch.from_numpy(demos["actions"][chunk_index(demos, cfg.horizon)])
    print(f"computing backbone conds for {len(train_idx)} steps x {args.aug + 1} views", flush=True)
    with torch.no_grad():
        conds = backbone_conds(backbone, demos, stats, train_idx, cfg, args.aug, args.seed)
    cond_s = time.time() - t_start
    targets = chunks[torch.from_numpy(train_idx)]
    ema = frozen_copy(policy)
    print(f"head: {count_params(head)} params (shipped head: {count_params(base.head)}); conds took {cond_s:.0f} s",
          flush=True)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    ac = policy.alphas_cumprod
    sha = file_sha256(args.backbone)
    budget = args.minutes * 60.0
    t0 = time.time()
    last_save, running, step, losses = t0, None, 0, []

    def checkpoint(final=False):
        log = {"steps": step, "wall_s": time.time() - t0, "cond_s": cond_s, "final_loss_ema100": running,
               "loss_curve": losses, "settings": vars(args), "config": cfg.__dict__, "final": final}
        save_head_npz(args.out, ema, os.path.basename(args.backbone), sha,
                      extra={"train_log": {k: log[k] for k in ("steps", "wall_s", "cond_s", "loss_curve")}})
        with open(os.path.join(HERE, "train_large_head_log.json"), "w") as f:
            json.dump(log, f, indent=1)

    head.train()
    n = len(train_idx)
    while time.time() - t0 < budget:
        lr = warmup_cosine(args.lr, step, args.warmup, min((time.time() - t0) / budget, 1.0))
        i = torch.randint(0, n, (args.batch,), generator=gen)
        k = torch.randint(0, args.aug + 1, (args.batch,), generator=gen)
        cond = conds[k, i].repeat(args.n_noise, 1)
        x0 = targets[i].repeat(args.n_noise, 1, 1)
        t = torch.randint(0, cfg.train_timesteps, (len(x0),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = ac[t][:, None, None]
        loss = F.mse_loss(head(a.sqrt() * x0 + (1 - a).sqrt() * noise, t.float(), cond), noise)
        optimizer_step(opt, loss, head, ema.head, step, lr, args.ema)
        step += 1
        lv = loss.item()
        running = lv if running is None else 0.99 * running + 0.01 * lv
        if step % 100 == 0:
            losses.append([step, round(running, 5)])
            print(f"[{(time.time() - t0) / 60:6.1f} min] step {step:6d} loss {running:.4f} lr {lr:.2e} "
                  f"{step / (time.time() - t0):.2f} it/s", flush=True)
        if time.time() - last_save > args.save_every_min * 60:
            checkpoint()
            last_save = time.time()
    checkpoint(final=True)
    print(f"done: {step} steps in {(time.time() - t0) / 60:.1f} min (+{cond_s:.0f} s conds), "
          f"loss {running:.4f}; saved {args.out}", flush=True)


if __name__ == "__main__":
    main()
