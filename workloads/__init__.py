"""The reference workloads: trained models from examples/, each with its full
task, the inputs it is captured with, and the fidelity figures that matter for it.

    wl = get_workload("dit_mnist", samples=40)
    model = wl.build()
    ref = wl.run(torch_callable(model))            # the whole fidelity run
    figures = wl.fidelity(ref, wl.run(executor))   # psnr_db, judge accuracy, ...

A workload's callables take and return numpy arrays, so the eager model (through
`torch_callable`) and a loaded `Executor` run the same task code.

    name            task (timed)                              fidelity
    dit_mnist       DDIM-50 sampling of one batch, CFG         psnr_db, judge_acc_*
    dit_moe_mnist   the same with the DiT-MoE                  psnr_db, judge_acc_*
    vit_mnist       classify one batch of held-out digits      top1_agreement, accuracy
    minilm          embed the 213-sentence corpus              cosine_min/mean, rank_agreement
    vla_metaworld   policy calls on held-out observations      closed-loop success rate in the
                                                               Meta-World simulator, action MSE

The model code and weights live in the source tree's `examples/<name>/`.

This package is the `workloads/` folder, imported as `pared.workloads` (with
`pared.workloads.data`, the MNIST digits, and `pared.workloads.samplers`, the
torch-free samplers). It sits above the library: it may import any of pared, and
nothing in ir/, analysis/, passes/, backends/ or pared's front door imports it
(only the CLI, whose `pared bench --workload` runs pared.workloads.bench;
pyproject.toml's import-linter contract).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from pared.analysis.metrics import psnr_db  # noqa: F401  (re-exported: workloads report it)
from pared.ir.errors import OptionError

Fn = Callable[..., Any]

#: seed of the calibration request, apart from the benchmark's seeds 0, 1, ...
CALIBRATION_SEED = 10_000

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "examples")


def example_module(name: str, file: str = "model.py"):
    """Import examples/<name>/<file> by path (once) and return the module."""
    path = os.path.join(EXAMPLES, name, file)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: the reference workloads live in the pared source tree's "
                                "examples/ (install pared from a checkout with `pip install -e .`)")
    key = f"pared_examples.{name}.{os.path.splitext(file)[0]}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]


def torch_callable(model: Any) -> Fn:
    """A torch module as a numpy callable (inference mode, float32 out)."""
    import torch

    def call(*arrays: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(*[torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])
        return out.detach().cpu().numpy()
    return call




class Workload:
    """Base: subclasses set `name`, `summary` and implement the methods below."""

    name = ""
    summary = ""
    #: model calls in one timed task, where per-call latency is what users quote
    #: (a policy call); None where the task itself is the unit (a sampler request)
    calls_per_task: int | None = None

    @property
    def pipeline(self) -> str | None:
        """The default pipeline file, examples/pipelines/<name>.yaml, if there is one."""
        p = os.path.join(EXAMPLES, "pipelines", f"{self.name}.yaml")
        return p if os.path.exists(p) else None

    def build(self) -> Any:
        """The trained eager model, in eval mode."""
        raise NotImplementedError

    def example_inputs(self) -> tuple:
        """Positional torch inputs with the shapes the task calls the model with."""
        raise NotImplementedError

    def dynamic_shapes(self) -> Any:
        """torch.export dynamic shapes for passes that need a dynamic batch (None: static)."""
        return None

    def calibration(self) -> list[tuple]:
        """A few more input tuples (held-out checks in optimize)."""
        return []

    def task(self, fn: Fn, reset: Callable[[], None] | None = None) -> Any:
        """The timed unit of work."""
        raise NotImplementedError

    def run(self, fn: Fn, reset: Callable[[], None] | None = None) -> Any:
        """The whole fidelity run (default: the task)."""
        return self.task(fn, reset)

    def fidelity(self, reference: Any, candidate: Any) -> dict[str, float]:
        raise NotImplementedError


class DiTWorkload(Workload):
    """Class-conditional DDIM sampling of 16x16 digits, scored by the judge.

    Sample i asks for class i % 10 and batch j starts from `initial_noise(seed=j)`,
    so every contender draws from the same noise.
    """

    def __init__(self, name: str = "dit_mnist", *, batch: int = 10, samples: int = 200, steps: int = 50,
                 cfg_scale: float = 1.5):
        if samples % batch:
            raise ValueError(f"samples ({samples}) must be a multiple of batch ({batch})")
        self.name, self.batch, self.samples, self.steps, self.cfg_scale = name, batch, samples, steps, cfg_scale
        self.summary = (f"{name}: DDIM-{steps} sampling, batch {batch}, CFG {cfg_scale} "
                        f"(fidelity on {samples} samples)")
        self._mod = example_module(name)

    @property
    def rows(self) -> int:
        return self.batch * (2 if self.cfg_scale != 1.0 else 1)

    def build(self):
        return self._mod.build_model()

    def example_inputs(self) -> tuple:
        import torch
        from pared.workloads.data import mnist
        from pared.workloads.samplers import NoiseSchedule
        x0, y = mnist("test", self._mod.SIZE)
        n = self.rows
        rng = np.random.default_rng(1)
        t = rng.integers(0, 1000, n)
        x = NoiseSchedule.linear().add_noise(x0[:n] * 2 - 1, rng.standard_normal(x0[:n].shape).astype(np.float32), t)
        return (torch.from_numpy(x), torch.from_numpy(t.astype(np.float32)), torch.from_numpy(y[:n].copy()))

    def dynamic_shapes(self) -> tuple:
        """torch.export dynamic shapes with a dynamic batch (dim 0) for (x, t, y)."""
        from torch.export import Dim
        b = Dim("batch", min=2, max=4096)
        return ({0: b}, {0: b}, {0: b})

    def calibration(self):
        """The calibration run: a loop callable that drives a denoiser `fn(x, t, y)`
        (torch tensors in and out) through one DDIM request of this workload
        (held-apart seed and labels), so that analyses see real consecutive steps."""
        import torch
        from pared.workloads.samplers import NoiseSchedule, ddim_sample

        def loop(fn):
            def call(x, t, y):
                out = fn(torch.from_numpy(x), torch.from_numpy(np.asarray(t, np.float32)), torch.from_numpy(y))
                return out.detach().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
            labels = (np.arange(self.batch) * 3 + 1) % 10
            return ddim_sample(call, (self.batch, 1, self._mod.SIZE, self._mod.SIZE), labels,
                               schedule=NoiseSchedule.linear(), steps=self.steps, cfg_scale=self.cfg_scale,
                               null_label=self._mod.NULL_LABEL, seed=CALIBRATION_SEED)
        return loop

    def labels(self, j: int) -> np.ndarray:
        return (np.arange(j * self.batch, (j + 1) * self.batch) % 10).astype(np.int64)

    def sample(self, fn: Fn, j: int, reset: Callable[[], None] | None = None) -> np.ndarray:
        from pared.workloads.samplers import NoiseSchedule, ddim_sample
        if reset is not None:
            reset()
        return ddim_sample(fn, (self.batch, 1, self._mod.SIZE, self._mod.SIZE), self.labels(j),
                           schedule=NoiseSchedule.linear(), steps=self.steps, cfg_scale=self.cfg_scale,
                           null_label=self._mod.NULL_LABEL, seed=j)

    def task(self, fn, reset=None):
        return self.sample(fn, 0, reset)

    def run(self, fn, reset=None):
        return np.concatenate([self.sample(fn, j, reset) for j in range(self.samples // self.batch)])

    @staticmethod
    def to_pixels(x: np.ndarray) -> np.ndarray:
        return np.clip((np.asarray(x) + 1) / 2, 0, 1).astype(np.float32)

    def all_labels(self) -> np.ndarray:
        return np.concatenate([self.labels(j) for j in range(self.samples // self.batch)])

    def judge(self, images: np.ndarray) -> dict:
        judge = example_module("judge")
        return judge.score(self.to_pixels(images), self.all_labels()[:len(images)])

    def fidelity(self, reference, candidate):
        ref_j, got_j = self.judge(reference), self.judge(candidate)
        return {"psnr_db": psnr_db(self.to_pixels(reference), self.to_pixels(candidate)),
                "judge_acc_reference": ref_j["accuracy"], "judge_acc_optimized": got_j["accuracy"],
                "judge_conf_reference": ref_j["confidence"], "judge_conf_optimized": got_j["confidence"],
                "samples": int(len(candidate))}


class ViTWorkload(Workload):
    """Classify the 500 held-out 28x28 digits in batches."""

    name = "vit_mnist"

    def __init__(self, *, batch: int = 100, samples: int = 500):
        if samples % batch:
            raise ValueError(f"samples ({samples}) must be a multiple of batch ({batch})")
        self.batch, self.samples = batch, samples
        self.summary = f"vit_mnist: classify batches of {batch} held-out digits ({samples} for fidelity)"
        self._mod = example_module(self.name)
        from pared.workloads.data import mnist
        self.x, self.y = mnist("test", 28)
        self.x, self.y = self.x[:samples], self.y[:samples]

    def build(self):
        return self._mod.build_model()

    def example_inputs(self):
        import torch
        return (torch.from_numpy(self.x[:self.batch].copy()),)

    def calibration(self):
        import torch
        return [(torch.from_numpy(self.x[self.batch:2 * self.batch].copy()),)] if self.samples > self.batch else []

    def task(self, fn, reset=None):
        return np.asarray(fn(self.x[:self.batch]))

    def run(self, fn, reset=None):
        return np.concatenate([np.asarray(fn(self.x[i:i + self.batch])) for i in range(0, self.samples, self.batch)])

    def fidelity(self, reference, candidate):
        r, c = np.argmax(reference, -1), np.argmax(candidate, -1)
        y = self.y[:len(c)]
        return {"top1_agreement": float(np.mean(r == c)), "accuracy_reference": float(np.mean(r == y)),
                "accuracy": float(np.mean(c == y)), "samples": int(len(c))}


class MiniLMWorkload(Workload):
    """Embed the sentence corpus (examples/minilm/corpus.txt) in fixed batches."""

    name = "minilm"

    def __init__(self, *, batch: int = 32, sentences: int | None = None):
        self._mod = example_module(self.name)
        with open(os.path.join(EXAMPLES, "minilm", "corpus.txt"), encoding="utf-8") as f:
            corpus = [s.strip() for s in f if s.strip()]
        self.corpus = corpus[:sentences] if sentences else corpus
        self.batch = batch
        self.summary = f"minilm: embed {len(self.corpus)} sentences in batches of {batch}"
        ids, mask = self._mod.tokenize(self.corpus)
        pad = (-len(self.corpus)) % batch           # fixed shapes: the last batch repeats the first rows
        self.ids = np.concatenate([ids.numpy(), ids.numpy()[:pad]])
        self.mask = np.concatenate([mask.numpy(), mask.numpy()[:pad]])

    def build(self):
        return self._mod.build_model()

    def example_inputs(self):
        import torch
        return (torch.from_numpy(self.ids[:self.batch]), torch.from_numpy(self.mask[:self.batch]))

    def calibration(self):
        import torch
        b = self.batch
        return [(torch.from_numpy(self.ids[b:2 * b]), torch.from_numpy(self.mask[b:2 * b]))] \
            if len(self.ids) > b else []

    def task(self, fn, reset=None):
        out = [np.asarray(fn(self.ids[i:i + self.batch], self.mask[i:i + self.batch]))
               for i in range(0, len(self.ids), self.batch)]
        return np.concatenate(out)[:len(self.corpus)]

    def fidelity(self, reference, candidate):
        r = reference / np.linalg.norm(reference, axis=1, keepdims=True)
        c = candidate / np.linalg.norm(candidate, axis=1, keepdims=True)
        cos = np.sum(r * c, axis=1)

        def neighbours(e):
            s = e @ e.T
            np.fill_diagonal(s, -np.inf)
            return np.argsort(-s, axis=1)[:, :5]
        nr, nc = neighbours(r), neighbours(c)
        return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                "rank_agreement": float(np.mean(nr[:, 0] == nc[:, 0])),
                "top5_overlap": float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(nr, nc)])),
                "sentences": int(len(candidate))}


#: vla_metaworld's policies: (weights file, how to train it)
POLICIES = {"base": ("vla_diffusion.safetensors", "train.py"),
            "large": ("vla_diffusion_large_head.npz", "train_large_head.py"),
            "all_tokens": ("vla_diffusion_64.safetensors", "train.py --pool 1 --init vla_diffusion.safetensors "
                                                           "--out vla_diffusion_64.safetensors"),
            "wide": ("vla_diffusion_64_wide.safetensors", "train.py --init vla_diffusion_64.safetensors --widen "
                                                          "--half --lr 1e-4 --warmup 100 "
                                                          "--out vla_diffusion_64_wide.safetensors")}


class VLAWorkload(Workload):
    """The Meta-World VLA policy (examples/vla_metaworld) acting in the simulator.

    The model is one policy call: observation (64x64 image, instruction ids,
    normalized 39-D state) -> an action chunk, with the head's loop unrolled in
    the graph — `head="diffusion"`: backbone + 10 DDIM steps of the diffusion head
    from a noise input, 8 actions; `head="tokens"`: backbone + greedy decoding of
    16 action tokens (4 actions x 4 dimensions, 256 bins).

    task (timed): `calls` policy calls (batch 1) on held-out demonstration
    observations. run (fidelity): every task x `episodes` closed-loop episodes
    with fixed evaluation seeds, the policy acting from its own observations
    (receding horizon: the first `execute` actions of each chunk, then a new
    call), plus the predicted chunks on `mse_steps` held-out demonstration steps.
    Diffusion noise is drawn from a per-episode seeded generator, so eager and an
    artifact that computes the same function take the same actions.

    `policy="large"`: the diffusion head of vla_diffusion_large_head.npz (4 blocks of width
    256, about 5x the FLOPs per step, trained on the same frozen backbone by
    train_large_head.py), for methods the shipped head is too small to show.
    `policy="all_tokens"`: vla_diffusion_64.safetensors, the diffusion policy whose backbone
    sees all 64 visual tokens (no 2x2 pooling; fine-tuned from the shipped policy by
    `train.py --pool 1`), for visual-token selection with more to select from.
    `policy="wide"`: vla_diffusion_64_wide.safetensors, that policy at twice the width (ViT and
    backbone d_model 256, 8 heads; the head as before): widened from it computing the same
    function, then fine-tuned (`train.py --widen`); 3.9x the encoder's parameters, for methods
    whose gain the 128-wide encoder's per-op overheads hide.

    `decoder="loop"` keeps the head's loop in the Plan instead of unrolling it, with the same
    actions: the token head as a `pared.ir.decode.Decoder` (backbone, head, detokenize; greedy
    decoding), which decoding passes (speculative_decode) rewrite; the diffusion head as a
    `pared.ir.denoise.Denoiser` (backbone; head + DDIM update per step; clamp), whose steps the
    cache passes (action_cache, interval_cache) schedule. Each episode is one
    request of the artifact (`reset` before it), so state a pass carries across policy calls
    (a Kalman drafter's) lives one episode. Calibration: `calibration_steps` observations
    spread over the training demonstration episodes (never the evaluation seeds).
    """

    name = "vla_metaworld"
    HOLDOUT_PER_TASK = 2          # examples/vla_metaworld/train.py holds out the last 2 episodes per task

    def __init__(self, *, head: str = "diffusion", episodes: int = 5, tasks: Sequence[str] | str | None = None,
                 max_steps: int = 200, execute: int | None = None, calls: int = 8, mse_steps: int = 64,
                 decoder: str = "unrolled", calibration_steps: int = 1024, policy: str = "base"):
        if head not in ("diffusion", "tokens"):
            raise OptionError(f"workload 'vla_metaworld': option 'head' must be 'diffusion' or 'tokens', got {head!r}")
        if decoder not in ("unrolled", "loop"):
            raise OptionError(f"workload 'vla_metaworld': option 'decoder' must be 'unrolled' or 'loop', got {decoder!r}")
        if not isinstance(calibration_steps, int) or calibration_steps < 1:
            raise OptionError("workload 'vla_metaworld': option 'calibration_steps' must be a positive integer, "
                              f"got {calibration_steps!r}")
        if policy not in POLICIES:
            raise OptionError(f"workload 'vla_metaworld': option 'policy' must be one of {list(POLICIES)}, got "
                              f"{policy!r}")
        if policy != "base" and head != "diffusion":
            raise OptionError(f"workload 'vla_metaworld': option policy={policy!r} is a diffusion policy "
                              "(head='diffusion')")
        self.policy = policy
        self.decoder, self.calibration_steps = decoder, calibration_steps
        for opt, v in (("episodes", episodes), ("max_steps", max_steps), ("calls", calls)):
            if not isinstance(v, int) or v < 1:
                raise OptionError(f"workload 'vla_metaworld': option '{opt}' must be a positive integer, got {v!r}")
        self.head, self.episodes, self.max_steps, self.calls, self.mse_steps = head, episodes, max_steps, calls, mse_steps
        self._mod = example_module(self.name)
        self._dir = os.path.join(EXAMPLES, self.name)
        self.weights = os.path.join(self._dir, "vla_diffusion.safetensors")
        self.policy_weights = os.path.join(self._dir, POLICIES[policy][0])
        if not os.path.exists(self.policy_weights):
            raise FileNotFoundError(f"{self.policy_weights} not found: train it with "
                                    f"examples/vla_metaworld/{POLICIES[policy][1]}")
        self.token_weights = os.path.join(self._dir, "vla_tokens.safetensors")
        meta = self._metadata(self.weights)
        cfg = json.loads(meta["config"])
        stats = json.loads(meta["stats"])
        self.mean = np.asarray(stats["state_mean"], np.float32)
        self.std = np.asarray(stats["state_std"], np.float32)
        self.text_len, self.action_dim = cfg["text_len"], cfg["action_dim"]
        if head == "diffusion":
            self.horizon = cfg["horizon"]
            self.execute = 4 if execute is None else execute
        else:
            if not os.path.exists(self.token_weights):
                raise FileNotFoundError(f"{self.token_weights} not found: train it with "
                                        "examples/vla_metaworld/train_tokens.py")
            self.horizon = json.loads(self._metadata(self.token_weights)["config"])["horizon"]
            self.execute = self.horizon if execute is None else execute
        if not 1 <= self.execute <= self.horizon:
            raise OptionError(f"workload 'vla_metaworld': option 'execute' must be in 1..{self.horizon} "
                              f"(the {head} head predicts {self.horizon} actions), got {self.execute}")
        self._tasks_mod = None
        names = self.tasks_module().TASK_NAMES
        if isinstance(tasks, str):
            tasks = [t for t in tasks.split(",") if t]
        self.task_names = list(tasks) if tasks else list(names)
        unknown = [t for t in self.task_names if t not in names]
        if unknown:
            raise OptionError(f"workload 'vla_metaworld': unknown task(s) {unknown} (known: {', '.join(names)})")
        self.summary = (f"vla_metaworld ({head} head): {calls} policy calls timed; closed loop "
                        f"{episodes} episode(s) x {len(self.task_names)} task(s), max {max_steps} steps, "
                        f"{self.execute} action(s) executed per call")
        self._demos = None
        self._envs: dict = {}

    @property
    def calls_per_task(self) -> int:
        """Policy calls in one timed task (timings / calls = latency per call)."""
        return self.calls

    @staticmethod
    def _metadata(path: str) -> dict:
        from safetensors import safe_open
        with safe_open(path, "np") as f:
            return f.metadata()

    def tasks_module(self):
        if self._tasks_mod is None:
            os.environ.setdefault("MUJOCO_GL", "egl")           # headless rendering
            self._tasks_mod = example_module(self.name, "tasks.py")
        return self._tasks_mod

    @property
    def pipeline(self) -> str | None:
        p = os.path.join(EXAMPLES, "pipelines", f"{self.name}_{self.head}.yaml")
        return p if os.path.exists(p) else None

    def build(self):
        M = self._mod
        if self.policy == "large":        # a head file on the shipped (frozen) backbone
            policy, _, _ = M.load_head_npz(self.policy_weights, self.weights)
        else:
            policy, _, _ = M.load_policy(self.policy_weights)
        policy.eval()
        if self.head == "diffusion":
            if self.decoder == "loop":
                return M.diffusion_denoiser(policy).eval()
            return M.DiffusionPolicyCall(policy).eval()
        head, _ = M.load_token_head(self.token_weights, check_backbone=self.weights)
        if self.decoder == "loop":
            from pared.ir.decode import Decoder
            cfg = head.cfg
            return Decoder(policy.backbone, head, cfg.n_tokens, M.Detokenize(cfg.bins, cfg.action_dim)).eval()
        return M.TokenPolicyCall(policy.backbone, head).eval()

    # -- observations -----------------------------------------------------------------------------
    def demos(self) -> dict:
        if self._demos is None:
            d = np.load(os.path.join(self._dir, "data", "demos.npz"))
            self._demos = {k: d[k] for k in ("images", "states", "actions", "task_id", "episode",
                                             "episode_task", "episode_len", "instructions")}
        return self._demos

    def heldout_steps(self, n: int) -> np.ndarray:
        """n step indices spread over the held-out demonstration episodes."""
        d = self.demos()
        eps = [e for tid in np.unique(d["episode_task"])
               for e in np.nonzero(d["episode_task"] == tid)[0][-self.HOLDOUT_PER_TASK:]]
        idx = np.nonzero(np.isin(d["episode"], eps))[0]
        return idx[np.linspace(0, len(idx) - 1, n).round().astype(int)]

    def replay_sequences(self, per_task: int = 2, calls: int = 12) -> list[list[tuple]]:
        """Policy-call inputs along held-out demonstration episodes: for `per_task` episodes of each
        task, the observations at every `execute`-th step from the start (at most `calls`), as a
        closed-loop run would see them; one list per episode (one request)."""
        d = self.demos()
        out = []
        for tid in np.unique(d["episode_task"]):
            for e in np.nonzero(d["episode_task"] == tid)[0][-self.HOLDOUT_PER_TASK:][:per_task]:
                idx = np.nonzero(d["episode"] == e)[0][::self.execute][:calls]
                out.append([self._demo_inputs(int(i)) for i in idx])
        return out

    def calibration_sequences(self, per_task: int = 2, calls: int = 30) -> list[list[tuple]]:
        """Policy-call inputs along training demonstration episodes (never the held-out ones): for
        the first `per_task` episodes of each task, the observations at every `execute`-th step from
        the start (at most `calls`), in time order; one list per episode. For calibrations that need
        consecutive calls (an offload trigger's anomaly scores), as torch tensors."""
        import torch
        d = self.demos()
        out = []
        for tid in np.unique(d["episode_task"]):
            eps = np.nonzero(d["episode_task"] == tid)[0][:-self.HOLDOUT_PER_TASK][:per_task]
            for e in eps:
                idx = np.nonzero(d["episode"] == e)[0][::self.execute][:calls]
                out.append([tuple(torch.from_numpy(a) for a in self._demo_inputs(int(i))) for i in idx])
        return out

    def train_steps(self, n: int) -> np.ndarray:
        """n step indices spread over the training demonstration episodes (not the held-out ones)."""
        d = self.demos()
        held = self.heldout_steps(len(d["episode"]))
        idx = np.setdiff1d(np.arange(len(d["episode"])), held)
        return idx[np.linspace(0, len(idx) - 1, min(n, len(idx))).round().astype(int)]

    def text_ids(self, instruction: str) -> np.ndarray:
        return self._mod.tokenize(str(instruction), self.text_len)[None]

    def inputs(self, image: np.ndarray, instruction: str, state: np.ndarray, noise_seed: int | None) -> tuple:
        """Model inputs for one observation: (image HWC uint8, instruction, raw state)."""
        img = (np.ascontiguousarray(image.transpose(2, 0, 1))[None].astype(np.float32) / 255.0)
        st = ((np.asarray(state, np.float32) - self.mean) / self.std)[None].astype(np.float32)
        args = (img, self.text_ids(instruction), st)
        if self.head == "diffusion":
            rng = np.random.default_rng(noise_seed)
            args += (rng.standard_normal((1, self.horizon, self.action_dim)).astype(np.float32),)
        return args

    def _demo_inputs(self, i: int) -> tuple:
        d = self.demos()
        return self.inputs(d["images"][i], d["instructions"][d["task_id"][i]], d["states"][i], noise_seed=int(i))

    def example_inputs(self):
        import torch
        return tuple(torch.from_numpy(a) for a in self._demo_inputs(int(self.heldout_steps(1)[0])))

    def calibration(self):
        import torch
        return [tuple(torch.from_numpy(a) for a in self._demo_inputs(int(i)))
                for i in self.train_steps(self.calibration_steps)]

    # -- the timed task and the closed-loop fidelity run -----------------------------------------
    def task(self, fn, reset=None):
        if reset is not None:
            reset()
        return np.stack([np.asarray(fn(*self._demo_inputs(int(i))))[0] for i in self.heldout_steps(self.calls)])

    def episode(self, fn, task_id: int, ep: int, reset: Callable[[], None] | None = None) -> dict:
        """One closed-loop episode: one request of `fn` (`reset` before it)."""
        if reset is not None:
            reset()
        T = self.tasks_module()
        if task_id not in self._envs:                          # one simulator and camera per task
            sim = T.make_env(task_id)
            self._envs[task_id] = (sim, T.Camera(sim))
        sim, cam = self._envs[task_id]
        seed = T.episode_seed(task_id, ep, T.EVAL_SEED_BASE)
        obs = T.reset_episode(sim, seed)
        queue: list = []
        call_s: list[float] = []
        success, steps, calls = False, self.max_steps, 0
        for t in range(self.max_steps):
            if not queue:
                args = self.inputs(cam(), T.INSTRUCTIONS[task_id], obs, noise_seed=seed * 1000 + calls)
                t0 = time.perf_counter()
                chunk = np.asarray(fn(*args))[0]
                call_s.append(time.perf_counter() - t0)
                calls += 1
                queue = list(chunk[:self.execute])
            obs, _, _, _, info = sim.step(np.clip(queue.pop(0), -1, 1).astype(np.float32))
            obs = obs.astype(np.float32)
            if info["success"]:
                success, steps = True, t + 1
                break
        return {"success": success, "steps": steps, "call_s": call_s}

    def run(self, fn, reset=None):
        T = self.tasks_module()
        episodes = {}
        for name in self.task_names:
            tid = T.TASK_NAMES.index(name)
            episodes[name] = [self.episode(fn, tid, ep, reset) for ep in range(self.episodes)]
        steps = self.heldout_steps(self.mse_steps)

        def one(i):               # each held-out observation is a request of its own
            if reset is not None:
                reset()
            return np.asarray(fn(*self._demo_inputs(int(i))))[0]
        chunks = np.stack([one(i) for i in steps])
        for sim, cam in self._envs.values():
            cam.close()
        self._envs = {}
        return {"episodes": episodes, "heldout_chunks": chunks, "heldout_steps": steps}

    def fidelity(self, reference, candidate):
        d = self.demos()

        def rates(r):
            per = {k: float(np.mean([e["success"] for e in v])) for k, v in r["episodes"].items()}
            return per, float(np.mean(list(per.values())))

        def lengths(r):
            return float(np.mean([e["steps"] for v in r["episodes"].values() for e in v]))

        def call_ms(r):
            return 1e3 * float(np.median([s for v in r["episodes"].values() for e in v for s in e["call_s"]]))

        ref_per, ref_all = rates(reference)
        got_per, got_all = rates(candidate)
        a, b = reference["heldout_chunks"], candidate["heldout_chunks"]
        n = min(a.shape[1], b.shape[1])
        starts = np.concatenate([[0], np.cumsum(d["episode_len"])[:-1]])
        ends = (starts + d["episode_len"] - 1)[d["episode"][candidate["heldout_steps"]]]
        idx = np.minimum(candidate["heldout_steps"][:, None] + np.arange(n)[None], ends[:, None])
        expert = d["actions"][idx]
        same = sum(ea["success"] == eb["success"] for k in reference["episodes"]
                   for ea, eb in zip(reference["episodes"][k], candidate["episodes"][k]))
        total = sum(len(v) for v in reference["episodes"].values())
        return {"success_reference": ref_all, "success_optimized": got_all,
                "success_per_task_reference": ref_per, "success_per_task_optimized": got_per,
                "episode_outcomes_equal": same / total,
                "mean_episode_len_reference": lengths(reference), "mean_episode_len_optimized": lengths(candidate),
                "policy_call_ms_reference": call_ms(reference), "policy_call_ms_optimized": call_ms(candidate),
                "action_mse_vs_reference": float(np.mean((a[:, :n] - b[:, :n]) ** 2)),
                "action_max_abs_diff_vs_reference": float(np.max(np.abs(a[:, :n] - b[:, :n]))),
                "action_mse_vs_expert_reference": float(np.mean((a[:, :n] - expert) ** 2)),
                "action_mse_vs_expert_optimized": float(np.mean((b[:, :n] - expert) ** 2)),
                "heldout_steps": int(len(b)), "episodes": int(total)}


class VideoARWorkload(Workload):
    """Streamed video generation (examples/video_ar): rollouts of moving-digit clips frame by
    frame, the step's KV cache kept by a pared.ir.stream.Streamer.

    The model is the Streamer with the full cache of a `frames`-frame rollout (every earlier
    frame kept); a pipeline changes what is kept (kv_policy, kv_drop). task (timed): one
    rollout of `batch` held-out clips (test seeds 0..batch-1), `frames` frames (2 true context
    frames, the rest generated, `steps` DDIM steps each). run (fidelity): the rollout of `samples`
    held-out clips, measured per frame position by examples/video_ar/quality.py for the
    reference and the candidate: identity (the judge on each tracked digit), velocity error
    against the physics, PSNR; means over the training length, up to 4x and 4x-8x.
    calibration: a loop rolling out `batch` training clips for `calib_frames` frames (the batch
    of the example inputs: the captured step's batch is static).
    """

    name = "video_ar"

    def __init__(self, *, batch: int = 8, frames: int = 64, steps: int = 8, samples: int = 32,
                 calib_frames: int = 32):
        mdl = example_module("video_ar")
        if frames <= mdl.CONTEXT_FRAMES:
            raise OptionError(f"video_ar: frames must exceed the {mdl.CONTEXT_FRAMES} context frames, got {frames}")
        self.batch, self.frames, self.steps, self.clips = batch, frames, steps, samples
        self.calib_frames = calib_frames
        self.prev = int(mdl.weights_meta().get("prev_frames", 0))    # the step also reads its last frames
        self.summary = (f"video_ar: {frames}-frame rollouts ({frames / mdl.TRAIN_FRAMES:g}x the training length) of "
                        f"{batch} held-out clips, DDIM {steps} steps per frame, full KV cache of {frames} frames")

    def _context(self, n: int, split: str, frames: int) -> tuple[np.ndarray, list]:
        data, mdl = example_module("video_ar", "data.py"), example_module("video_ar")
        clips = [data.video(i, frames, split) for i in range(n)]
        ctx = np.stack([c.frames[:mdl.CONTEXT_FRAMES] for c in clips]) * 2 - 1
        return ctx.astype(np.float32), clips

    def build(self):
        mdl, st = example_module("video_ar"), example_module("video_ar", "stream.py")
        return st.streamer(mdl.build_model(), frames=self.frames)

    def example_inputs(self) -> tuple:
        return example_module("video_ar", "stream.py").example_inputs(self.batch, self.prev)

    def calibration(self):
        st = example_module("video_ar", "stream.py")
        ctx, _ = self._context(self.batch, "train", self.calib_frames)

        def loop(fn):
            return st.rollout(st.torch_call(fn), ctx, self.calib_frames, steps=self.steps, seed=1,
                              prev_frames=self.prev)
        return loop

    def task(self, fn, reset=None):
        st = example_module("video_ar", "stream.py")
        if reset is not None:
            reset()
        ctx, _ = self._context(self.batch, "test", self.frames)
        return st.rollout(fn, ctx, self.frames, steps=self.steps, seed=0, prev_frames=self.prev)

    def run(self, fn, reset=None):
        st = example_module("video_ar", "stream.py")
        outs = []
        ctx, _ = self._context(self.clips, "test", self.frames)
        for i in range(0, self.clips, self.batch):
            if reset is not None:
                reset()
            outs.append(st.rollout(fn, ctx[i:i + self.batch], self.frames, steps=self.steps, seed=i,
                                   prev_frames=self.prev))
        return np.concatenate(outs)

    def fidelity(self, reference, candidate):
        q, mdl = example_module("video_ar", "quality.py"), example_module("video_ar")
        _, clips = self._context(self.clips, "test", self.frames)
        judge = example_module("judge").load_judge()
        px = lambda v: (np.clip(v, -1, 1) + 1) / 2             # noqa: E731
        ref, got = q.measure(px(reference), clips, judge), q.measure(px(candidate), clips, judge)
        k, tr = mdl.CONTEXT_FRAMES, mdl.TRAIN_FRAMES
        spans = {"train_length": (k, tr), "to_4x": (tr, min(self.frames, 4 * tr)),
                 "4x_to_8x": (4 * tr, self.frames)}
        out: dict[str, Any] = {}
        for name, (a, b) in spans.items():
            if b <= a:
                continue
            for m in ("identity", "velocity_error", "psnr_db"):
                out[f"{m}_{name}_reference"] = round(float(np.mean(ref[m][a:b])), 4)
                out[f"{m}_{name}_optimized"] = round(float(np.mean(got[m][a:b])), 4)
        diff = np.abs(reference - candidate)
        out["max_abs_diff_vs_reference"] = float(diff.max())
        out["per_frame"] = {"reference": {m: ref[m] for m in ("identity", "velocity_error", "psnr_db")},
                            "optimized": {m: got[m] for m in ("identity", "velocity_error", "psnr_db")}}
        return out


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "dit_mnist": lambda **kw: DiTWorkload("dit_mnist", **kw),
    "dit_moe_mnist": lambda **kw: DiTWorkload("dit_moe_mnist", **kw),
    "vit_mnist": ViTWorkload,
    "minilm": MiniLMWorkload,
    "vla_metaworld": VLAWorkload,
    "video_ar": VideoARWorkload,
}


def get_workload(name: str, **options: Any) -> Workload:
    """A workload by name, with size options (batch, samples, steps, cfg_scale, sentences)."""
    if name not in WORKLOADS:
        import difflib
        close = difflib.get_close_matches(name, list(WORKLOADS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise OptionError(f"unknown workload '{name}'{hint} (known: {', '.join(WORKLOADS)})")
    try:
        return WORKLOADS[name](**options)
    except TypeError as e:
        if "unexpected keyword" not in str(e):
            raise
        raise OptionError(f"workload '{name}' does not take option(s) {sorted(options)}: {e}") from None
