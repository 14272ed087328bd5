"""dit_mnist as a diffusers DiTPipeline: the shipped DiT, driven by the pipeline's own loop.

    pipe = dit_pipeline()                               # DiTPipeline over the shipped weights
    images = pipe(class_labels=[3, 7], guidance_scale=1.5, num_inference_steps=50,
                  generator=torch.Generator().manual_seed(0), output_type="np").images   # [B, 16, 16, 1]

What a user of diffusers holds: `DiTPipeline(transformer, vae, scheduler)`. dit_mnist has no
latent space and 10 classes, so two adapters make the pipeline's assumptions true:

- `NullLabelDiT` wraps the trained DiTTransformer2DModel: DiTPipeline's classifier-free guidance
  asks for ImageNet's null class (1000); this model's is NULL_LABEL (10). Everything else (the
  call, `config`, `dtype`) is the DiT's.
- `PixelVAE` "decodes" by returning its input (scaling factor 1): the DiT works on pixels.
Both answer `device` and `dtype` as diffusers' models do (the pipeline asks).

The scheduler is diffusers' DDIMScheduler on the training schedule (linear betas 1e-4..0.02 over
1000 steps, leading timestep spacing, no clipping, final alpha 1): the same DDIM the dit_mnist
workload samples with (pared.workloads.samplers.ddim_sample).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


IMAGENET_NULL = 1000       # the class DiTPipeline passes for the unconditional half


def _mdl():
    from pared.workloads import example_module
    return example_module("dit_mnist")


class NullLabelDiT(nn.Module):
    """The trained DiT, its null class where DiTPipeline puts ImageNet's."""

    def __init__(self, dit: nn.Module, null_label: int):
        super().__init__()
        self.dit, self.null_label = dit, null_label
        self.config = dit.config

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.dtype

    @property
    def device(self) -> torch.device:
        return self.dit.device

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, return_dict: bool = True):
        labels = torch.where(class_labels == IMAGENET_NULL, torch.full_like(class_labels, self.null_label),
                             class_labels)
        return self.dit(hidden_states, timestep=timestep, class_labels=labels, return_dict=return_dict)


class PixelVAE(nn.Module):
    """An identity 'VAE': the DiT's latents are the pixels ([-1, 1])."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=1.0)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        return SimpleNamespace(sample=z) if return_dict else (z,)


def scheduler():
    """DDIM on dit_mnist's training schedule (see the module doc)."""
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading", steps_offset=0)


def dit_pipeline(weights: str | None = None):
    """A DiTPipeline over the shipped dit_mnist weights (or `weights`)."""
    from diffusers import DiTPipeline
    mdl = _mdl()
    eps = mdl.build_model(weights or mdl.WEIGHTS)
    pipe = DiTPipeline(transformer=NullLabelDiT(eps.dit, mdl.NULL_LABEL).eval(), vae=PixelVAE(),
                       scheduler=scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe
