"""Samplers that run without torch: DDIM (eta = 0) and flow-matching Euler, with
classifier-free guidance, in numpy.

A sampler drives any *denoiser*: a callable `denoiser(x, t, y) -> prediction`
on numpy arrays (x: [B, C, H, W] float32, t: [B] float32 timesteps, y: [B]
int64 class labels). The eager model goes in through `TorchDenoiser`; a loaded
`Executor` (or an `Optimized`) is such a callable already.

    sched = NoiseSchedule.linear(1000)
    x = ddim_sample(denoiser, (8, 1, 16, 16), labels, schedule=sched, steps=50,
                    cfg_scale=1.5, null_label=10, seed=0)

Guidance runs the conditional and unconditional halves as one batch of 2B
(conditional rows first), as DiT does; with cfg_scale == 1 only the
conditional half runs. `on_step(i, t)` is called before each denoiser call:
a cache plan that decides per step hears the step index there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

Denoiser = Callable[[np.ndarray, np.ndarray, np.ndarray], Any]


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete DDPM noise schedule: betas and their cumulative alpha product (float64)."""

    betas: np.ndarray

    @property
    def num_train_timesteps(self) -> int:
        return int(len(self.betas))

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
               ) -> "NoiseSchedule":
        return cls(np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64))

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, s: float = 0.008) -> "NoiseSchedule":
        """The squared-cosine schedule of Nichol & Dhariwal, betas clipped at 0.999."""
        steps = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
        f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
        return cls(np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999))

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, t: np.ndarray) -> np.ndarray:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (per row)."""
        a = self.alphas_cumprod[np.asarray(t)].reshape(-1, *([1] * (x0.ndim - 1)))
        return (np.sqrt(a) * x0 + np.sqrt(1.0 - a) * noise).astype(x0.dtype)


def ddim_timesteps(num_train_timesteps: int, steps: int) -> np.ndarray:
    """`steps` timesteps, descending, evenly spaced with the last at 0 ("leading" spacing)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    ratio = num_train_timesteps // steps
    return (np.arange(steps) * ratio)[::-1].astype(np.int64)


def initial_noise(shape: Sequence[int], seed: int) -> np.ndarray:
    """The starting noise of a sampler run: standard normal from numpy's PCG64, float32."""
    return np.random.default_rng(seed).standard_normal(tuple(shape)).astype(np.float32)


def _guided(denoiser: Denoiser, x: np.ndarray, t: float, labels: np.ndarray, cfg_scale: float,
            null_label: int | None) -> np.ndarray:
    b = x.shape[0]
    if cfg_scale == 1.0:
        out = denoiser(x, np.full((b,), t, np.float32), labels)
        return np.asarray(out, dtype=np.float32)
    if null_label is None:
        raise ValueError("cfg_scale != 1 needs null_label (the unconditional class index)")
    xx = np.concatenate([x, x], axis=0)
    yy = np.concatenate([labels, np.full_like(labels, null_label)], axis=0)
    out = np.asarray(denoiser(xx, np.full((2 * b,), t, np.float32), yy), dtype=np.float32)
    cond, uncond = out[:b], out[b:]
    return uncond + cfg_scale * (cond - uncond)


def _labels(labels: Sequence[int] | np.ndarray, b: int) -> np.ndarray:
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if y.shape[0] != b:
        raise ValueError(f"{y.shape[0]} labels for a batch of {b}")
    return y


def ddim_sample(denoiser: Denoiser, shape: Sequence[int], labels: Sequence[int] | np.ndarray, *,
                schedule: NoiseSchedule, steps: int = 50, cfg_scale: float = 1.0,
                null_label: int | None = None, seed: int = 0, noise: np.ndarray | None = None,
                clip_x0: float | None = None,
                on_step: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Deterministic DDIM (eta = 0) with an epsilon-predicting denoiser; returns x_0 (float32).

    `clip_x0`: clamp each step's x_0 prediction to [-clip_x0, clip_x0] (data in
    [-1, 1]), as diffusers' DDIMScheduler `clip_sample` does;
    None (the default here) leaves it unclamped. The noise direction uses the
    unclipped prediction."""
    x = initial_noise(shape, seed) if noise is None else np.array(noise, dtype=np.float32)
    y = _labels(labels, x.shape[0])
    abar = schedule.alphas_cumprod
    ts = ddim_timesteps(schedule.num_train_timesteps, steps)
    for i, t in enumerate(ts):
        if on_step is not None:
            on_step(i, int(t))
        eps = _guided(denoiser, x, float(t), y, cfg_scale, null_label)
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        x0 = (x - np.sqrt(1.0 - a_t) * eps) / np.sqrt(a_t)
        if clip_x0 is not None:
            x0 = np.clip(x0, -clip_x0, clip_x0)
        x = (np.sqrt(a_prev) * x0 + np.sqrt(1.0 - a_prev) * eps).astype(np.float32)
    return x


def flow_euler_sample(denoiser: Denoiser, shape: Sequence[int], labels: Sequence[int] | np.ndarray, *,
                      steps: int = 50, cfg_scale: float = 1.0, null_label: int | None = None,
                      seed: int = 0, noise: np.ndarray | None = None, time_scale: float = 1000.0,
                      on_step: Callable[[int, float], None] | None = None) -> np.ndarray:
    """Euler integration of a rectified-flow velocity field from t = 1 (noise) to t = 0.

    Convention: x_t = (1 - t) x_0 + t noise, the denoiser predicts v = noise - x_0
    and is called with t * time_scale.
    """
    x = initial_noise(shape, seed) if noise is None else np.array(noise, dtype=np.float32)
    y = _labels(labels, x.shape[0])
    ts = np.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        if on_step is not None:
            on_step(i, float(ts[i]))
        v = _guided(denoiser, x, float(ts[i] * time_scale), y, cfg_scale, null_label)
        x = (x + (ts[i + 1] - ts[i]) * v).astype(np.float32)
    return x


class TorchDenoiser:
    """A torch module `model(x, t, y) -> tensor` as a numpy denoiser (no grad, float32)."""

    def __init__(self, model: Any):
        import torch
        self._torch = torch
        self.model = model

    def __call__(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(t)),
                             torch.from_numpy(np.ascontiguousarray(y)))
        return out.detach().cpu().numpy().astype(np.float32, copy=False)
