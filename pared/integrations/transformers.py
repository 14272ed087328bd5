"""Optimize a transformers model with its own tokenizer and text, in one call.

    import pared.integrations.transformers as pt
    opt = pt.optimize_model(model, tokenizer, texts, pipeline=[{"quantize_linears": {"mode": "dynamic"}}],
                            max_length=128, batch_size=8, holdout=held_out_texts)
    opt.save("artifacts/minilm_int8")

The texts are tokenized in batches of `batch_size`, padded to `max_length` (the artifact's
shapes): the first batch is the example the model is captured on, all of them are the
calibration, and `holdout` texts (tokenized the same way) are what fidelity is judged on. The
model is called as `model(input_ids=..., attention_mask=..., return_dict=False)` (and
`use_cache=False` where its config has a cache), through a wrapper: the user's model is not
changed.

The artifact runs with plain ONNX Runtime for users who never import pared: a single-graph
program lowered to `cpu` is one ONNX file, `main.onnx` (with its weights file beside it, where
it has one), whose inputs are named `input_ids` and `attention_mask` (int64, [batch_size,
max_length]) and whose outputs are listed under `graphs.main.outputs` in `manifest.json`
(`output_0`, `output_1`, ... for a tuple):

    import onnxruntime as ort
    sess = ort.InferenceSession("artifacts/minilm_int8/main.onnx")
    hidden, = sess.run(["output_0"], {"input_ids": ids, "attention_mask": mask})[:1]
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from pared.api import Optimized, optimize

#: the inputs the artifact takes, in order
INPUTS = ("input_ids", "attention_mask")


class TokensIn(nn.Module):
    """`model` called with token ids and their mask as keyword inputs, tensors out (a tuple):
    what pared captures. Holds the model without changing it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        cfg = getattr(model, "config", None)
        self.extra = {"return_dict": False}
        if cfg is not None and hasattr(cfg, "use_cache"):
            self.extra["use_cache"] = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **self.extra)


def tokenize(tokenizer: Any, texts: Sequence[str], *, max_length: int, batch_size: int) -> list[tuple]:
    """(input_ids, attention_mask) per batch of `batch_size` texts, padded to `max_length`; a last
    batch shorter than `batch_size` is dropped (the artifact's shapes are fixed).

    Raises:
        ValueError: fewer texts than one batch.
    """
    if len(texts) < batch_size:
        raise ValueError(f"tokenize: {len(texts)} texts, fewer than one batch of {batch_size}; give more text "
                         "or a smaller batch_size")
    out = []
    for i in range(0, len(texts) - batch_size + 1, batch_size):
        b = tokenizer(list(texts[i:i + batch_size]), padding="max_length", truncation=True, max_length=max_length,
                      return_tensors="pt")
        out.append((b["input_ids"].to(torch.int64), b["attention_mask"].to(torch.int64)))
    return out


def optimize_model(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, pipeline: Any = None,
                   target: Any = "cpu", max_length: int = 128, batch_size: int = 8,
                   holdout: Sequence[str] | None = None, **options: Any) -> Optimized:
    """pared.optimize on a transformers model, its example and calibration tokenized from `texts`
    by its own tokenizer (see the module docstring).

    Args:
        texts: calibration text (at least `batch_size` entries).
        holdout: text the passes never see, to judge fidelity on.
        pipeline, target, options: as pared.optimize takes them.
    Raises:
        ValueError: too few texts for one batch.
    """
    batches = tokenize(tokenizer, texts, max_length=max_length, batch_size=batch_size)
    held = tokenize(tokenizer, holdout, max_length=max_length, batch_size=batch_size) if holdout else None
    return optimize(TokensIn(model).eval(), batches[0], pipeline=pipeline, target=target, calibration=batches,
                    holdout=held, **options)
