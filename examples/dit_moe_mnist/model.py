"""dit_moe_mnist: the dit_mnist DiT with every block's MLP replaced by a
mixture of experts, as in DiT-MoE: a softmax router picks the top-2 of 8
experts per token (gates renormalized over the two), plus one shared expert
every token goes through.

The routing is written in a static form both exporters handle: the experts run
as one batched matmul over stacked weights ([E, d, h]), and each token's top-k
outputs are picked with `index_select` by the router's `topk` indices. No `nonzero`,
no data-dependent shapes. Every expert is computed for every token (E x the
FLOPs of one expert); what routing decides is which outputs count.

    build_model() -> EpsModel with the shipped EMA weights (eval mode)
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "weights.safetensors")
SIZE = 16
NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES
NUM_EXPERTS = 8
TOP_K = 2
EXPERT_HIDDEN = 64               # fine-grained experts: 8 x 64 routed + a shared 128
CONFIG = dict(
    num_attention_heads=4, attention_head_dim=32,       # hidden size 128
    in_channels=1, out_channels=1, num_layers=6,
    sample_size=SIZE, patch_size=2,
    num_embeds_ada_norm=NUM_CLASSES, norm_type="ada_norm_zero",
    dropout=0.0,
)


class MoEFeedForward(nn.Module):
    """Top-k routed experts plus a shared expert; tokens [B, N, d] -> [B, N, d]."""

    def __init__(self, dim: int, num_experts: int = NUM_EXPERTS, top_k: int = TOP_K,
                 hidden: int = EXPERT_HIDDEN, shared_hidden: int = 128):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(num_experts, dim, hidden) * dim ** -0.5)
        self.b1 = nn.Parameter(torch.zeros(num_experts, 1, hidden))
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, dim) * hidden ** -0.5)
        self.b2 = nn.Parameter(torch.zeros(num_experts, 1, dim))
        self.shared = nn.Sequential(nn.Linear(dim, shared_hidden), nn.GELU(approximate="tanh"),
                                    nn.Linear(shared_hidden, dim))
        self.aux_loss = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        flat = x.reshape(b * n, d)
        probs = self.router(flat).softmax(dim=-1)                        # [T, E]
        gate, idx = probs.topk(self.top_k, dim=-1)                       # [T, k]
        gate = gate / gate.sum(dim=-1, keepdim=True)
        h = torch.nn.functional.gelu(torch.matmul(flat.unsqueeze(0), self.w1) + self.b1, approximate="tanh")
        out = (torch.matmul(h, self.w2) + self.b2).reshape(-1, d)       # [E * T, d]
        t = flat.shape[0]
        rows = idx * t + torch.arange(t, device=x.device).unsqueeze(-1)  # [T, k]: row of (expert, token)
        picked = out.index_select(0, rows.reshape(-1)).reshape(t, self.top_k, d)
        routed = (picked * gate.unsqueeze(-1)).sum(dim=1)
        if self.training:
            # Switch-style load balancing: fraction routed x mean probability, per expert
            frac = torch.nn.functional.one_hot(idx, self.num_experts).float().sum(1).mean(0) / self.top_k
            self.aux_loss = self.num_experts * (frac * probs.mean(0)).sum()
        return (routed + self.shared(flat)).reshape(b, n, d)


class EpsModel(nn.Module):
    """DiT-MoE as a plain (x, t, y) -> eps module."""

    def __init__(self, config: dict | None = None):
        super().__init__()
        from diffusers import DiTTransformer2DModel
        self.dit = DiTTransformer2DModel(**(config or CONFIG))
        dim = self.dit.inner_dim
        for block in self.dit.transformer_blocks:
            block.ff = MoEFeedForward(dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.dit(x, timestep=t, class_labels=y, return_dict=False)[0]


def aux_loss(model: nn.Module, coef: float = 0.01) -> torch.Tensor:
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoEFeedForward) and m.aux_loss is not None]
    return coef * torch.stack(losses).mean()


def build_model(weights: str | None = WEIGHTS) -> EpsModel:
    from safetensors.torch import load_file
    m = EpsModel()
    if weights is not None:
        if not os.path.exists(weights):
            raise FileNotFoundError(f"{weights} is missing: train it with `python {HERE}/train.py`")
        m.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
    return m.eval()


def example_inputs() -> tuple:
    """The inputs of one denoiser call of the benchmark task (see pared.workloads)."""
    from pared.workloads import get_workload
    return get_workload("dit_moe_mnist").example_inputs()


def calibration():
    from pared.workloads import get_workload
    return get_workload("dit_moe_mnist").calibration()
