"""A Decoder is captured with its decoding loop in the Plan, and runs as greedy decoding does."""
from __future__ import annotations

import pytest
import torch

from pared.ir.capture import capture
from pared.ir.decode import LOGITS, PICK, POS, START, TOKENS, Decoder, DecodeLoop, Pick
from pared.ir.errors import CaptureError
from pared.ir.plan import Call, Loop, Plan, Seq
from pared.ir.records import Record
from pared.testing import TinyTokenHead, tiny_decoder, tiny_decoder_inputs


def _greedy_reference(m: Decoder, x: tuple) -> torch.Tensor:
    """Greedy decoding written out: token j is the argmax of head(tokens)[:, j]."""
    cond = m.cond(*x)
    tokens = torch.zeros(x[0].shape[0], m.n_tokens, dtype=torch.int64)
    for j in range(m.n_tokens):
        tokens[:, j] = m.head(tokens, *cond)[:, j].argmax(-1)
    return tokens


def test_decoder_forward_is_greedy_decoding():
    m, _ = tiny_decoder(batch=3)
    for seed in range(4):
        x = tiny_decoder_inputs(3, seed)
        with torch.no_grad():
            want = m.detokenize(_greedy_reference(m, x))
            assert torch.equal(m(*x), want)


def test_capture_puts_the_loop_in_the_plan():
    m, ex = tiny_decoder()
    prog = capture(m, ex)
    assert set(prog.graphs) == {"encoder", START, "head", PICK, "detokenize"}
    body = prog.plan.body
    assert isinstance(body, Seq) and [type(n) for n in body.nodes] == [Call, Call, Loop, Call]
    loop = body.nodes[2]
    assert loop.count == m.n_tokens and [c.graph for c in loop.body.nodes] == ["head", PICK]
    assert loop.body.nodes[1].outputs == (TOKENS, POS) and loop.body.nodes[0].outputs == (LOGITS,)
    rec = prog.records["DecodeLoop"]
    assert isinstance(rec, DecodeLoop) and (rec.n_tokens, rec.vocab, rec.inputs) == (8, 16, ("obs", "task"))
    # the record and the plan survive JSON
    assert Record.from_json(rec.to_json()) == rec
    assert Plan.from_json(prog.plan.to_json()) == prog.plan


def test_captured_program_equals_eager_greedy_and_calls_the_head_n_times():
    m, ex = tiny_decoder(batch=2)
    prog = capture(m, ex)
    run = prog.runner()
    for seed in range(5):
        x = tiny_decoder_inputs(2, 10 + seed)
        got = run(list(x))[0]
        with torch.no_grad():
            assert torch.equal(got, m(*x))
        assert sum(g == "head" for g in run.graph_trace[-1]) == m.n_tokens


def test_pick_writes_the_argmax_at_pos_only():
    logits = torch.randn(2, 5, 7)
    tokens = torch.randint(0, 7, (2, 5))
    for p in range(5):
        got, nxt = Pick()(logits, tokens, torch.tensor([p]))
        want = tokens.clone()
        want[:, p] = logits[:, p].argmax(-1)
        assert torch.equal(got, want) and int(nxt) == p + 1


def test_a_head_with_the_wrong_logits_shape_is_refused():
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.h = TinyTokenHead()

        def forward(self, tokens, cond):
            return self.h(tokens, cond)[:, 0]          # (B, vocab): not one row per position
    m, ex = tiny_decoder()
    with pytest.raises(CaptureError, match=r"head\(tokens, \*cond\) must return logits of shape \(B, 8, vocab\)"):
        capture(Decoder(m.encoder, Flat(), 8), ex)
    with pytest.raises(ValueError, match="n_tokens must be a positive integer"):
        Decoder(m.encoder, m.head, 0)
