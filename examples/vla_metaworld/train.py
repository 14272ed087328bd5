"""Seeded behaviour cloning of the diffusion VLA on the expert demonstrations.

    python examples/vla_metaworld/train.py --minutes 60
    python examples/vla_metaworld/train.py --minutes 30 --init examples/vla_metaworld/vla_diffusion.safetensors

Loss: DDPM epsilon-prediction on action chunks (H=8 future expert actions,
repeating the last action past the end of an episode).  The backbone runs once
per sample and the diffusion head on ``--n-noise`` (t, noise) draws.
Images get a random shift (replicate-pad 4, random 64x64 crop, DrQ style).
States are standardized with dataset mean/std (saved in the safetensors
metadata); actions are already in [-1, 1] (the env's action box) and are used
as is.  An exponential moving average of the weights is what gets saved.
The learning rate follows warmup + cosine decay over the wall-clock budget.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch
import torch.nn.functional as F

from model import VLAConfig, VLAPolicy, count_params, load_policy, save_policy, tokenize

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "demos.npz")
HOLDOUT_PER_TASK = 2      # last episodes of every task: held out for the action-MSE check


def load_demos(path: str = DATA) -> dict:
    d = np.load(path)
    return {k: d[k] for k in d.files}


def split_episodes(demos: dict) -> tuple[np.ndarray, np.ndarray]:
    """Boolean step masks (train, holdout): the last HOLDOUT_PER_TASK episodes
    of every task are held out."""
    hold_eps = []
    for tid in np.unique(demos["episode_task"]):
        eps = np.nonzero(demos["episode_task"] == tid)[0]
        hold_eps.extend(eps[-HOLDOUT_PER_TASK:].tolist())
    hold = np.isin(demos["episode"], hold_eps)
    return ~hold, hold


def chunk_index(demos: dict, horizon: int) -> np.ndarray:
    """(N, H) step indices of the action chunk starting at each step, clamped
    to the last step of the episode."""
    n = len(demos["episode"])
    ends = np.zeros(n, np.int64)
    starts = np.concatenate([[0], np.cumsum(demos["episode_len"])[:-1]])
    for s, l in zip(starts, demos["episode_len"]):
        ends[s:s + l] = s + l - 1
    idx = np.arange(n)[:, None] + np.arange(horizon)[None]
    return np.minimum(idx, ends[:, None])


def state_stats(states: np.ndarray) -> dict:
    return {"state_mean": states.mean(0), "state_std": np.maximum(states.std(0), 1e-2)}


def random_shift(img: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """img (B,3,H,W) -> each image shifted by an integer offset in [-pad, pad]."""
    B, _, H, W = img.shape
    padded = F.pad(img, (pad, pad, pad, pad), mode="replicate")
    ox = torch.randint(0, 2 * pad + 1, (B,), generator=gen).tolist()
    oy = torch.randint(0, 2 * pad + 1, (B,), generator=gen).tolist()
    return torch.stack([padded[i, :, oy[i]:oy[i] + H, ox[i]:ox[i] + W] for i in range(B)])


def add_training_args(ap, *, batch: int, lr: float) -> None:
    """The options every training script here takes (optimizer, EMA, checkpoints, seed, threads)."""
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--save-every-min", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` in eval mode with no gradients: the EMA weights."""
    out = copy.deepcopy(module).eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def warmup_cosine(lr: float, step: int, warmup: int, frac: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 5% over the wall-clock budget
    (`frac` of it spent)."""
    return lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * frac)))


def optimizer_step(opt, loss: torch.Tensor, model: torch.nn.Module, ema: torch.nn.Module, step: int, lr: float,
                   ema_max: float) -> None:
    """One step at learning rate `lr` (gradients clipped to norm 1), then the EMA update of
    `ema` from `model` with a warmed-up decay min(ema_max, (1 + step) / (10 + step))."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        d = min(ema_max, (1 + step) / (10 + step))
        for pe, pp in zip(ema.parameters(), model.parameters()):
            pe.mul_(d).add_(pp.detach(), alpha=1 - d)


def repool(policy: VLAPolicy, pool: int) -> VLAPolicy:
    """A policy of another visual pooling with `policy`'s weights: every parameter is copied but
    the backbone's position embedding, whose visual rows are repeated over each pooled window
    (pool 2 -> 1: each of the 16 pooled positions becomes its 2x2 window's 4 positions)."""
    from dataclasses import replace
    old = policy.cfg
    new = VLAPolicy(replace(old, pool=pool))
    sd = policy.state_dict()
    pos = sd["backbone.pos"]                                          # (1, text + vis + 2, d)
    g_old, g_new = old.image_size // old.patch // old.pool, old.image_size // old.patch // pool
    t = old.text_len
    vis = pos[:, t:t + g_old * g_old].reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2)
    vis = torch.nn.functional.interpolate(vis, size=(g_new, g_new), mode="nearest")
    vis = vis.permute(0, 2, 3, 1).reshape(1, g_new * g_new, -1)
    sd["backbone.pos"] = torch.cat([pos[:, :t], vis, pos[:, t + g_old * g_old:]], dim=1)
    new.load_state_dict(sd)
    return new


def widen(policy: VLAPolicy, generator: torch.Generator, noise: float = 0.1) -> VLAPolicy:
    """The same policy at twice the ViT / backbone width (d_model and their heads doubled, the
    head's width unchanged), computing the same function (Net2WiderNet, every unit copied once):
    each width-d vector becomes [x, x] (a LayerNorm of [x, x] is [LN(x), LN(x)]; a head's copy
    attends as the head), an output of width d is copied, an input of width d is split as
    [W/2 + E, W/2 - E] with E ~ N(0, (noise * std W)^2). E cancels on the copied inputs, so the
    function is unchanged, but the two copies of a unit get different gradients: training moves
    them apart."""
    from dataclasses import replace
    old = policy.cfg
    d = old.d_model
    new = VLAPolicy(replace(old, d_model=2 * d, backbone_heads=2 * old.encoder_heads))
    sd = policy.state_dict()
    out = {}

    def dup(t: torch.Tensor, axis: int, chunks: int = 1) -> torch.Tensor:
        parts = t.chunk(chunks, dim=axis)
        return torch.cat([torch.cat([c, c], dim=axis) for c in parts], dim=axis)

    def split(t: torch.Tensor, axis: int) -> torch.Tensor:
        e = torch.randn(t.shape, generator=generator) * noise * float(t.std())
        return torch.cat([t / 2 + e, t / 2 - e], dim=axis)

    for k, v in sd.items():
        if not k.startswith("backbone.") and k != "head.c_proj.weight":
            out[k] = v.clone()
            continue
        if k == "head.c_proj.weight":                           # reads cond, width d
            out[k] = split(v, 1)
        elif k.endswith(".qkv.weight"):                          # (3d, d): q, k, v each copied
            out[k] = split(dup(v, 0, 3), 1)
        elif k.endswith(".qkv.bias"):
            out[k] = dup(v, 0, 3)
        elif v.dim() == 2 and k.endswith(".weight") and k != "backbone.text_emb.weight":
            # Linear (out, in): an output of width d (or the MLP's r*d hidden) copied; an input of
            # width d (or r*d) split. state_proj.0 reads the 39-D state: only its output widens.
            w = dup(v, 0)
            out[k] = w if k == "backbone.state_proj.0.weight" else split(w, 1)
        elif k == "backbone.vit.patch_embed.weight":             # conv (d, 3, p, p)
            out[k] = dup(v, 0)
        else:                                                    # biases, LayerNorms, embeddings: last axis
            out[k] = dup(v, v.dim() - 1)
    wrong = {k: (tuple(out[k].shape), tuple(v.shape)) for k, v in new.state_dict().items()
             if out[k].shape != v.shape}
    if wrong:
        raise AssertionError(f"widen: a rule gave the wrong shape (got, want): {wrong}")
    new.load_state_dict(out)
    return new


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock training budget")
    ap.add_argument("--init", default=None, help="resume from these safetensors weights")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--out", default=os.path.join(HERE, "vla_diffusion.safetensors"))
    ap.add_argument("--n-noise", type=int, default=4)
    ap.add_argument("--shift", type=int, default=4)
    ap.add_argument("--pool", type=int, default=None,
                    help="visual-token pooling (2: 16 tokens, as shipped; 1: all 64). With --init from a policy "
                         "of another pooling, its weights are ported: the backbone's visual position embeddings "
                         "are repeated over each pooled window")
    ap.add_argument("--widen", action="store_true",
                    help="with --init: start from that policy at twice the ViT / backbone width, computing the "
                         "same function (`widen`)")
    ap.add_argument("--half", action="store_true",
                    help="store the weights as float16 (a file under 20 MB for the widened policy); they load "
                         "as float32")
    ap.add_argument("--log", default=None, help="training log (default: train_log.json beside the shipped "
                                                "weights, or <out>_log.json for another --out)")
    add_training_args(ap, batch=64, lr=3e-4)
    args = ap.parse_args()
    if args.widen and not args.init:
        ap.error("--widen widens the policy of --init: give --init")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    demos = load_demos(args.data)
    train_mask, hold_mask = split_episodes(demos)
    train_idx = np.nonzero(train_mask)[0]

    if args.init:
        policy, stats, meta = load_policy(args.init)
        prev_log = json.loads(meta.get("train_log", "{}"))
        print(f"resumed from {args.init}", flush=True)
        if args.pool is not None and args.pool != policy.cfg.pool:
            policy = repool(policy, args.pool)
            print(f"ported to pool {args.pool}: {policy.backbone.pos.shape[1]} backbone tokens", flush=True)
        if args.widen:
            policy = widen(policy, gen)
            print(f"widened to d_model {policy.cfg.d_model}, {policy.cfg.backbone_heads} heads", flush=True)
    else:
        policy = VLAPolicy(VLAConfig(**({"pool": args.pool} if args.pool else {})))
        stats = state_stats(demos["states"][train_idx])
        prev_log = {}
    cfg = policy.cfg
    ema = frozen_copy(policy)

    # Everything as tensors up front: images stay uint8 until a batch is drawn.
    images = torch.from_numpy(demos["images"]).permute(0, 3, 1, 2)            # (N,3,64,64) uint8
    states = torch.from_numpy((demos["states"] - stats["state_mean"]) / stats["state_std"]).float()
    chunks = torch.from_numpy(demos["actions"][chunk_index(demos, cfg.horizon)])  # (N,H,4)
    text = torch.from_numpy(np.stack([tokenize(s, cfg.text_len) for s in demos["instructions"]]))
    task_id = torch.from_numpy(demos["task_id"].astype(np.int64))
    train_idx_t = torch.from_numpy(train_idx)

    print(f"train steps {len(train_idx)}, held-out steps {int(hold_mask.sum())}; "
          f"params {count_params(policy)} ({count_params(policy.backbone)} backbone, "
          f"{count_params(policy.head)} head)", flush=True)

    default_out = os.path.join(HERE, "vla_diffusion.safetensors")
    log_path = args.log or (os.path.join(HERE, "train_log.json") if os.path.abspath(args.out) == default_out
                            else os.path.splitext(args.out)[0] + "_log.json")
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    budget = args.minutes * 60.0
    step0 = prev_log.get("steps", 0)
    losses = list(prev_log.get("loss_curve", []))
    wall_prev = prev_log.get("wall_s", 0.0)
    t0 = time.time()
    last_save = t0
    running = None
    step = 0

    def checkpoint(final=False):
        log = {"steps": step0 + step, "wall_s": wall_prev + time.time() - t0,
               "final_loss_ema100": running, "loss_curve": losses,
               "settings": {**vars(args), "config": cfg.__dict__},
               "samples_seen": (step0 + step) * args.batch, "final": final}
        save_policy(args.out, ema, stats, extra={"train_log": {k: log[k] for k in
                                                                ("steps", "wall_s", "loss_curve")}},
                    dtype=torch.float16 if args.half else None)
        with open(log_path, "w") as f:
            json.dump(log, f, indent=1)

    policy.train()
    while True:
        elapsed = time.time() - t0
        if elapsed >= budget:
            break
        lr = warmup_cosine(args.lr, step, args.warmup, min(elapsed / budget, 1.0))

        b = train_idx_t[torch.randint(0, len(train_idx_t), (args.batch,), generator=gen)]
        img = random_shift(images[b].float() / 255.0, args.shift, gen)
        loss = policy.loss(img, text[task_id[b]], states[b], chunks[b],
                           n_noise=args.n_noise, generator=gen)
        optimizer_step(opt, loss, policy, ema, step, lr, args.ema)
        step += 1
        lv = loss.item()
        running = lv if running is None else 0.99 * running + 0.01 * lv
        if step % 100 == 0:
            losses.append([step0 + step, round(running, 5)])
            print(f"[{elapsed / 60:6.1f} min] step {step0 + step:6d} loss {running:.4f} "
                  f"lr {lr:.2e} {step / max(elapsed, 1e-6):.2f} it/s", flush=True)
        if time.time() - last_save > args.save_every_min * 60:
            checkpoint()
            last_save = time.time()
            print(f"saved {args.out}", flush=True)
    checkpoint(final=True)
    print(f"done: {step} steps in {(time.time() - t0) / 60:.1f} min, loss {running:.4f}; "
          f"saved {args.out}", flush=True)


if __name__ == "__main__":
    main()
