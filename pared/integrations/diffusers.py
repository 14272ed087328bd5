"""Optimize a diffusers pipeline's denoiser in one call, calibrated by the pipeline itself.

    import pared.integrations.diffusers as pd
    opt = pd.optimize_pipeline(pipe, calibration=[{"class_labels": [1, 3], "num_inference_steps": 20}],
                               pipeline=[{"taylor_cache": {"steps": 20}}], target="cpu")
    images = pipe(class_labels=[1, 3], num_inference_steps=20, output_type="np").images
    opt.save("dit_taylor")                        # later: pd.use_artifact(pipe, "dit_taylor")

The pipeline's denoiser (`pipe.transformer`, or `pipe.unet`) is captured as the pipeline calls
it (its first call in the first calibration request, `return_dict=False`); the calibration
passes see every call of every calibration request, run by the pipeline itself (its scheduler,
its guidance, its step count); then `pipe`'s denoiser is replaced by a module that runs the
artifact (torch-free inside: ONNX Runtime or TVM), and each call of `pipe(...)` is one request
of the artifact's plan (its cache state starts fresh). The user's denoiser module is not changed;
`pipe` is: its denoiser attribute, and its class becomes a subclass whose `__call__` resets the
request first. The artifact takes the shapes of the calibration calls (batch, resolution, the
doubled batch of classifier-free guidance); another shape is refused by the Executor, naming
the input.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from pared.api import Optimized, flat_tensors, optimize

#: the pipeline attributes a denoiser may live under, in the order they are looked for
DENOISERS = ("transformer", "unet")


def denoiser_name(pipe: Any) -> str:
    """The attribute of `pipe` holding its denoiser.

    Raises:
        ValueError: `pipe` has none of DENOISERS as an nn.Module.
    """
    for name in DENOISERS:
        if isinstance(getattr(pipe, name, None), nn.Module):
            return name
    raise ValueError(f"{type(pipe).__name__} has no denoiser module under {' or '.join(DENOISERS)}; pass a "
                     "diffusers pipeline built with a transformer or a U-Net")


class _Calling(nn.Module):
    """Stands in for the denoiser while the pipeline runs: each call goes to `fn` (the eager
    denoiser itself, called as the pipeline called it, or a runner of flat tensors), and the
    result comes back in the form the pipeline asked for (its output class with return_dict)."""

    def __init__(self, denoiser: nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.fn = fn
        self.config = getattr(denoiser, "config", None)
        object.__setattr__(self, "_denoiser", denoiser)         # not a submodule: its parameters stay its own
        self.calls: list[tuple[tuple, dict]] = []

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return_dict = kwargs.pop("return_dict", True)
        self.calls.append((args, dict(kwargs)))
        if self.fn is self._denoiser:
            out = self.fn(*args, **kwargs, return_dict=False)
        else:
            out = self.fn(*flat_tensors(args, kwargs))
        out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        out = tuple(torch.as_tensor(o) if isinstance(o, np.ndarray) else o for o in out)
        if not return_dict:
            return out
        from diffusers.models.modeling_outputs import Transformer2DModelOutput
        return Transformer2DModelOutput(sample=out[0])


@contextlib.contextmanager
def _denoiser_as(pipe: Any, name: str, stand_in: nn.Module) -> Iterator[None]:
    """`pipe` with its denoiser attribute set to `stand_in` for the block, then set back."""
    before = getattr(pipe, name)
    object.__setattr__(pipe, name, stand_in)
    try:
        yield
    finally:
        object.__setattr__(pipe, name, before)


def _request(pipe: Any, call: Mapping[str, Any], index: int) -> dict:
    """One calibration request's pipeline kwargs, made anew for each run of the loop: a generator
    seeded by the request's index unless it brings a seed of its own (`"seed": n`; so every run
    draws the same noise), and tensors out (output_type "pt")."""
    out = dict(call)
    if "generator" in out:
        raise ValueError("optimize_pipeline: a calibration request gives `seed` (an int), not `generator`: the "
                         "loop runs each request several times and must draw the same noise each time")
    out["generator"] = torch.Generator().manual_seed(int(out.pop("seed", index)))
    out.setdefault("output_type", "pt")
    return out


def optimize_pipeline(pipe: Any, *, calibration: Sequence[Mapping[str, Any]], pipeline: Any = None,
                      target: Any = "cpu", **options: Any) -> Optimized:
    """Optimize `pipe`'s denoiser with pared, calibrated by running `pipe` on `calibration`, and
    put the artifact in its place (see the module docstring).

    Args:
        calibration: the pipeline's keyword arguments for each calibration request
            (`{"class_labels": [1, 3], "num_inference_steps": 20}`, with `"seed": n` for its
            noise, default its index); the first also gives the example call the denoiser
            is captured on.
        pipeline, target, options: as `pared.optimize` takes them (`fidelity`, `holdout`,
            `allow_fidelity_loss`, ...); fidelity is judged on the whole first request's output.
    Returns:
        The Optimized (its `save(path)` writes the artifact; `use_artifact` loads it into a pipeline).
    Raises:
        ValueError: no calibration request, or no denoiser in `pipe`.
    """
    if not calibration:
        raise ValueError("optimize_pipeline: give at least one calibration request (the pipeline's kwargs, e.g. "
                         "{'class_labels': [1, 3], 'num_inference_steps': 20})")
    name = denoiser_name(pipe)
    denoiser = getattr(pipe, name)
    pipe.set_progress_bar_config(disable=True)
    # the example: the first call of the first request, as the pipeline makes it
    recorder = _Calling(denoiser, denoiser)
    with _denoiser_as(pipe, name, recorder), torch.no_grad():
        pipe(**_request(pipe, calibration[0], 0))
    if not recorder.calls:
        raise ValueError(f"optimize_pipeline: {type(pipe).__name__} never called its {name}")
    args, kwargs = recorder.calls[0]

    def loop(fn: Callable[..., Any]) -> Any:
        """Every calibration request through the pipeline, the denoiser's calls going to `fn`;
        returns the first request's output (what fidelity is judged on)."""
        outs = []
        with _denoiser_as(pipe, name, _Calling(denoiser, fn)), torch.no_grad():
            for i, call in enumerate(calibration):
                result = pipe(**_request(pipe, call, i))
                outs.append(result[0] if isinstance(result, tuple) else getattr(result, "images", result))
        return outs[0]

    opt = optimize(denoiser, args, kwargs={**kwargs, "return_dict": False}, pipeline=pipeline, target=target,
                   calibration=loop, **options)
    _install(pipe, name, denoiser, opt.executor)
    return opt


def use_artifact(pipe: Any, path: str, **load_options: Any) -> Any:
    """Put the artifact saved at `path` (an Optimized's `save`) in place of `pipe`'s denoiser; returns
    `pipe`. The artifact must have been built for this pipeline's denoiser and call shapes."""
    import pared
    name = denoiser_name(pipe)
    _install(pipe, name, getattr(pipe, name), pared.load(path, **load_options))
    return pipe


def _install(pipe: Any, name: str, denoiser: nn.Module, executor: Any) -> None:
    """`pipe` runs `executor` in place of its denoiser, one request per `pipe(...)` call."""
    def run(*flat: torch.Tensor) -> list[np.ndarray]:
        return executor.run_flat(*[t.detach().cpu().numpy() for t in flat])

    stand_in = _Calling(denoiser, run)
    stand_in.executor = executor
    object.__setattr__(pipe, name, stand_in)
    cls = type(pipe)
    if not getattr(cls, "_pared_resets", False):
        def __call__(self, *a: Any, **kw: Any) -> Any:
            executor = getattr(getattr(self, name), "executor", None)
            if executor is not None:
                executor.reset()                          # a new generation: the plan's request state starts fresh
            return cls.__call__(self, *a, **kw)
        pipe.__class__ = type(f"Pared{cls.__name__}", (cls,), {"__call__": __call__, "_pared_resets": True})
