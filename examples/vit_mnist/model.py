"""vit_mnist: a small ViT classifier (transformers' ViTModel + a linear head on
the [CLS] token) for 28x28 MNIST: patch 4 -> 49 tokens + [CLS], 6 layers,
hidden 64, 4 heads.

    build_model()                  -> ViTClassifier (eval mode, shipped weights)
    ViTClassifier(x) -> logits     x: [B, 1, 28, 28], pixels in [0, 1] normalized by (x - MEAN) / STD
"""
from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "weights.safetensors")
MEAN, STD = 0.1307, 0.3081
CONFIG = dict(image_size=28, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=6,
              num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0)


class ViTClassifier(nn.Module):
    def __init__(self, config: dict | None = None):
        super().__init__()
        from transformers import ViTConfig, ViTModel
        self.vit = ViTModel(ViTConfig(**(config or CONFIG)), add_pooling_layer=False)
        self.head = nn.Linear(self.vit.config.hidden_size, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.vit(pixel_values=(x - MEAN) / STD).last_hidden_state
        return self.head(h[:, 0])


def build_model(weights: str | None = WEIGHTS) -> ViTClassifier:
    from safetensors.torch import load_file
    m = ViTClassifier()
    if weights is not None:
        if not os.path.exists(weights):
            raise FileNotFoundError(f"{weights} is missing: train it with `python {HERE}/train.py`")
        m.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
    return m.eval()


def example_inputs() -> tuple:
    """A batch of held-out digits, as the benchmark task classifies (see pared.workloads)."""
    from pared.workloads import get_workload
    return get_workload("vit_mnist").example_inputs()


def calibration() -> list[tuple]:
    from pared.workloads import get_workload
    return get_workload("vit_mnist").calibration()
