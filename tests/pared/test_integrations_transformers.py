"""pared.integrations.transformers: a transformers model with its own tokenizer (built here, no
downloads), calibrated on text; the artifact runs with plain onnxruntime."""
import json
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from pared.integrations import transformers as pt  # noqa: E402
from pared.testing import run_torch_free, state_snapshot, assert_unchanged  # noqa: E402

WORDS = "the a robot arm picks places red blue green cube ball cup on under near left right table box".split()


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def _texts(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) for _ in range(n)]


def _bert():
    cfg = transformers.BertConfig(vocab_size=len(WORDS) + 2, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS) + 2, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.slow
@pytest.mark.parametrize("build", [_bert, _llama], ids=["bert", "llama"])
def test_int8_from_text_and_the_artifact_runs_with_plain_onnxruntime(build, tmp_path):
    model, tok = build(), _tokenizer()
    before = state_snapshot(model)
    opt = pt.optimize_model(model, tok, _texts(32, 0), holdout=_texts(16, 1), max_length=16, batch_size=8,
                            pipeline=[{"quantize_linears": {"mode": "dynamic"}}],
                            fidelity={"min_cosine": 0.995, "max_rel_l2": 0.05})
    assert_unchanged(model, before)
    assert opt.report["fidelity"]["judged_on"] == "example + holdout" and opt.report["fidelity"]["passed"]
    assert opt.program.records["QuantPlan"].layers
    path = opt.save(str(tmp_path / "artifact"))
    ids, mask = pt.tokenize(tok, _texts(8, 2), max_length=16, batch_size=8)[0]
    want = opt.executor.run_flat(ids.numpy(), mask.numpy())
    with open(os.path.join(path, "manifest.json")) as f:
        graph = json.load(f)["graphs"]["main"]
    assert [i["name"] for i in graph["inputs"]] == list(pt.INPUTS)
    names = [o["name"] for o in graph["outputs"]]
    np.savez(tmp_path / "in.npz", ids=ids.numpy(), mask=mask.numpy())
    run_torch_free(f"""
        import numpy as np, onnxruntime as ort, sys
        assert "pared" not in sys.modules
        sess = ort.InferenceSession({os.path.join(path, 'main.onnx')!r}, providers=["CPUExecutionProvider"])
        d = np.load({str(tmp_path / 'in.npz')!r})
        out = sess.run({names!r}, {{"input_ids": d["ids"], "attention_mask": d["mask"]}})
        np.savez({str(tmp_path / 'out.npz')!r}, *out)
    """)
    got = np.load(tmp_path / "out.npz")
    for i, w in enumerate(want):
        np.testing.assert_allclose(got[f"arr_{i}"], w, rtol=1e-5, atol=1e-5)


def test_too_little_text_is_refused():
    with pytest.raises(ValueError, match="3 texts, fewer than one batch of 8"):
        pt.tokenize(_tokenizer(), _texts(3, 0), max_length=16, batch_size=8)
