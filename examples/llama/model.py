"""A 4-layer transformers Llama (LlamaForCausalLM, random init from a LlamaConfig with a fixed
seed, nothing downloaded) as a next-token model: input_ids -> logits.

It exercises what a decoder LLM brings that the encoders here do not: RMSNorm, rotary position
embeddings, grouped-query attention (4 query heads over 2 key/value heads: repeat_kv), the causal
mask transformers builds from the positions, and the SiLU-gated MLP. No KV cache (use_cache off):
one call scores a whole sequence.

Factories for pipeline files and the CLI (examples/pipelines/llama_int8.yaml):
    build_model()       -> CausalLM (eval mode)
    example_inputs()    -> (input_ids [BATCH, SEQ_LEN],)
    quant_calibration() -> CALIBRATION_BATCHES batches of random token ids (static INT8 ranges)
    held_out(n)         -> n other batches (seeded apart from both), for checks after optimize
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from torch import nn

VOCAB = 1000
BATCH, SEQ_LEN = 2, 32
CALIBRATION_BATCHES = 8
#: seeds of the weights, the example batch, the calibration batches and the held-out batches
SEED_WEIGHTS, SEED_EXAMPLE, SEED_CALIBRATION, SEED_HELD_OUT = 0, 1, 2, 3


class CausalLM(nn.Module):
    """LlamaForCausalLM called on input_ids alone, returning the logits tensor (no cache, no dict)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def config():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2 * SEQ_LEN,
                       use_cache=False, tie_word_embeddings=False)


def build_model(seed: int = SEED_WEIGHTS) -> CausalLM:
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    return CausalLM(LlamaForCausalLM(config())).eval()


def _ids(seed: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH, SEQ_LEN), generator=g) for _ in range(n)]


def example_inputs() -> tuple[torch.Tensor]:
    return (_ids(SEED_EXAMPLE, 1)[0],)


def quant_calibration() -> list[tuple[torch.Tensor]]:
    return [(ids,) for ids in _ids(SEED_CALIBRATION, CALIBRATION_BATCHES)]


def held_out(n: int = 8) -> list[torch.Tensor]:
    return _ids(SEED_HELD_OUT, n)
