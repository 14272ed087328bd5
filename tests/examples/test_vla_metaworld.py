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
    text = torch.from_numpy(M.tokenize(T.TASKS[task][1], cfg.text_len))[None]
    want = policy.sample(image, text, state, torch.tensor(f["noise"], dtype=torch.float32))[0].numpy()
    np.testing.assert_allclose(np.array(f["chunk"]), want, atol=2e-3)


# --------------------------------------------------------------------------
# The autoregressive action-token head and the policy-call modules
# --------------------------------------------------------------------------
TOKENS = os.path.join(HERE, "vla_tokens.safetensors")


def test_token_head_is_causal_and_one_graph_decodes_like_the_loop():
    M = example_module("vla_metaworld")
    torch.manual_seed(0)
    head = M.TokenActionHead(M.TokenHeadConfig(layers=2)).eval()
    cond = torch.randn(3, 128)
    tok = torch.randint(0, 256, (3, head.cfg.n_tokens))
    cut = tok.clone()
    cut[:, 6:] = 0
    with torch.no_grad():
        full, part = head(tok, cond), head(cut, cond)
    # logits at position j see cond and tokens < j only
    torch.testing.assert_close(full[:, :7], part[:, :7])
    assert (full[:, 7:] - part[:, 7:]).abs().max() > 1e-3
    # bins round-trip within half a bin
    a = torch.rand(3, 4, 4) * 2 - 1
    back = M.tokens_to_actions(M.actions_to_tokens(a), 256, 4)
    assert (back - a).abs().max() <= 1 / 255 + 1e-6
    # the unrolled policy call equals the Python decoding loop
    backbone = M.VLABackbone(M.VLAConfig()).eval()
    call = M.TokenPolicyCall(backbone, head).eval()
    img, ids, st = torch.rand(2, 3, 64, 64), torch.from_numpy(np.stack([M.tokenize("open the door", 12)] * 2)), torch.randn(2, 39)
    with torch.no_grad():
        want, _ = M.greedy_decode(head, backbone(img, ids, st), head.cfg)
        torch.testing.assert_close(call(img, ids, st), want)


def test_diffusion_policy_call_equals_the_sampler():
    M, policy, _ = _policy()
    g = torch.Generator().manual_seed(1)
    img, st = torch.rand(2, 3, 64, 64, generator=g), torch.randn(2, 39, generator=g)
    ids = torch.from_numpy(np.stack([M.tokenize("push the puck to the goal", 12)] * 2))
    noise = torch.randn(2, 8, 4, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(M.DiffusionPolicyCall(policy)(img, ids, st, noise),
                                   policy.sample(img, ids, st, noise), atol=1e-5, rtol=0)


def test_token_head_refuses_a_backbone_it_was_not_trained_on(tmp_path):
    M = example_module("vla_metaworld")
    other = tmp_path / "other.safetensors"
    other.write_bytes(open(WEIGHTS, "rb").read()[:-1] + b" ")
    with pytest.raises(ValueError, match="trained on the backbone"):
        M.load_token_head(TOKENS, check_backbone=str(other))
    head, meta = M.load_token_head(TOKENS, check_backbone=WEIGHTS)
    assert meta["backbone_file"] == "vla_diffusion.safetensors"


def test_large_head_refuses_a_backbone_it_was_not_trained_on(tmp_path):
    M = example_module("vla_metaworld")
    other = tmp_path / "other.safetensors"
    other.write_bytes(open(WEIGHTS, "rb").read()[:-1] + b" ")
    head = os.path.join(HERE, "vla_diffusion_large_head.npz")
    with pytest.raises(ValueError, match="trained on the backbone of vla_diffusion.safetensors"):
        M.load_head_npz(head, str(other))
    policy, _, meta = M.load_head_npz(head, WEIGHTS)
    assert policy.cfg.d_head == 256 and policy.cfg.head_layers == 4 and meta["train_log"]["steps"] == 7217


def test_token_head_predicts_held_out_expert_actions():
    from pared.workloads import get_workload
    wl = get_workload("vla_metaworld", head="tokens")
    model = wl.build()
    d = wl.demos()
    rows = wl.heldout_steps(96)
    with torch.no_grad():
        pred = np.concatenate([model(*[torch.from_numpy(a) for a in wl._demo_inputs(int(i))]).numpy() for i in rows])
    first = pred[:, 0]
    target = d["actions"][rows]
    mse = float(((first - target) ** 2).mean())
    baseline = float((target ** 2).mean())
    assert mse < 0.02 and mse < 0.1 * baseline, (mse, baseline)


def test_workload_options_are_checked():
    from pared.ir.errors import OptionError
    from pared.workloads import get_workload
    with pytest.raises(OptionError, match="option 'head'"):
        get_workload("vla_metaworld", head="speculative")
    with pytest.raises(OptionError, match="unknown task"):
        get_workload("vla_metaworld", tasks="fly-v3")
    with pytest.raises(OptionError, match="option 'execute'"):
        get_workload("vla_metaworld", execute=9)
    with pytest.raises(OptionError, match="does not take"):
        get_workload("vla_metaworld", samples=10)
    with pytest.raises(OptionError, match="option 'policy' must be one of \\['base', 'large', 'all_tokens', 'wide'\\]"):
        get_workload("vla_metaworld", policy="huge")
    from pared.cli import build_parser                  # pared bench --policy offers the same policies
    from pared.workloads import POLICIES
    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    assert next(a for a in bench._actions if a.dest == "policy").choices == tuple(POLICIES)
    with pytest.raises(OptionError, match="policy='large' is a diffusion policy"):
        get_workload("vla_metaworld", head="tokens", policy="large")
    with pytest.raises(OptionError, match="option 'calibration_steps' must be a positive integer"):
        get_workload("vla_metaworld", calibration_steps=0)


def test_the_loop_decoder_acts_as_the_unrolled_one_and_calibrates_on_training_episodes():
    from pared.ir.decode import Decoder
    from pared.workloads import get_workload
    loop = get_workload("vla_metaworld", head="tokens", decoder="loop", calibration_steps=16)
    unrolled = get_workload("vla_metaworld", head="tokens")
    a, b = loop.build(), unrolled.build()
    assert isinstance(a, Decoder) and not isinstance(b, Decoder)
    for i in loop.heldout_steps(6):
        x = [torch.from_numpy(v) for v in loop._demo_inputs(int(i))]
        with torch.no_grad():
            assert torch.equal(a(*x), b(*x))
    d = loop.demos()
    train = loop.train_steps(16)
    held_eps = set(d["episode"][loop.heldout_steps(len(d["episode"]))])
    assert len(train) == 16 and not set(d["episode"][train]) & held_eps
    assert len(loop.calibration()) == 16
    seqs = loop.replay_sequences(per_task=1, calls=5)
    assert len(seqs) == 6 and all(len(s) == 5 for s in seqs)


@pytest.mark.parametrize("policy", ["base", "large", "wide"])
def test_the_denoiser_acts_as_the_unrolled_diffusion_policy(policy):
    """decoder='loop' on the diffusion head: a pared Denoiser (the DDIM steps a steps loop of the
    plan) with the same actions as the unrolled policy call, bit for bit, and the captured
    program within float tolerance."""
    from pared.ir.capture import capture
    from pared.ir.denoise import Denoiser
    from pared.workloads import get_workload
    loop = get_workload("vla_metaworld", decoder="loop", policy=policy)
    a, b = loop.build(), get_workload("vla_metaworld", policy=policy).build()
    assert isinstance(a, Denoiser) and a.steps == 10
    xs = [[torch.from_numpy(v) for v in loop._demo_inputs(int(i))] for i in loop.heldout_steps(4)]
    prog = capture(a, xs[0])
    assert prog.plan.stepped_graphs()["head"] == 10
    for x in xs:
        with torch.no_grad():
            want = b(*x)
            assert torch.equal(a(*x), want)
        torch.testing.assert_close(prog(*x), want, atol=1e-5, rtol=0)


@pytest.mark.heavy
def test_bench_with_action_cache_switches_to_the_loop_and_caches_the_head(tmp_path, monkeypatch):
    """pared bench with the action_cache pipeline: every contender gets the Denoiser form, the
    artifact's head runs its BAC schedule, and it acts in the simulator."""
    monkeypatch.setenv("MUJOCO_GL", os.environ.get("MUJOCO_GL", "egl"))
    from pared.workloads.bench import bench_workload
    pipe = os.path.join(EXAMPLES, "pipelines", "vla_action_cache.yaml")
    r = bench_workload("vla_metaworld", pipeline=pipe, repeats=1, json_out=str(tmp_path / "v.json"),
                       workload_options={"episodes": 1, "tasks": "reach-v3", "mse_steps": 8, "calls": 2,
                                         "max_steps": 60, "calibration_steps": 64})
    f = r["fidelity"]
    assert f["episodes"] == 1 and f["heldout_steps"] == 8
    assert 0 < f["action_mse_vs_reference"] < 0.05          # cached: close to, not equal to, eager
    calls = r["graph_calls_per_call"]["optimized"]          # the head loop: 10 steps, a variant each
    assert sum(n for g, n in calls.items() if g.startswith("head.")) == 10 and calls["denoise.update"] == 10
    assert calls.get("head.full", 0) < 10


@pytest.mark.heavy
def test_bench_with_dynamic_precision_switches_widths_in_the_simulator(tmp_path, monkeypatch):
    """pared bench with examples/pipelines/vla_dynamic_precision.yaml: the artifact acts in the
    simulator with int8 weights, its calls at 8 or 4 activation bits by the hand's speed, and the
    result reports the share of each width and the memory against fp32. On the policy's loop form
    (the head's DDIM steps a loop of the Plan, as in vla_composed.yaml): the unrolled form's int8
    graphs take about ten times as long to lower (the ONNX exporter's optimizer on a large graph)."""
    monkeypatch.setenv("MUJOCO_GL", os.environ.get("MUJOCO_GL", "egl"))
    from pared.workloads.bench import bench_workload
    r = bench_workload("vla_metaworld", pipeline=os.path.join(EXAMPLES, "pipelines", "vla_dynamic_precision.yaml"),
                       repeats=1, json_out=str(tmp_path / "dyq.json"),
                       workload_options={"episodes": 1, "tasks": "reach-v3", "mse_steps": 8, "calls": 12,
                                         "max_steps": 60, "calibration_steps": 64, "decoder": "loop"})
    f = r["fidelity"]
    assert f["episodes"] == 1 and 0 < f["action_mse_vs_reference"] < 0.05     # int8: close to eager
    p = r["precision"]
    assert set(p["level_shares"]) <= {"a8", "a4"} and sum(p["level_shares"].values()) == pytest.approx(1.0)
    assert 0.2 < p["memory_ratio"] < 0.35, p
    # every call of the encoder and the head ran a precision variant; none ran a float graph
    ran = set(r["graph_calls_per_call"]["optimized"])
    assert {g for g in ran if g.startswith(("encoder", "head"))} <= {f"{g}.a{b}" for g in ("encoder", "head")
                                                                     for b in (8, 4)}
    assert {"encoder", "head"} <= {g.split(".")[0] for g in ran}


@pytest.mark.heavy
def test_bench_with_token_reuse_reuses_static_tokens_in_the_simulator(tmp_path, monkeypatch):
    """pared bench with examples/pipelines/vla_token_reuse.yaml's pass on the 64-visual-token policy: the
    artifact acts in the simulator, an episode's first call cold, later calls reusing the static
    patches' tokens, and the result reports the share of calls per level."""
    monkeypatch.setenv("MUJOCO_GL", os.environ.get("MUJOCO_GL", "egl"))
    from pared.testing import pipeline_with_options
    from pared.workloads.bench import bench_workload
    # the shipped file with two reuse levels of its five (each level one more encoder graph to
    # lower, ~17 s here); the bins select still chooses among levels
    pipe = pipeline_with_options(os.path.join(EXAMPLES, "pipelines", "vla_token_reuse.yaml"),
                                 {"token_reuse": {"levels": [24, 40]}}, str(tmp_path / "reuse.yaml"))
    r = bench_workload("vla_metaworld", pipeline=pipe, repeats=1, json_out=str(tmp_path / "reuse.json"),
                       workload_options={"policy": "all_tokens", "decoder": "loop", "episodes": 1,
                                         "tasks": "reach-v3", "mse_steps": 8, "calls": 12, "max_steps": 60,
                                         "calibration_steps": 64})
    f = r["fidelity"]
    assert f["episodes"] == 1 and f["action_mse_vs_reference"] < 0.05
    u = r["token_reuse"]
    assert u["level_shares"]["cold"] > 0 and sum(u["level_shares"].values()) == pytest.approx(1.0)
    assert any(k.startswith("r") for k in u["level_shares"]) and u["mean_reused"] > 8, u
    assert {g for g in r["graph_calls_per_call"]["optimized"] if g.startswith("encoder")} <= \
        {"encoder.cold", "encoder.probe", "encoder.r24", "encoder.r40"}


@pytest.mark.heavy      # pared bench on the trained policy, closed loop (about 1 min per head)
@pytest.mark.parametrize("head", ["diffusion", "tokens"])
def test_bench_workload_with_no_passes_acts_like_eager(head, tmp_path, monkeypatch):
    """pared bench --workload vla_metaworld with an empty pipeline: the artifact
    acts in the simulator like the eager policy (same seeds, same actions)."""
    monkeypatch.setenv("MUJOCO_GL", os.environ.get("MUJOCO_GL", "egl"))
    from pared.workloads.bench import bench_workload
    out = tmp_path / "vla.json"
    r = bench_workload("vla_metaworld", pipeline=None, repeats=1, json_out=str(out),
                       workload_options={"head": head, "episodes": 1, "tasks": "reach-v3", "mse_steps": 8,
                                         "calls": 2, "max_steps": 80})
    f = r["fidelity"]
    assert f["episodes"] == 1 and f["heldout_steps"] == 8
    assert f["episode_outcomes_equal"] == 1.0
    assert f["success_optimized"] == f["success_reference"]
    assert f["mean_episode_len_optimized"] == f["mean_episode_len_reference"]
    assert f["action_max_abs_diff_vs_reference"] < (1e-4 if head == "diffusion" else 2 / 255)
    assert r["calls_per_task"] == 2 and r["speedup"]["vs_eager"] > 0
    assert json.loads(out.read_text())["workload"] == "vla_metaworld"


@pytest.mark.heavy
def test_lossless_speculative_decoding_acts_exactly_like_greedy_in_the_simulator(tmp_path, monkeypatch):
    """pared bench with examples/pipelines/vla_tokens_speculative.yaml: the workload switches to its
    loop decoder, and the artifact's actions equal eager greedy decoding's (same outcome, same
    chunks on the held-out steps) while calling the head fewer times."""
    monkeypatch.setenv("MUJOCO_GL", os.environ.get("MUJOCO_GL", "egl"))
    from pared.workloads.bench import bench_workload
    r = bench_workload("vla_metaworld", pipeline=os.path.join(EXAMPLES, "pipelines", "vla_tokens_speculative.yaml"),
                       repeats=1, json_out=str(tmp_path / "spec.json"),
                       workload_options={"head": "tokens", "episodes": 1, "tasks": "reach-v3", "mse_steps": 8,
                                         "calls": 2, "max_steps": 80, "calibration_steps": 64})
    f = r["fidelity"]
    assert f["episode_outcomes_equal"] == 1.0 and f["action_max_abs_diff_vs_reference"] == 0.0
    assert r["flops_per_task"]["optimized"] < r["flops_per_task"]["reference"], r["flops_per_task"]
    calls = r["graph_calls_per_call"]
    assert calls["reference"]["head"] == 16 and 1 <= calls["optimized"]["head"] < 16, calls


@pytest.mark.heavy
def test_bench_with_the_four_methods_on_one_artifact(tmp_path, monkeypatch):
    """pared bench with examples/pipelines/vla_four_composed.yaml: one artifact of the token policy
    in which the backbone reuses static tokens (token_reuse), the diffusion head of the same backbone
    drafts the tokens in a steps loop (speculative_decode's denoiser drafter) whose sub-blocks run
    BAC's schedule (action_cache), every linear runs int8 at 8 or 4 activation bits by the hand's
    speed (dynamic_precision), and the token head verifies; it acts in the simulator and the result
    reports each method's figures."""
    monkeypatch.setenv("MUJOCO_GL", os.environ.get("MUJOCO_GL", "egl"))
    from pared.workloads.bench import bench_workload
    r = bench_workload("vla_metaworld", pipeline=os.path.join(EXAMPLES, "pipelines", "vla_four_composed.yaml"),
                       repeats=1, json_out=str(tmp_path / "four.json"),
                       workload_options={"head": "tokens", "episodes": 1, "tasks": "reach-v3", "mse_steps": 8,
                                         "calls": 12, "max_steps": 60, "calibration_steps": 64})
    assert r["passes"] == ["token_reuse", "speculative_decode", "action_cache", "dynamic_precision"]
    f = r["fidelity"]
    assert f["episodes"] == 1 and f["action_mse_vs_reference"] < 0.05
    spec = r["speculative"]
    assert spec["drafter"] == "denoiser" and spec["radius"] == 0 and spec["lossless"]
    # over the 12 timed calls (one request: its first call cold), not the fidelity run's last call
    assert spec["calls"] == 12 and 1 <= spec["head_calls_per_call"] < 16 and spec["tokens_per_head_call"] > 1
    assert 0.2 < r["precision"]["memory_ratio"] < 0.35
    assert r["token_reuse"]["level_shares"]["cold"] > 0
    calls = r["graph_calls_per_call"]["optimized"]
    # the drafting head: 4 DDIM steps per call, each a BAC variant at one of the two widths
    drafts = {g: n for g, n in calls.items() if g.startswith("draft_head.")}
    assert sum(drafts.values()) == pytest.approx(4) and calls["draft.update"] == pytest.approx(4)
    assert any(".reuse" in g for g in drafts) and all(g.endswith((".a8", ".a4")) for g in drafts), drafts
    assert {g for g in calls if g.startswith("head")} <= {"head.a8", "head.a4"}
    assert sum(n for g, n in calls.items() if g.startswith("encoder.cold")) == pytest.approx(1 / 12)


def _import_train(monkeypatch):
    """examples/vla_metaworld/train.py, imported for this test only."""
    import importlib
    import sys
    monkeypatch.syspath_prepend(os.path.join(EXAMPLES, "vla_metaworld"))
    monkeypatch.setattr(sys, "path", list(sys.path))    # train.py prepends its folder too: undone after
    for name in ("train", "model"):             # other examples have a train.py / model.py too
        # set, then delete: monkeypatch then removes what this test imports under the bare names,
        # so a later test in this worker does not find vla_metaworld's model.py as `model`
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.delitem(sys.modules, name)
    train = importlib.import_module("train")
    assert os.path.dirname(train.__file__) == os.path.join(EXAMPLES, "vla_metaworld")
    return train


def test_repool_ports_the_pooled_policy_to_all_64_tokens(monkeypatch):
    """train.py --pool 1: every weight copied; each pooled token's backbone position embedding
    repeated over its 2x2 window (row r, col c of the 8x8 grid reads pooled (r // 2, c // 2));
    the ported backbone runs over all 64 visual tokens."""
    train = _import_train(monkeypatch)
    torch.manual_seed(0)
    old = train.VLAPolicy(train.VLAConfig())
    new = train.repool(old, 1)
    assert new.cfg.pool == 1 and old.cfg.pool == 2
    a, b = old.state_dict(), new.state_dict()
    assert set(a) == set(b)
    for k in a:
        if k != "backbone.pos":
            assert torch.equal(a[k], b[k]), k
    t = old.cfg.text_len
    pa, pb = a["backbone.pos"][0], b["backbone.pos"][0]
    assert pb.shape[0] == t + 64 + 2 and pa.shape[0] == t + 16 + 2
    assert torch.equal(pb[:t], pa[:t]) and torch.equal(pb[-2:], pa[-2:])
    for r in range(8):
        for c in range(8):
            assert torch.equal(pb[t + r * 8 + c], pa[t + (r // 2) * 4 + c // 2]), (r, c)
    with torch.no_grad():
        assert new.backbone.vit(torch.rand(1, 3, 64, 64)).shape[1] == 64


def test_widen_doubles_the_encoder_and_computes_the_same_function(monkeypatch, tmp_path):
    """train.py --widen: ViT and backbone at twice d_model and twice the heads (head width and
    heads unchanged); every width-d vector of the encoder is its old value twice, so cond is
    [cond, cond] and the action chunk is the same; the split inputs differ between the two
    copies (E != 0: training moves them apart). Stored as float16 (--half), the policy loads
    as float32 with exactly the stored values."""
    train = _import_train(monkeypatch)
    torch.manual_seed(0)
    old = train.VLAPolicy(train.VLAConfig(pool=1, backbone_layers=2)).eval()
    for p in old.head.parameters():             # the head starts at zero output (adaLN-Zero): give it some
        torch.nn.init.normal_(p, std=0.05)
    new = train.widen(old, torch.Generator().manual_seed(1)).eval()
    d = old.cfg.d_model
    assert (new.cfg.d_model, new.cfg.backbone_heads, new.cfg.n_heads, new.cfg.d_head) == (2 * d, 8, 4, 128)
    assert new.backbone.blocks[0].attn.h == 8 and new.head.blocks[0].attn.h == 4
    w = new.backbone.blocks[0].attn.proj.weight
    assert not torch.allclose(w[:, :d], w[:, d:])                      # the split halves differ
    torch.testing.assert_close(w[:, :d] + w[:, d:], old.backbone.blocks[0].attn.proj.weight.repeat(2, 1))
    img, txt, st = torch.rand(2, 3, 64, 64), torch.randint(1, 20, (2, 12)), torch.randn(2, 39)
    noise = torch.randn(2, 8, 4)
    with torch.no_grad():
        a, b = old.backbone(img, txt, st), new.backbone(img, txt, st)
        torch.testing.assert_close(b, torch.cat([a, a], 1), atol=2e-5, rtol=0)
        torch.testing.assert_close(new.sample(img, txt, st, noise), old.sample(img, txt, st, noise), atol=2e-5,
                                   rtol=0)
    path = str(tmp_path / "wide.safetensors")
    train.save_policy(path, new, {"state_mean": np.zeros(39)}, dtype=torch.float16)
    from safetensors.torch import load_file
    stored = load_file(path)
    assert stored["backbone.pos"].dtype == torch.float16
    back, _, _ = train.load_policy(path)
    assert back.cfg == new.cfg
    for k, v in back.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, stored[k].float()), k
