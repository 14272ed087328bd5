"""Numpy samplers: DDIM and flow Euler against independent torch loops, CFG
batching, and the same images from the eager model and from its artifact."""
import numpy as np
import pytest
import torch
from torch import nn

import pared
from pared.workloads.samplers import (NoiseSchedule, TorchDenoiser, ddim_sample, ddim_timesteps, flow_euler_sample,
                            initial_noise)


class TinyDenoiser(nn.Module):
    """A small conditional network: (x, t, y) -> prediction, same shape as x."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 8)
        self.t = nn.Linear(1, 8)
        self.conv = nn.Conv2d(1 + 8, 1, 3, padding=1)

    def forward(self, x, t, y):
        c = self.emb(y) + torch.sin(self.t(t[:, None] / 1000.0))
        c = c[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
        return 0.5 * torch.tanh(self.conv(torch.cat([x, c], dim=1)))


def torch_ddim(model, noise, labels, abar, ts, cfg, null):
    """DDIM eta=0 written directly in torch, as a second implementation."""
    x = torch.from_numpy(noise).double()
    y = torch.from_numpy(labels)
    abar = torch.from_numpy(abar)
    with torch.no_grad():
        for i, t in enumerate(ts):
            tt = torch.full((x.shape[0],), float(t))
            e_c = model(x.float(), tt, y).double()
            e_u = model(x.float(), tt, torch.full_like(y, null)).double()
            eps = e_u + cfg * (e_c - e_u)
            a, ap = abar[t], (abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64))
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = ap.sqrt() * x0 + (1 - ap).sqrt() * eps
    return x.float().numpy()


def test_schedules():
    lin, cos = NoiseSchedule.linear(1000), NoiseSchedule.cosine(1000)
    for s in (lin, cos):
        a = s.alphas_cumprod
        assert a.shape == (1000,) and np.all(np.diff(a) < 0) and 0 < a[-1] < a[0] < 1
    assert lin.betas[0] == pytest.approx(1e-4) and lin.betas[-1] == pytest.approx(0.02)
    ts = ddim_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 980 and ts[-1] == 0 and np.all(np.diff(ts) == -20)
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(1000, 0)


def test_ddim_matches_an_independent_torch_loop():
    model = TinyDenoiser().eval()
    sched = NoiseSchedule.linear()
    labels = np.array([1, 4, 7], np.int64)
    out = ddim_sample(TorchDenoiser(model), (3, 1, 8, 8), labels, schedule=sched, steps=10, cfg_scale=2.0,
                      null_label=10, seed=3)
    ref = torch_ddim(model, initial_noise((3, 1, 8, 8), 3), labels, sched.alphas_cumprod,
                     ddim_timesteps(1000, 10), 2.0, 10)
    assert out.dtype == np.float32 and out.shape == (3, 1, 8, 8)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert not np.allclose(out, initial_noise((3, 1, 8, 8), 3))     # it did denoise


def test_cfg_batches_conditional_rows_first_and_skips_uncond_at_scale_one():
    seen = []

    def den(x, t, y):
        seen.append((x.shape[0], y.tolist(), t.dtype))
        return np.zeros_like(x)
    ddim_sample(den, (2, 1, 4, 4), [3, 5], schedule=NoiseSchedule.linear(), steps=2, cfg_scale=1.5, null_label=10)
    assert seen[0] == (4, [3, 5, 10, 10], np.float32)
    seen.clear()
    ddim_sample(den, (2, 1, 4, 4), [3, 5], schedule=NoiseSchedule.linear(), steps=2, cfg_scale=1.0)
    assert seen[0][:2] == (2, [3, 5])
    with pytest.raises(ValueError, match="null_label"):
        ddim_sample(den, (2, 1, 4, 4), [3, 5], schedule=NoiseSchedule.linear(), steps=2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="labels"):
        ddim_sample(den, (2, 1, 4, 4), [3], schedule=NoiseSchedule.linear(), steps=2)


def test_flow_euler_recovers_the_target_of_an_exact_velocity_field():
    target = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 1, 4, 4)
    noise = initial_noise((1, 1, 4, 4), 0)
    # straight-line flow toward one point: v = noise - x0 everywhere on the path
    den = lambda x, t, y: noise - target
    out = flow_euler_sample(den, (1, 1, 4, 4), [0], steps=7, seed=0)
    np.testing.assert_allclose(out, target, atol=1e-5)
    steps = []
    flow_euler_sample(lambda x, t, y: np.zeros_like(x), (1, 1, 2, 2), [0], steps=4,
                      on_step=lambda i, t: steps.append((i, t)))
    assert steps == [(0, 1.0), (1, 0.75), (2, 0.5), (3, 0.25)]


def test_flow_euler_matches_a_torch_loop():
    model = TinyDenoiser().eval()
    labels = np.array([2, 9], np.int64)
    out = flow_euler_sample(TorchDenoiser(model), (2, 1, 8, 8), labels, steps=6, cfg_scale=1.5, null_label=10,
                            seed=1)
    x = torch.from_numpy(initial_noise((2, 1, 8, 8), 1))
    ts = torch.linspace(1, 0, 7, dtype=torch.float64)
    with torch.no_grad():
        for i in range(6):
            tt = torch.full((2,), float(ts[i]) * 1000)
            vc, vu = model(x, tt, torch.from_numpy(labels)), model(x, tt, torch.full((2,), 10))
            x = x + float(ts[i + 1] - ts[i]) * (vu + 1.5 * (vc - vu))
    np.testing.assert_allclose(out, x.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_executor_driven_sampling_gives_the_eager_images(tmp_path):
    model = TinyDenoiser().eval()
    ex_inputs = (torch.randn(4, 1, 8, 8), torch.rand(4) * 1000, torch.tensor([1, 2, 10, 10]))
    art = pared.optimize(model, ex_inputs, bench_repeats=0).save(str(tmp_path / "a"))
    ex = pared.load(art)
    kw = dict(schedule=NoiseSchedule.linear(), steps=8, cfg_scale=1.5, null_label=10, seed=5)
    eager = ddim_sample(TorchDenoiser(model), (2, 1, 8, 8), [1, 2], **kw)
    steps = []
    lowered = ddim_sample(ex, (2, 1, 8, 8), [1, 2], on_step=lambda i, t: steps.append(t), **kw)
    np.testing.assert_allclose(lowered, eager, rtol=1e-4, atol=1e-4)
    assert steps == list(ddim_timesteps(1000, 8))


def test_ddim_clip_x0_bounds_the_prediction():
    # a denoiser that predicts no noise makes x_0 = x / sqrt(abar): far outside [-1, 1] early on
    zero = lambda x, t, y: np.zeros_like(x)
    sched = NoiseSchedule.linear()
    free = ddim_sample(zero, (2, 1, 4, 4), [0, 1], schedule=sched, steps=5, seed=3)
    clipped = ddim_sample(zero, (2, 1, 4, 4), [0, 1], schedule=sched, steps=5, seed=3, clip_x0=1.0)
    assert np.abs(free).max() > 1.5
    assert np.abs(clipped).max() <= 1.0 + 1e-6
