"""dit_mnist: a class-conditional DiT (diffusers' DiTTransformer2DModel) on
16x16 MNIST, epsilon prediction, linear DDPM schedule (1000 steps).

    build_model()   -> EpsModel with the shipped EMA weights (eval mode)
    EpsModel(x, t, y) -> eps      x: [B,1,16,16] in [-1,1], t: [B] float, y: [B] int64
                                  (y == NULL_LABEL is the unconditional class)
"""
from __future__ import annotations

import os

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "weights.safetensors")
SIZE = 16
NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES          # diffusers' label table has one extra row for dropped labels
CONFIG = dict(
    num_attention_heads=4, attention_head_dim=32,       # hidden size 128
    in_channels=1, out_channels=1, num_layers=8,
    sample_size=SIZE, patch_size=2,                     # 64 tokens
    num_embeds_ada_norm=NUM_CLASSES, norm_type="ada_norm_zero",
    dropout=0.0,
)


class EpsModel(nn.Module):
    """The DiT as a plain (x, t, y) -> eps module: what pared captures and samplers drive."""

    def __init__(self, config: dict | None = None):
        super().__init__()
        from diffusers import DiTTransformer2DModel
        self.dit = DiTTransformer2DModel(**(config or CONFIG))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.dit(x, timestep=t, class_labels=y, return_dict=False)[0]


def build_model(weights: str | None = WEIGHTS) -> EpsModel:
    from safetensors.torch import load_file
    m = EpsModel()
    if weights is not None:
        if not os.path.exists(weights):
            raise FileNotFoundError(f"{weights} is missing: train it with `python {HERE}/train.py`")
        sd = {k: v.float() for k, v in load_file(weights).items()}
        m.load_state_dict(sd)
    return m.eval()


def example_inputs() -> tuple:
    """The inputs of one denoiser call of the benchmark task (see pared.workloads)."""
    from pared.workloads import get_workload
    return get_workload("dit_mnist").example_inputs()


def calibration():
    from pared.workloads import get_workload
    return get_workload("dit_mnist").calibration()
