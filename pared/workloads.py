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

The model code and weights live in the source tree's `examples/<name>/`.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np

from pared.analysis.metrics import psnr_db  # noqa: F401  (re-exported: workloads report it)
from pared.ir.errors import OptionError

Fn = Callable[..., Any]

#: seed of the calibration request, apart from the benchmark's seeds 0, 1, ...
CALIBRATION_SEED = 10_000

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


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
        from pared.data import mnist
        from pared.samplers import NoiseSchedule
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
        from pared.samplers import NoiseSchedule, ddim_sample

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
        from pared.samplers import NoiseSchedule, ddim_sample
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
        from pared.data import mnist
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


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "dit_mnist": lambda **kw: DiTWorkload("dit_mnist", **kw),
    "dit_moe_mnist": lambda **kw: DiTWorkload("dit_moe_mnist", **kw),
    "vit_mnist": ViTWorkload,
    "minilm": MiniLMWorkload,
}


def get_workload(name: str, **options: Any) -> Workload:
    """A workload by name, with size options (batch, samples, steps, cfg_scale, sentences)."""
    if name not in WORKLOADS:
        import difflib
        close = difflib.get_close_matches(name, list(WORKLOADS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise OptionError(f"unknown workload '{name}'{hint} (known: {', '.join(WORKLOADS)})")
    return WORKLOADS[name](**options)
