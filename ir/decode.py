"""Autoregressive decoding as a loop of the Plan, so decoding passes can rewrite it.

A model that decodes N tokens one at a time (an OpenVLA-style action-token head,
a captioner) is usually captured with its loop unrolled: N copies of the head in
one graph, which no pass can turn into a draft/verify loop. Wrapping it in
`Decoder` declares the parts instead:

    encoder(*inputs) -> cond            a tensor or a tuple of tensors
    head(tokens, *cond) -> logits       tokens (B, N) int64, logits (B, N, V); the logits at
                                        position j predict token j from the tokens before j
                                        (a causal head: positions >= j of `tokens` are ignored)
    detokenize(tokens) -> outputs       optional; without it the program returns the tokens

`Decoder.forward` is greedy decoding (what the Program is judged against), and
`capture` (ir.capture) turns a Decoder into a Program of five graphs and a Loop:

    Seq[ Call encoder      (in:...)                              -> encoder.<cond>...
         Call decode.start (encoder.<cond0>)                     -> decode.tokens, decode.pos
         Loop(count=N, Seq[
             Call head        (decode.tokens, encoder.<cond>...) -> decode.logits
             Call decode.pick (decode.logits, decode.tokens, decode.pos)
                                                                 -> decode.tokens, decode.pos ])
         Call detokenize   (decode.tokens)                       -> detokenize.<output>... ]

`decode.tokens` and `decode.pos` are carried from one iteration to the next. The
`DecodeLoop` record (program-wide) names these parts, so a pass finds the loop
without guessing from the plan's shape. The head is a graph of its own, so graph
passes (quantization, constant folding) rewrite it once for every iteration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import CaptureError
from .records import Record

#: the references the decoding loop carries (one place; passes read them from the DecodeLoop record)
TOKENS, POS, LOGITS = "decode.tokens", "decode.pos", "decode.logits"
START, PICK = "decode.start", "decode.pick"


class Decoder(torch.nn.Module):
    """Greedy decoding of `n_tokens` tokens, with its parts declared for pared (see the module doc).

    Args:
        encoder: module called with the model's inputs; returns the head's condition.
        head: module ``head(tokens, *cond) -> logits (B, n_tokens, vocab)``, causal.
        n_tokens: tokens decoded per call.
        detokenize: optional module ``tokens -> outputs``.
    """

    def __init__(self, encoder: torch.nn.Module, head: torch.nn.Module, n_tokens: int,
                 detokenize: torch.nn.Module | None = None):
        super().__init__()
        if not isinstance(n_tokens, int) or n_tokens < 1:
            raise ValueError(f"Decoder: n_tokens must be a positive integer, got {n_tokens!r}")
        self.encoder, self.head, self.detokenize = encoder, head, detokenize
        self.n_tokens = n_tokens

    def cond(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c = self.encoder(*inputs)
        return tuple(c) if isinstance(c, (tuple, list)) else (c,)

    def tokens(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Greedy decoding's tokens (B, n_tokens) int64, before detokenize."""
        cond = self.cond(*inputs)
        tokens, pos = Start(self.n_tokens)(cond[0])
        pick = Pick()
        for _ in range(self.n_tokens):
            tokens, pos = pick(self.head(tokens, *cond), tokens, pos)
        return tokens

    def forward(self, *inputs: torch.Tensor) -> Any:
        tokens = self.tokens(*inputs)
        return tokens if self.detokenize is None else self.detokenize(tokens)


class Start(torch.nn.Module):
    """(first cond tensor) -> (tokens (B, N) int64 zeros, pos (1,) int64 zero)."""

    def __init__(self, n_tokens: int):
        super().__init__()
        self.n_tokens = n_tokens

    def forward(self, cond0: torch.Tensor):
        b = cond0.shape[0]
        return (torch.zeros(b, self.n_tokens, dtype=torch.int64, device=cond0.device),
                torch.zeros(1, dtype=torch.int64, device=cond0.device))


class Pick(torch.nn.Module):
    """One greedy step: token `pos` becomes the argmax of the logits at `pos`; pos + 1."""

    def forward(self, logits: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor):
        slots = torch.arange(tokens.shape[1], device=tokens.device)
        nxt = logits.index_select(1, pos).argmax(-1)                     # (B, 1)
        return torch.where(slots[None] == pos, nxt, tokens), pos + 1


@dataclass(frozen=True)
class DecodeLoop(Record):
    """Where a captured Decoder's loop is (written by capture; read by decoding passes).

    Attributes:
        head: the head graph; pick / start: the greedy step and the start graph.
        cond: the references the head reads after the tokens (the encoder's outputs).
        tokens, pos, logits: the carried references (TOKENS, POS, LOGITS).
        n_tokens, vocab: tokens per call and the logits' last dimension.
        inputs: the program's input names (what a drafter may read).
    """

    head: str
    pick: str
    start: str
    cond: tuple[str, ...]
    tokens: str
    pos: str
    logits: str
    n_tokens: int
    vocab: int
    inputs: tuple[str, ...]


def capture_decoder(model: Decoder, args: tuple, kwargs: dict, dynamic_shapes: Any = None):
    """The Program of a Decoder (see the module doc); ir.capture calls it."""
    from .capture import capture
    from .plan import Call, Loop, Plan, Seq
    from .program import Program

    if kwargs:
        raise CaptureError("a pared Decoder takes positional inputs only (its encoder's); got keyword inputs "
                           f"{sorted(kwargs)}")
    parts = {}
    enc = capture(model.encoder, args, dynamic_shapes=dynamic_shapes, name="encoder")
    with torch.no_grad():
        cond = model.cond(*args)
    if not all(isinstance(c, torch.Tensor) for c in cond):
        raise CaptureError("Decoder: the encoder must return a tensor or a tuple of tensors")
    tokens, pos = Start(model.n_tokens)(cond[0])
    with torch.no_grad():
        logits = model.head(tokens, *cond)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(tokens.shape):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise CaptureError(f"Decoder: head(tokens, *cond) must return logits of shape (B, {model.n_tokens}, vocab) "
                           f"for tokens of shape {tuple(tokens.shape)}; got {got}")
    parts["encoder"] = enc.main
    parts[START] = capture(Start(model.n_tokens), (cond[0],), name=START).main
    parts["head"] = capture(model.head, (tokens, *cond), name="head").main
    parts[PICK] = capture(Pick(), (logits, tokens, pos), name=PICK).main
    detok = None
    if model.detokenize is not None:
        detok = capture(model.detokenize, (tokens,), name="detokenize")
        parts["detokenize"] = detok.main
    cond_refs = tuple(f"encoder.{o}" for o in enc.main.output_names)
    body = [Call("encoder", tuple(f"in:{n}" for n in enc.main.input_names), cond_refs),
            Call(START, (cond_refs[0],), (TOKENS, POS)),
            Loop(Seq((Call("head", (TOKENS, *cond_refs), (LOGITS,)),
                      Call(PICK, (LOGITS, TOKENS, POS), (TOKENS, POS)))), count=model.n_tokens)]
    if detok is not None:
        outs = tuple(f"detokenize.{o}" for o in detok.main.output_names)
        body.append(Call("detokenize", (TOKENS,), outs))
        structure = detok.output_structure
    else:
        outs = (TOKENS,)
        structure = None
    plan = Plan(enc.main.input_names, outs, Seq(tuple(body)))
    prog = Program(parts, plan, **({"output_structure": structure} if structure else {}))
    rec = DecodeLoop(head="head", pick=PICK, start=START, cond=cond_refs, tokens=TOKENS, pos=POS, logits=LOGITS,
                     n_tokens=model.n_tokens, vocab=int(logits.shape[-1]), inputs=tuple(enc.main.input_names))
    return prog.with_record(rec)
