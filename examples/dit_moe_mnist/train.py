"""Train dit_moe_mnist with the dit_mnist recipe (DDPM, EMA, 10% null labels)
plus a Switch-style load-balancing loss (0.01) on the routers.

    python examples/dit_moe_mnist/train.py --steps 222    # the shipped weights: three segments,
    python examples/dit_moe_mnist/train.py --steps 1789 --init examples/dit_moe_mnist/weights.safetensors
    python examples/dit_moe_mnist/train.py --steps 1564 --init examples/dit_moe_mnist/weights.safetensors

(trained by time, 10 + 72 + 45 min on 1 thread here; see examples/dit_mnist/train.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=75.0)
    p.add_argument("--steps", type=int, help="stop after this many steps (instead of --minutes)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=4e-4, help="peak learning rate (after a 200-step warmup)")
    p.add_argument("--out", default=os.path.join(HERE, "weights.safetensors"))
    p.add_argument("--init", help="continue from these EMA weights (e.g. the shipped ones)")
    a = p.parse_args()
    model = _load(os.path.join(HERE, "model.py"), "dit_moe_model")
    trainer = _load(os.path.join(os.path.dirname(HERE), "dit_mnist", "train.py"), "dit_train")
    torch.manual_seed(a.seed)
    trainer.train(model.EpsModel(), a.out, minutes=a.minutes, batch=a.batch, lr=a.lr, seed=a.seed, threads=a.threads,
                  aux_loss=model.aux_loss, init=a.init, steps=a.steps)


if __name__ == "__main__":
    main()
