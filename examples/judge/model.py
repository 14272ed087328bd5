"""judge: a small CNN that classifies 16x16 MNIST digits, used to score the
digits the generative workloads draw.

    load_judge()                     -> Judge (eval mode, shipped weights)
    score(images, labels) -> dict    images [N,1,16,16] in [0,1] (numpy or torch)
        {"accuracy": share classified as the requested label,
         "confidence": mean softmax probability of the requested label, "n": N}
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "weights.safetensors")
SIZE = 16


class Judge(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                                   # 8x8
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                                   # 4x4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 16, 128), nn.ReLU(),
                                  nn.Dropout(0.3), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_judge(weights: str = WEIGHTS) -> Judge:
    from safetensors.torch import load_file
    if not os.path.exists(weights):
        raise FileNotFoundError(f"{weights} is missing: train it with `python {HERE}/train.py`")
    j = Judge()
    j.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
    return j.eval()


def score(images, labels, judge: Judge | None = None) -> dict:
    """Accuracy and mean confidence of the judge for the requested labels."""
    judge = judge or load_judge()
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, SIZE, SIZE):
        raise ValueError(f"the judge scores [N, 1, {SIZE}, {SIZE}] images in [0, 1], got {list(x.shape)}")
    with torch.inference_mode():
        p = torch.cat([judge(x[i:i + 256]).softmax(-1) for i in range(0, len(x), 256)])
    return {"accuracy": float((p.argmax(-1) == y).float().mean()),
            "confidence": float(p[torch.arange(len(y)), y].mean()), "n": int(len(y))}
