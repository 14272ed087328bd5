"""Seeded Meta-World demonstration generator (scripted experts).

For every task in tasks.TASKS it rolls out the scripted expert on
``--episodes`` seeded layouts and records per step: the 64x64 RGB image of the
corner camera (uint8), the 39-D goal-observable state (float32), the expert
action clipped to [-1, 1] (float32), the task id and the step index.  An
episode ends ``--extra-steps`` steps after the first success, or at
``--max-steps``; only successful episodes are kept (failures are counted and
reported).  Output: one compressed .npz.

    python examples/vla_metaworld/generate.py --episodes 40
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np

import tasks as T

HERE = os.path.dirname(os.path.abspath(__file__))


def rollout_expert(env, cam, expert, seed, max_steps, extra_steps, record=True):
    """One expert episode.  Returns (images, states, actions, success, steps)."""
    obs = T.reset_episode(env, seed)
    imgs, states, actions = [], [], []
    success_at = None
    for t in range(max_steps):
        act = T.expert_action(expert, obs)
        if record:
            imgs.append(cam())
            states.append(obs)
            actions.append(act)
        obs, _, _, _, info = env.step(act)
        obs = obs.astype(np.float32)
        if success_at is None and info["success"]:
            success_at = t
        if success_at is not None and t >= success_at + extra_steps:
            break
    return imgs, states, actions, success_at is not None, t + 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=40, help="successful episodes per task")
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--extra-steps", type=int, default=3,
                    help="steps recorded after the first success")
    ap.add_argument("--seed-base", type=int, default=T.TRAIN_SEED_BASE)
    ap.add_argument("--out", default=os.path.join(HERE, "data", "demos.npz"))
    args = ap.parse_args()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)

    t0 = time.time()
    all_imgs, all_states, all_actions, all_task, all_ep, all_step = [], [], [], [], [], []
    ep_task, ep_seed, ep_len = [], [], []
    summary = {}
    ep_counter = 0
    for tid, name in enumerate(T.TASK_NAMES):
        env = T.make_env(tid)
        cam = T.Camera(env)
        expert = T.make_expert(tid)
        kept = tried = 0
        lens = []
        t_task = time.time()
        while kept < args.episodes:
            seed = T.episode_seed(tid, tried, args.seed_base)
            tried += 1
            imgs, states, actions, ok, n = rollout_expert(
                env, cam, expert, seed, args.max_steps, args.extra_steps)
            if not ok:
                continue
            all_imgs.append(np.stack(imgs))
            all_states.append(np.stack(states))
            all_actions.append(np.stack(actions))
            all_task.append(np.full(n, tid, np.int8))
            all_ep.append(np.full(n, ep_counter, np.int32))
            all_step.append(np.arange(n, dtype=np.int16))
            ep_task.append(tid); ep_seed.append(seed); ep_len.append(n)
            lens.append(n)
            kept += 1
            ep_counter += 1
            if kept % 10 == 0:
                print(f"[{time.time() - t0:7.1f}s] {name}: {kept}/{args.episodes} kept "
                      f"({tried} tried)", flush=True)
        dt = time.time() - t_task
        summary[name] = dict(kept=kept, tried=tried, expert_success=kept / tried,
                             steps=int(sum(lens)), mean_len=float(np.mean(lens)),
                             sec_per_episode=dt / tried)
        print(f"{name}: expert success {kept}/{tried}, {sum(lens)} steps, "
              f"{dt / tried:.2f} s/episode", flush=True)

    np.savez_compressed(
        args.out,
        images=np.concatenate(all_imgs),            # (N, 64, 64, 3) uint8
        states=np.concatenate(all_states),          # (N, 39) float32
        actions=np.concatenate(all_actions),        # (N, 4) float32 in [-1, 1]
        task_id=np.concatenate(all_task),           # (N,) int8
        episode=np.concatenate(all_ep),             # (N,) int32
        step=np.concatenate(all_step),              # (N,) int16
        episode_task=np.array(ep_task, np.int8),
        episode_seed=np.array(ep_seed, np.int64),
        episode_len=np.array(ep_len, np.int32),
        task_names=np.array(T.TASK_NAMES),
        instructions=np.array(T.INSTRUCTIONS),
    )
    size_mb = os.path.getsize(args.out) / 2**20
    info = dict(args=vars(args), tasks=summary, total_steps=int(sum(ep_len)),
                episodes=len(ep_len), size_mb=size_mb, wall_s=time.time() - t0,
                camera=T.CAMERA, image_size=T.IMAGE_SIZE,
                mujoco_gl=os.environ.get("MUJOCO_GL"))
    with open(os.path.splitext(args.out)[0] + "_info.json", "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1), flush=True)
    # EGL contexts raise harmless errors when torn down at interpreter exit;
    # skip the teardown.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
