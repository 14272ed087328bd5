"""The Meta-World VLA workload (examples/vla_metaworld): the shipped diffusion
policy predicts held-out expert actions, and one short closed-loop episode runs
from its ONNX Runtime artifacts in a process where torch cannot be imported,
acting like the torch policy."""
import json
import os

import numpy as np
import pytest
import torch

import pared
from pared.testing import run_torch_free
from pared.workloads import EXAMPLES, example_module

HERE = os.path.join(EXAMPLES, "vla_metaworld")
WEIGHTS = os.path.join(HERE, "vla_diffusion.safetensors")
HOLDOUT = 2                 # the training script holds out the last 2 episodes of every task


def _policy():
    M = example_module("vla_metaworld")
    policy, stats, _ = M.load_policy(WEIGHTS)
    return M, policy.eval(), stats


def test_policy_predicts_held_out_expert_actions():
    torch.manual_seed(0)
    M, policy, stats = _policy()
    d = np.load(os.path.join(HERE, "data", "demos.npz"))
    cfg = policy.cfg
    starts = np.concatenate([[0], np.cumsum(d["episode_len"])[:-1]])
    rows, chunks = [], []
    for tid in np.unique(d["episode_task"]):
        for ep in np.nonzero(d["episode_task"] == tid)[0][-HOLDOUT:]:
            s, n = starts[ep], d["episode_len"][ep]
            for i in range(0, n, 8):              # every 8th step of the held-out episodes
                rows.append(s + i)
                chunks.append(d["actions"][s + np.minimum(np.arange(i, i + cfg.horizon), n - 1)])
    rows = np.array(rows)
    img = torch.from_numpy(d["images"][rows]).permute(0, 3, 1, 2).float() / 255.0
    st = torch.from_numpy((d["states"][rows] - stats["state_mean"]) / stats["state_std"]).float()
    txt = torch.from_numpy(np.stack([M.tokenize(str(d["instructions"][t]), cfg.text_len) for t in d["task_id"][rows]]))
    noise = torch.randn(len(rows), cfg.horizon, cfg.action_dim, generator=torch.Generator().manual_seed(0))
    pred = policy.sample(img, txt, st, noise).numpy()
    target = np.stack(chunks)
    mse_first = float(((pred[:, 0] - target[:, 0]) ** 2).mean())
    baseline = float((target[:, 0] ** 2).mean())          # predicting no motion
    assert len(rows) > 100
    assert mse_first < 0.02 and mse_first < 0.1 * baseline, (mse_first, baseline)


EPISODE = """
import json, sys
import numpy as np
import pared
from pared.workloads import example_module
a = json.loads({args!r})
T = example_module("vla_metaworld", "tasks.py")
backbone, head = pared.load(a["backbone"]), pared.load(a["head"])
alphas = np.array(a["alphas"], np.float64)
ts = a["timesteps"]
text = np.array([a["text"]], np.int64)
mean, std = np.array(a["mean"], np.float32), np.array(a["std"], np.float32)
rng = np.random.default_rng(0)

def chunk(image, state, noise):
    img = (image.transpose(2, 0, 1)[None].astype(np.float32) / 255.0)
    st = ((state - mean) / std).astype(np.float32)[None]
    cond = backbone(img, text, st)
    x = noise.astype(np.float64)
    for i, t in enumerate(ts):              # DDIM (eta 0) with x0 clipping, as the policy samples
        a_t, a_prev = alphas[t], (alphas[ts[i + 1]] if i + 1 < len(ts) else 1.0)
        eps = head(x.astype(np.float32), np.full((1,), float(t), np.float32), cond).astype(np.float64)
        x0 = np.clip((x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t), -1, 1)
        eps = (x - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    return np.clip(x, -1, 1)[0]

env = T.make_env(a["task"]); cam = T.Camera(env)
obs = T.reset_episode(env, a["seed"])
first, queue, success, steps = None, [], False, 0
for steps in range(1, a["max_steps"] + 1):
    if not queue:
        image, noise = cam(), rng.standard_normal((1, a["horizon"], a["action_dim"]))
        c = chunk(image, obs, noise)
        if first is None:
            first = {{"image": image.tolist(), "state": obs.tolist(), "noise": noise.tolist(), "chunk": c.tolist()}}
        queue = list(c[:a["execute"]])
    obs, _, _, _, info = env.step(np.clip(queue.pop(0), -1, 1).astype(np.float32))
    obs = obs.astype(np.float32)
    if info["success"]:
        success = True
        break
print(json.dumps({{"success": success, "steps": steps, "first": first, "torch_imported": "torch" in sys.modules}}))
"""


@pytest.mark.slow
def test_closed_loop_episode_runs_torch_free_from_artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", os.environ.get("MUJOCO_GL", "egl"))     # headless rendering
    torch.set_num_threads(1)
    M, policy, stats = _policy()
    cfg = policy.cfg
    img = torch.zeros(1, 3, 64, 64)
    txt = torch.from_numpy(M.tokenize("reach the goal", cfg.text_len))[None]
    st = torch.zeros(1, int(stats["state_mean"].shape[0]))
    cond = policy.backbone(img, txt, st).detach()
    paths = {}
    for name, module, ex in (("backbone", policy.backbone, (img, txt, st)),
                             ("head", policy.head, (torch.zeros(1, cfg.horizon, cfg.action_dim),
                                                    torch.full((1,), 50.0), cond))):
        opt = pared.optimize(module, ex, target="cpu", bench_repeats=0)
        paths[name] = opt.save(str(tmp_path / name))
    T = example_module("vla_metaworld", "tasks.py")
    task = next(i for i, t in enumerate(T.TASKS) if t[0].startswith("reach"))
    args = json.dumps({
        "backbone": paths["backbone"], "head": paths["head"], "task": task, "seed": 123456, "max_steps": 60,
        "execute": 4, "horizon": cfg.horizon, "action_dim": cfg.action_dim,
        "text": M.tokenize(T.TASKS[task][1], cfg.text_len).tolist(),
        "alphas": policy.alphas_cumprod.double().tolist(),
        "timesteps": M.ddim_timesteps(cfg.train_timesteps, cfg.ddim_steps),
        "mean": stats["state_mean"].tolist(), "std": stats["state_std"].tolist()})
    info = json.loads(run_torch_free(EPISODE.format(args=args), timeout=600).strip().splitlines()[-1])
    assert info["torch_imported"] is False
    assert 1 <= info["steps"] <= 60
    # the artifact's first action chunk is the torch policy's for the same observation and noise
    f = info["first"]
    image = torch.tensor(f["image"], dtype=torch.uint8).permute(2, 0, 1)[None].float() / 255.0
    state = torch.from_numpy((np.array(f["state"], np.float32) - stats["state_mean"]) / stats["state_std"]).float()[None]
    text = torch.tensor([M.tokenize(T.TASKS[task][1], cfg.text_len)])
    want = policy.sample(image, text, state, torch.tensor(f["noise"], dtype=torch.float32))[0].numpy()
    np.testing.assert_allclose(np.array(f["chunk"]), want, atol=2e-3)
