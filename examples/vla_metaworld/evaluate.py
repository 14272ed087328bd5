"""Closed-loop evaluation of the VLA in the Meta-World simulator.

    python examples/vla_metaworld/evaluate.py --episodes 25                 # diffusion head
    python examples/vla_metaworld/evaluate.py --episodes 25 --head tokens   # action-token head

For every task: ``--episodes`` layouts with fixed evaluation seeds (disjoint
from the demonstration seeds).  The policy acts from its own observations
(camera image + state + instruction): every ``--execute`` steps it samples an
H=8 action chunk with deterministic DDIM (10 steps, noise from a fixed-seed
generator) and executes the first ``--execute`` actions (receding horizon);
with ``--head tokens`` it greedily decodes 4 actions (16 tokens) and executes
them.
An episode succeeds if the env reports success at any step before
``--max-steps``; it stops at the first success.  The scripted expert is run on
the same seeds for reference.  Also reported: per-step and per-chunk policy
latency (batch 1, one CPU thread) and the action MSE against the expert on the
held-out demonstration episodes (train.split_episodes).
Results go to eval.json.
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

import tasks as T
from model import load_policy, tokenize
from train import DATA, load_demos, split_episodes

HERE = os.path.dirname(os.path.abspath(__file__))


class PolicyRunner:
    """Receding-horizon wrapper: samples a chunk, hands out actions one by one."""

    def __init__(self, policy, stats, instruction: str, execute: int, seed: int, tokens=None):
        self.policy, self.execute, self.tokens = policy, execute, tokens
        self.mean, self.std = stats["state_mean"], stats["state_std"]
        cfg = policy.cfg
        self.text = torch.from_numpy(tokenize(instruction, cfg.text_len))[None]
        self.gen = torch.Generator().manual_seed(seed)
        self.shape = (1, cfg.horizon, cfg.action_dim)
        self.queue: list[np.ndarray] = []
        self.chunk_times: list[float] = []

    def act(self, image: np.ndarray, state: np.ndarray) -> np.ndarray:
        if not self.queue:
            t = time.perf_counter()
            img = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
            st = torch.from_numpy((state - self.mean) / self.std).float()[None]
            if self.tokens is not None:              # TokenPolicyCall: backbone + greedy decoding
                chunk = self.tokens(img, self.text, st)[0].numpy()
            else:
                noise = torch.randn(self.shape, generator=self.gen)
                chunk = self.policy.sample(img, self.text, st, noise)[0].numpy()
            self.chunk_times.append(time.perf_counter() - t)
            self.queue = list(chunk[: self.execute])
        return self.queue.pop(0)


def run_episode(env, cam, act_fn, seed, max_steps, render=True):
    obs = T.reset_episode(env, seed)
    for t in range(max_steps):
        img = cam() if render else None
        a = np.clip(act_fn(img, obs), -1, 1).astype(np.float32)
        obs, _, _, _, info = env.step(a)
        obs = obs.astype(np.float32)
        if info["success"]:
            return True, t + 1
    return False, max_steps


@torch.no_grad()
def heldout_mse(policy, stats, demos, max_steps: int, seed: int = 0, tokens=None) -> dict:
    """Action MSE vs. the expert on held-out demonstration steps (every other
    step, up to ``max_steps``): first action of the chunk and the whole chunk."""
    from train import chunk_index
    cfg = policy.cfg
    _, hold = split_episodes(demos)
    idx = np.nonzero(hold)[0][::2][:max_steps]
    ci = chunk_index(demos, cfg.horizon)
    gen = torch.Generator().manual_seed(seed)
    first, full, per_task = [], [], {}
    for s in range(0, len(idx), 64):
        b = idx[s:s + 64]
        img = torch.from_numpy(demos["images"][b]).permute(0, 3, 1, 2).float() / 255.0
        st = torch.from_numpy((demos["states"][b] - stats["state_mean"]) / stats["state_std"]).float()
        txt = torch.from_numpy(np.stack([tokenize(demos["instructions"][t], cfg.text_len)
                                         for t in demos["task_id"][b]]))
        noise = torch.randn((len(b), cfg.horizon, cfg.action_dim), generator=gen)
        pred = (tokens(img, txt, st) if tokens is not None else policy.sample(img, txt, st, noise)).numpy()
        target = demos["actions"][ci[b]][:, :pred.shape[1]]
        e1 = ((pred[:, 0] - target[:, 0]) ** 2).mean(-1)
        first.extend(e1.tolist())
        full.extend(((pred - target) ** 2).mean((1, 2)).tolist())
        for tid, e in zip(demos["task_id"][b], e1):
            per_task.setdefault(T.TASK_NAMES[tid], []).append(float(e))
    # Baseline: predicting zeros (how big the actions are).
    zero = float((demos["actions"][idx] ** 2).mean())
    return {"steps": len(idx), "mse_first_action": float(np.mean(first)),
            "mse_chunk": float(np.mean(full)), "mse_predict_zero": zero,
            "mse_first_action_per_task": {k: float(np.mean(v)) for k, v in per_task.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=os.path.join(HERE, "vla_diffusion.safetensors"))
    ap.add_argument("--head", choices=("diffusion", "tokens"), default="diffusion")
    ap.add_argument("--token-weights", default=os.path.join(HERE, "vla_tokens.safetensors"))
    ap.add_argument("--episodes", type=int, default=25)
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--execute", type=int, default=4, help="actions executed per predicted chunk")
    ap.add_argument("--tasks", default=None, help="comma-separated subset of task names")
    ap.add_argument("--mse-steps", type=int, default=400)
    ap.add_argument("--no-expert", action="store_true")
    ap.add_argument("--out", default=None, help="default: eval.json (diffusion), eval_tokens.json (tokens)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.out is None:
        args.out = os.path.join(HERE, "eval.json" if args.head == "diffusion" else "eval_tokens.json")
    torch.manual_seed(0)

    policy, stats, _ = load_policy(args.weights)
    policy.eval()
    tokens = None
    if args.head == "tokens":
        from model import TokenPolicyCall, load_token_head
        head, _ = load_token_head(args.token_weights, check_backbone=args.weights)
        tokens = TokenPolicyCall(policy.backbone, head).eval()
        args.execute = min(args.execute, head.cfg.horizon)
    names = args.tasks.split(",") if args.tasks else T.TASK_NAMES
    t0 = time.time()
    results, chunk_times, step_times = {}, [], []
    for name in names:
        tid = T.TASK_NAMES.index(name)
        env = T.make_env(tid)
        cam = T.Camera(env)
        succ, lens, exp_succ, exp_lens = [], [], [], []
        for ep in range(args.episodes):
            seed = T.episode_seed(tid, ep, T.EVAL_SEED_BASE)
            runner = PolicyRunner(policy, stats, T.INSTRUCTIONS[tid], args.execute, seed, tokens)
            ts = time.perf_counter()
            ok, n = run_episode(env, cam, runner.act, seed, args.max_steps)
            step_times.append((time.perf_counter() - ts) / n)
            chunk_times.extend(runner.chunk_times)
            succ.append(ok); lens.append(n)
            if not args.no_expert:
                expert = T.make_expert(tid)
                eok, en = run_episode(env, cam, lambda img, s: T.expert_action(expert, s),
                                      seed, args.max_steps, render=False)
                exp_succ.append(eok); exp_lens.append(en)
        results[name] = {"success": float(np.mean(succ)), "mean_len": float(np.mean(lens)),
                         "successes": int(np.sum(succ)), "episodes": args.episodes}
        if exp_succ:
            results[name].update(expert_success=float(np.mean(exp_succ)),
                                 expert_mean_len=float(np.mean(exp_lens)))
        print(f"[{time.time() - t0:6.0f}s] {name:26s} policy {np.mean(succ):.2f} "
              f"(len {np.mean(lens):.0f})"
              + (f"  expert {np.mean(exp_succ):.2f} (len {np.mean(exp_lens):.0f})" if exp_succ else ""),
              flush=True)

    overall = float(np.mean([r["success"] for r in results.values()]))
    out = {
        "weights": os.path.relpath(args.weights, HERE),
        "head": args.head,
        "settings": vars(args),
        "tasks": results,
        "overall_success": overall,
        "overall_expert_success": (float(np.mean([r["expert_success"] for r in results.values()]))
                                   if not args.no_expert else None),
        "mean_episode_len": float(np.mean([r["mean_len"] for r in results.values()])),
        "latency_ms": {
            "per_chunk_policy": 1000 * float(np.mean(chunk_times)),   # backbone + 10 DDIM head calls
            "per_step_policy_amortized": 1000 * float(np.mean(chunk_times)) / args.execute,
            "per_step_total_with_render_and_sim": 1000 * float(np.mean(step_times)),
        },
        "eval_seeds": f"episode_seed(task, ep, {T.EVAL_SEED_BASE})",
    }
    if args.mse_steps > 0 and os.path.exists(DATA):
        out["heldout_action_mse"] = heldout_mse(policy, stats, load_demos(), args.mse_steps,
                                                tokens=tokens)
    out["wall_s"] = time.time() - t0
    print(json.dumps({k: v for k, v in out.items() if k != "settings"}, indent=1), flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    sys.stdout.flush()
    os._exit(0)     # skip EGL teardown errors at interpreter exit


if __name__ == "__main__":
    main()
