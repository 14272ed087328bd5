"""Behaviour cloning of the autoregressive action-token head (OpenVLA style)
on the shared, frozen backbone of the diffusion policy.

    python examples/vla_metaworld/train_tokens.py --minutes 40

The diffusion policy's backbone (vla_diffusion.safetensors) is frozen: its
readout `cond` already carries what the diffusion head acts on.  The script
computes `cond` once for every training step, for the unshifted image and
``--aug`` randomly shifted copies (the diffusion training's augmentation), then
trains `TokenActionHead` with cross-entropy on the expert's next H=4 actions,
each dimension discretized into 256 bins (teacher forcing).  The EMA of the
weights is saved to vla_tokens.safetensors with the backbone file's sha256.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch

from model import (TokenActionHead, TokenHeadConfig, count_params, file_sha256, load_policy,
                   save_token_head, tokenize)
from train import (DATA, add_training_args, chunk_index, frozen_copy, load_demos, optimizer_step, random_shift,
                   split_episodes, warmup_cosine)

HERE = os.path.dirname(os.path.abspath(__file__))


@torch.no_grad()
def backbone_conds(backbone, demos, stats, idx, cfg, aug: int, seed: int, batch: int = 256) -> torch.Tensor:
    """(aug + 1, len(idx), d) cond of the frozen backbone: copy 0 unshifted,
    copies 1.. randomly shifted by up to 4 pixels."""
    gen = torch.Generator().manual_seed(seed)
    text = np.stack([tokenize(s, cfg.text_len) for s in demos["instructions"]])
    out = torch.empty(aug + 1, len(idx), cfg.d_model)
    t0 = time.time()
    for s in range(0, len(idx), batch):
        b = idx[s:s + batch]
        img = torch.from_numpy(demos["images"][b]).permute(0, 3, 1, 2).float() / 255.0
        st = torch.from_numpy((demos["states"][b] - stats["state_mean"]) / stats["state_std"]).float()
        txt = torch.from_numpy(text[demos["task_id"][b]])
        for k in range(aug + 1):
            x = img if k == 0 else random_shift(img, 4, gen)
            out[k, s:s + len(b)] = backbone(x, txt, st)
        if (s // batch) % 10 == 0:
            print(f"  cond {s + len(b)}/{len(idx)} ({time.time() - t0:.0f} s)", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=40.0, help="wall-clock training budget (after the conds)")
    ap.add_argument("--backbone", default=os.path.join(HERE, "vla_diffusion.safetensors"))
    ap.add_argument("--out", default=os.path.join(HERE, "vla_tokens.safetensors"))
    ap.add_argument("--aug", type=int, default=3, help="shifted copies per step")
    ap.add_argument("--smoothing", type=float, default=0.0)
    add_training_args(ap, batch=128, lr=5e-4)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t_start = time.time()

    policy, stats, _ = load_policy(args.backbone)
    backbone = policy.backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    demos = load_demos(DATA)
    train_mask, hold_mask = split_episodes(demos)
    train_idx = np.nonzero(train_mask)[0]
    hcfg = TokenHeadConfig(d_model=policy.cfg.d_model, action_dim=policy.cfg.action_dim)
    chunks = torch.from_numpy(demos["actions"][chunk_index(demos, hcfg.horizon)])      # (N,H,4)
    print(f"computing backbone conds for {len(train_idx)} steps x {args.aug + 1} views", flush=True)
    conds = backbone_conds(backbone, demos, stats, train_idx, policy.cfg, args.aug, args.seed)
    cond_s = time.time() - t_start
    targets = chunks[torch.from_numpy(train_idx)]

    head = TokenActionHead(hcfg)
    ema = frozen_copy(head)
    print(f"token head: {count_params(head)} params, {hcfg.n_tokens} tokens of {hcfg.bins} bins; "
          f"conds took {cond_s:.0f} s", flush=True)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sha = file_sha256(args.backbone)
    budget = args.minutes * 60.0
    t0 = time.time()
    last_save, running, step, losses = t0, None, 0, []

    def checkpoint(final=False):
        log = {"steps": step, "wall_s": time.time() - t0, "cond_s": cond_s, "final_loss_ema100": running,
               "loss_curve": losses, "settings": vars(args), "config": hcfg.__dict__, "final": final}
        save_token_head(args.out, ema, os.path.basename(args.backbone), sha,
                        extra={"train_log": {k: log[k] for k in ("steps", "wall_s", "cond_s", "loss_curve")}})
        with open(os.path.join(HERE, "train_tokens_log.json"), "w") as f:
            json.dump(log, f, indent=1)

    head.train()
    n = len(train_idx)
    while time.time() - t0 < budget:
        lr = warmup_cosine(args.lr, step, args.warmup, min((time.time() - t0) / budget, 1.0))
        i = torch.randint(0, n, (args.batch,), generator=gen)
        k = torch.randint(0, args.aug + 1, (args.batch,), generator=gen)
        loss = head.loss(conds[k, i], targets[i], args.smoothing)
        optimizer_step(opt, loss, head, ema, step, lr, args.ema)
        step += 1
        lv = loss.item()
        running = lv if running is None else 0.99 * running + 0.01 * lv
        if step % 100 == 0:
            losses.append([step, round(running, 5)])
            print(f"[{(time.time() - t0) / 60:6.1f} min] step {step:6d} loss {running:.4f} lr {lr:.2e}", flush=True)
        if time.time() - last_save > args.save_every_min * 60:
            checkpoint()
            last_save = time.time()
    checkpoint(final=True)
    print(f"done: {step} steps in {(time.time() - t0) / 60:.1f} min (+{cond_s:.0f} s conds), "
          f"loss {running:.4f}; saved {args.out}", flush=True)


if __name__ == "__main__":
    main()
