"""The pass contract (STYLE.md), checked the same way for every registered pass.

One case per registered name (CASES). For a rewrite: its input is left unchanged
(graph code, every tensor's data_ptr and content, node meta, plan and records),
a no-op case returns the same Program, a second run on its own output finds
nothing more, bad options raise OptionError with the expected message, the
output's canonical text equals tests/golden/<name>.txt, and its numbers match
the eager meaning of the rewrite within the bound stated in its case. For an
analysis: read-only, one record of its type, bad options (and, where it is
deterministic, the same record from a second run).

Golden files are rewritten only on purpose: PARED_REGEN_GOLDEN=1 pytest
tests/passes/test_contract.py -k golden (that run fails, saying so).
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from pared.backends.measure import default_profiler
from pared.ir.capture import capture
from pared.ir.program import Program
from pared.ir.transform import Analysis, PassContext, PassResult
from pared.passes.cache.taylor_cache import taylor_table
from pared.registry import REGISTRY, get_pass
from pared import testing
from pared.testing import (ScaledLinear, assert_close_to_eager, assert_golden, canonical_program_text, check_analysis,
                           check_bad_options, check_idempotent, check_noop, run_pass_checked, tiny_dit,
                           tiny_moe_dit, tiny_sampler_loop, tiny_transformer, tiny_vit, ToMeState)

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden")


# -- fixtures: tiny seeded models, captured once (passes never edit their input; checked below) --
@dataclass(frozen=True)
class Fixture:
    model: nn.Module
    inputs: tuple
    program: Program


@functools.cache
def dit() -> Fixture:
    m, inputs = tiny_dit()
    return Fixture(m, inputs, capture(m, inputs))


@functools.cache
def dit_batch_dynamic() -> Fixture:
    m, (x, t) = tiny_dit(batch=4)
    b = Dim("batch", min=2, max=64)
    return Fixture(m, (x, t), capture(m, (x, t), dynamic_shapes=({0: b}, {0: b})))


@functools.cache
def streamer() -> Fixture:
    m, inputs = testing.tiny_streamer()
    return Fixture(m, inputs, capture(m, inputs))


@functools.cache
def decoder() -> Fixture:
    m, inputs = testing.tiny_decoder()
    return Fixture(m, inputs, capture(m, inputs))


@functools.cache
def denoiser() -> Fixture:
    m, inputs = testing.tiny_denoiser()
    return Fixture(m, inputs, capture(m, inputs))


@functools.cache
def one_token_decoder() -> Fixture:
    m, inputs = testing.tiny_decoder(n_tokens=1)
    return Fixture(m, inputs, capture(m, inputs))


@functools.cache
def moe_dit() -> Fixture:
    m, inputs = tiny_moe_dit()
    return Fixture(m, inputs, capture(m, inputs))


@functools.cache
def transformer() -> Fixture:
    m, inputs = tiny_transformer()
    return Fixture(m, inputs, capture(m, inputs))


@functools.cache
def vit() -> Fixture:
    m, inputs = tiny_vit()
    return Fixture(m, inputs, capture(m, inputs))


@functools.cache
def vla() -> Fixture:
    m, inputs = testing.tiny_vla()
    return Fixture(m, inputs, capture(m, inputs))


#: partition's contract deployment: a slow edge and a fast cloud, estimated (not measured)
PARTITION_DEPLOYMENT = testing.SLOW_EDGE_FAST_CLOUD
PARTITION_AT = ["patch", "blocks.*", "blocks.*.mlp.0"]


@functools.cache
def patchnet() -> Fixture:
    m, inputs = testing.tiny_patchnet()
    return Fixture(m, inputs, capture(m, inputs))


@functools.cache
def patchnet_costed() -> Fixture:
    """patchnet with a modeled PlacementCost (the roofline, nothing timed): partition's cuts are
    deterministic, so its golden text is."""
    from pared.analysis.placement import modeled_cost
    from pared.ir.target import Deployment
    fx_ = patchnet()
    cost = modeled_cost(fx_.program, "main", Deployment.from_json(PARTITION_DEPLOYMENT), ("edge", "cloud"),
                        PARTITION_AT)
    return Fixture(fx_.model, fx_.inputs, fx_.program.with_record(cost, "main"))


@functools.cache
def scaled() -> Fixture:
    torch.manual_seed(0)
    m = ScaledLinear().eval()
    x = torch.randn(4, 8)
    return Fixture(m, (x,), capture(m, (x,)))


@functools.cache
def dead_code() -> Fixture:
    """The tiny transformer plus two unused nodes (mul, exp) before the output."""
    fx_ = transformer()
    return Fixture(fx_.model, fx_.inputs, testing.with_dead_code(fx_.program))


class _Attention(nn.Module):
    """One SDPA block: torch decomposes it into a softmax and its fully-masked-row guard."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = (t.unflatten(-1, (2, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        return self.out(x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2))


@functools.cache
def attention() -> Fixture:
    torch.manual_seed(0)
    m = _Attention().eval()
    x = torch.randn(2, 6, 16)
    return Fixture(m, (x,), capture(m, (x,)))


class _NoLinears(nn.Module):
    """x * 2 + t: no linear layer and no t-path to quantize."""

    def forward(self, x, t):
        return x * 2 + t[:, None]


@functools.cache
def no_linears() -> Fixture:
    m = _NoLinears()
    inputs = (torch.randn(2, 4), torch.ones(2))
    return Fixture(m, inputs, capture(m, inputs))


@functools.cache
def one_linear() -> Fixture:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16)).eval()
    x = torch.randn(4, 16)
    return Fixture(m, (x,), capture(m, (x,)))


# -- contexts ---------------------------------------------------------------------------------
def _token_batches(n: int = 3) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 50, (2, 16), generator=g),) for _ in range(n)]


def no_ctx(fx_: Fixture, program: Program) -> PassContext:
    return PassContext()


def loop_ctx(steps: int) -> Callable[[Fixture, Program], PassContext]:
    return lambda fx_, program: PassContext(calibration=tiny_sampler_loop(fx_.inputs[0], steps))


def tokens_ctx(fx_: Fixture, program: Program) -> PassContext:
    return PassContext(calibration=_token_batches())


def vla_ctx(fx_: Fixture, program: Program) -> PassContext:
    return PassContext(calibration=[testing.tiny_vla_inputs(3, seed=s) for s in (11, 12)])


def motion_ctx(fx_: Fixture, program: Program) -> PassContext:
    """Eight observations of TinyVLA: states whose first rows give dynamic_precision 7 speeds."""
    return PassContext(calibration=[testing.tiny_vla_inputs(3, seed=s) for s in range(11, 19)])


def latency_ctx(fx_: Fixture, program: Program) -> PassContext:
    """latency times with the context's measurement service (ORT on the CPU)."""
    return PassContext(measure=default_profiler())


def sensitivity_ctx(fx_: Fixture, program: Program) -> PassContext:
    """mixed_precision requires a SensitivityProfile of the program it runs on: the program
    holds none, so the pass computes it on demand with quant_sensitivity's defaults on this
    calibration."""
    return PassContext(calibration=_token_batches())


def rows_ctx(fx_: Fixture, program: Program) -> PassContext:
    g = torch.Generator().manual_seed(1)
    return PassContext(calibration=[(torch.randn(4, 16, generator=g),) for _ in range(2)])


def decoder_ctx(fx_: Fixture, program: Program) -> PassContext:
    """16 observations for a retrieval table (tiny_decoder's inputs)."""
    return PassContext(calibration=[testing.tiny_decoder_inputs(1, 100 + i) for i in range(16)])


def denoiser_ctx(fx_: Fixture, program: Program) -> PassContext:
    """6 observations (with noise) for the step-to-step similarity (tiny_denoiser's inputs)."""
    return PassContext(calibration=[testing.tiny_denoiser_inputs(1, 50 + i) for i in range(6)])


def block_cache_meaning(fx_: Fixture, res: PassResult):
    """The eager Denoiser with each cached sub-block's output held between its update steps."""
    rec = res.program.records.get("ActionCachePlan", graph="head")
    held = testing.tiny_denoiser_inputs(1, 3)
    return testing.eager_block_cache(fx_.model, held, dict(zip(rec.blocks, rec.updates))), res.program(*held)


def stream_ctx(fx_: Fixture, program: Program) -> PassContext:
    return PassContext(calibration=testing.tiny_stream_calls(8))


def images_ctx(fx_: Fixture, program: Program) -> PassContext:
    """Two calls of held-out 8x8 images for TinyViT."""
    g = torch.Generator().manual_seed(1)
    return PassContext(calibration=[(torch.randn(3, 1, 8, 8, generator=g),) for _ in range(2)])


# -- eager meanings ---------------------------------------------------------------------------
def _run_loop(program: Program, x: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[str]]:
    """The sampler loop over the program, and the routine each call ran (namespaced names such
    as 'main.full' read as 'full')."""
    r = program.runner()
    out = tiny_sampler_loop(x, steps)(lambda *a: r(list(a))[0])
    return out, [str(name).rsplit(".", 1)[-1] for name in r.trace]


def _eager_loop(x: torch.Tensor, steps: int, step: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]):
    xe = x.clone()
    with torch.no_grad():
        for i, t in enumerate(torch.linspace(900, 0, steps)):
            xe = xe - 0.1 * step(i, xe, torch.full((x.shape[0],), float(t)))
    return xe


def _reused(trace: list[str], computes: set[str]) -> None:
    assert set(trace) - computes, f"the trace {trace} never reuses: the check would not exercise the cache"


def span_cache(span: tuple[int, int], steps: int, computes: set[str]):
    """Cache a block span: compute steps record its residual, the others add the last one
    (TinyDiT's span/residual/record keywords)."""
    def meaning(fx_: Fixture, res: PassResult):
        m, x = fx_.model, fx_.inputs[0]
        got, trace = _run_loop(res.program, x, steps)
        _reused(trace, computes)
        cache: dict = {}

        def step(i, xe, tt):
            if trace[i] in computes:
                return m(xe, tt, span=span, record=cache)
            return m(xe, tt, span=span, residual=cache["residual"])
        return _eager_loop(x, steps, step), got
    return meaning


def delta_meaning(fx_: Fixture, res: PassResult):
    """Δ-DiT: full steps record the front (0-2) and rear (3-5) spans; reuse_rear / reuse_front add one."""
    m, x = fx_.model, fx_.inputs[0]
    got, trace = _run_loop(res.program, x, 10)
    _reused(trace, {"full"})
    front: dict = {}
    rear: dict = {}

    def step(i, xe, tt):
        if trace[i] == "full":
            m(xe, tt, span=(3, 5), record=rear)
            return m(xe, tt, span=(0, 2), record=front)
        if trace[i] == "reuse_rear":
            return m(xe, tt, span=(3, 5), residual=rear["residual"])
        return m(xe, tt, span=(0, 2), residual=front["residual"])
    return _eager_loop(x, 10, step), got


def taylor_meaning(fx_: Fixture, res: PassResult):
    """TaylorSeer, first order: a forecast step adds last + coef * (last - previous) to blocks 1-4."""
    m, x = fx_.model, fx_.inputs[0]
    got, trace = _run_loop(res.program, x, 9)
    _reused(trace, {"full0", "full"})
    _, coefs = taylor_table(9, 3, 2)
    hist: list = []

    def step(i, xe, tt):
        if trace[i] != "forecast":
            rec: dict = {}
            out = m(xe, tt, span=(1, 4), record=rec)
            hist.append(rec["residual"])
            return out
        return m(xe, tt, span=(1, 4), residual=hist[-1] + coefs[i] * (hist[-1] - hist[-2]))
    return _eager_loop(x, 9, step), got


def expert_meaning(fx_: Fixture, res: PassResult):
    """MoECa: TinyMoEDiT's mode=full/reuse reference, refresh 1 expert per row and layer."""
    m, x = fx_.model, fx_.inputs[0]
    got, trace = _run_loop(res.program, x, 10)
    _reused(trace, {"full"})
    cache: dict = {}
    return _eager_loop(x, 10, lambda i, xe, tt: m(xe, tt, mode=trace[i], cache=cache, refresh=1)), got


def dispatch_meaning(fx_: Fixture, res: PassResult):
    """Capacity dispatch: TinyMoEDiT with the record's capacities (TinyMoE.dispatched, loops)."""
    m, x = fx_.model, fx_.inputs[0]
    caps = [lay.capacities for lay in res.program.records["MoEDispatchPlan"].layers]
    got, _ = _run_loop(res.program, x, 4)
    return _eager_loop(x, 4, lambda i, xe, tt: m(xe, tt, capacity=caps)), got


def cfg_meaning(fx_: Fixture, res: PassResult):
    """Adaptive guidance: with equal halves the latch closes after warmup and the half-batch
    graph's output, duplicated, is the model's on one half."""
    m, (x, t) = fx_.model, fx_.inputs
    same = torch.cat([x[:2], x[:2]])
    r = res.program.runner()
    got = [r([same, t])[0] for _ in range(3)]
    _reused([str(name).rsplit(".", 1)[-1] for name in r.trace], {"both"})
    with torch.no_grad():
        ref = m(x[:2], t[:2])
    return [torch.cat([ref, ref])] * 3, got


def loop_vs_model(steps: int):
    """The sampler loop over the rewritten program against the loop over the eager model."""
    def meaning(fx_: Fixture, res: PassResult):
        got, _ = _run_loop(res.program, fx_.inputs[0], steps)
        with torch.no_grad():
            return tiny_sampler_loop(fx_.inputs[0], steps)(fx_.model), got
    return meaning


def call_vs_model(held_out: Callable[[Fixture], tuple] | None = None):
    """One call of the program against one call of the eager model (on held-out inputs if given)."""
    def meaning(fx_: Fixture, res: PassResult):
        inputs = held_out(fx_) if held_out else fx_.inputs
        with torch.no_grad():
            return fx_.model(*inputs), res.program(*inputs)
    return meaning


def stream_meaning(fx_: Fixture, res: PassResult):
    """A 12-frame stream through the program against the eager step fed the cache each head's
    policy keeps (frame lists, pared.ir.kvcache.KVReference; heavy hitters ranked by the attention
    the eager step computes): past 3 frames every policy here differs from the captured 3-frame
    window."""
    calls = testing.tiny_stream_calls(12)
    layout = res.program.records["KVStream"].kv_layout()
    ref = testing.eager_stream(fx_.model.step, layout, calls, fx_.model.head_dim)
    run = res.program.runner()
    with torch.no_grad():
        got = [run(list(c))[0] for c in calls]
    return torch.stack(ref), torch.stack(got)


def skip_meaning(fx_: Fixture, res: PassResult):
    """The sampler loop over the eager model with the skipped blocks replaced by the identity."""
    import copy

    class Identity(nn.Module):
        def forward(self, h, c):
            return h
    m = copy.deepcopy(fx_.model)
    for b in res.program.records["LayerSkipDecisions"].blocks:
        m.blocks[int(b.block.rsplit(".", 1)[1])] = Identity()
    got, _ = _run_loop(res.program, fx_.inputs[0], 8)
    with torch.no_grad():
        return tiny_sampler_loop(fx_.inputs[0], 8)(m), got


def tome_meaning(fx_: Fixture, res: PassResult):
    """ToMe r=2 in each of TinyViT's 3 blocks, eagerly (ToMe's own scatter_reduce merge), on held-out images."""
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return fx_.model(x, tome=ToMeState(2, 3)), res.program(x)


def prune_meaning(fx_: Fixture, res: PassResult):
    """6 of TinyVLA's 16 visual tokens kept after block 1 by instruction relevance + diversity,
    dropped eagerly (argsort and loops), on held-out inputs."""
    x = testing.tiny_vla_inputs(3, seed=7)
    with torch.no_grad():
        return fx_.model(*x, prune=testing.PruneTokensRef(1, 4, 20, 6, "relevance", ((0, 4),), 3)), res.program(*x)


def reuse_meaning(fx_: Fixture, res: PassResult):
    """A request of 4 calls whose frames change a few patches each (and whose states move), against
    VLA-Cache's eager emulation (pared.testing.ReuseTokensRef): every call's outputs, stacked."""
    img, ids, st = testing.tiny_vla_inputs(3, seed=7)
    ref = testing.ReuseTokensRef(fx_.model, levels=(4, 8), relevant=4, alphas=(0.5, 0.5, 1, 1))
    runner = res.program.runner()
    want, got = [], []
    for c in range(4):
        if c:
            img = img.clone()
            img[:, :, 2 * c:2 * c + 2, 0:2] += 0.2 * c
        x = (img, ids, st + 0.05 * c)
        with torch.no_grad():
            want.append(ref(*x))
            got.append(runner(list(x))[0])
    assert any(t.startswith("warm/r") for t in runner.trace), runner.trace
    return torch.stack(want), torch.stack(got)


def sparse_attention_meaning(fx_: Fixture, res: PassResult):
    """TinyViT with each recorded local head masked to its 2 x 2 window (+ [CLS]) eagerly (an
    additive -inf mask built with Python loops), on held-out images."""
    rec = res.program.records["AttentionSparsityDecisions"]
    scores = {int(s.layer.split(".")[1]): testing.sparse_attention_bias(s.heads, 17, s.local, grid=rec.grid,
                                                                        window=rec.window, tokens=rec.tokens)
              for s in rec.sites}
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return fx_.model(x, scores=scores), res.program(x)


def teal_meaning(fx_: Fixture, res: PassResult):
    """The eager transformer with each recorded layer's input zeroed where |x| <= its threshold
    (forward pre-hooks), on held-out tokens."""
    import copy
    m = copy.deepcopy(fx_.model)
    th = {x.layer: x.threshold for x in res.program.records["ActivationSparsityDecisions"].layers}
    for name, mod in m.named_modules():
        if name in th:
            mod.register_forward_pre_hook(lambda mod, a, t=th[name]: (a[0] * (a[0].abs() > t),))
    x = held_out_tokens(fx_)
    with torch.no_grad():
        return m(*x), res.program(*x)


def held_out_tokens(fx_: Fixture) -> tuple:
    return (torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(7)),)


# -- the table --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """How one pass is put through the contract.

    fixture: the tiny model, example inputs and captured program.
    options: the pass's options for the main run (must modify the program).
    ctx: (fixture, program) -> a fresh PassContext (calibration, the analyses it requires).
    noop: options that make the pass find nothing to do; noop_fixture: on another program.
    bad: (options, message regex) pairs: each raises OptionError (when built or when run).
    meaning: (fixture, result) -> (eager reference, got); rel_l2: the bound (lossless: tight).
    twice_options / twice_why: a second run given other options, and why.
    same_record_twice: an analysis whose record a second run reproduces exactly.
    """

    fixture: Callable[[], Fixture]
    options: dict = field(default_factory=dict)
    ctx: Callable[[Fixture, Program], PassContext] = no_ctx
    noop: dict | None = None
    noop_fixture: Callable[[], Fixture] | None = None
    bad: tuple[tuple[dict, str], ...] = ()
    meaning: Callable[[Fixture, PassResult], tuple[Any, Any]] | None = None
    rel_l2: float = 0.0
    twice_options: dict | None = None
    twice_why: str = ""
    same_record_twice: bool = True


CASES: dict[str, Case] = {
    # -- generic rewrites: lossless -----------------------------------------------------------
    "constant_folding": Case(
        scaled, noop={}, noop_fixture=transformer,
        bad=(({"max_bytes": -1}, "pass 'constant_folding': option 'max_bytes' must be in \\[0, inf\\]"),
             ({"max_byte": 1}, "did you mean 'max_bytes'")),
        meaning=call_vs_model(), rel_l2=1e-6),
    "dead_code_elimination": Case(
        dead_code, noop={}, noop_fixture=transformer,
        bad=(({"aggressive": True}, "pass 'dead_code_elimination': unknown option 'aggressive'; it takes no options"),),
        meaning=call_vs_model(), rel_l2=0.0),
    "softmax_guard_elimination": Case(
        attention, noop={"assume_finite_inputs": False},
        bad=(({"assume_finite_inputs": 1}, "option 'assume_finite_inputs' expects bool"),
             ({"assume_mask_keep_a_key": True}, "did you mean 'assume_mask_keeps_a_key'")),
        meaning=call_vs_model(), rel_l2=1e-6),
    # -- cache rewrites: exact against the eager emulation of the chosen trace ------------------
    "interval_cache": Case(
        dit, {"interval": 3, "steps": 8}, loop_ctx(8), noop={"interval": 1, "steps": 8},
        bad=(({"interval": 0}, "option 'interval' must be in \\[1, inf\\], got 0"),
             ({"last": 9}, "outside the model's 6 blocks")),
        meaning=span_cache((1, 4), 8, {"full"}), rel_l2=1e-5),
    "delta_cache": Case(
        dit, {"interval": 3, "steps": 10}, loop_ctx(10), noop={"interval": 1, "steps": 10},
        bad=(({"cached_blocks": 7}, "'cached_blocks': 7 is not in \\[1, 6\\]"),
             ({"boundary": 1.5}, "option 'boundary' must be in \\[0, 1\\]")),
        meaning=delta_meaning, rel_l2=1e-5),
    "taylor_cache": Case(
        dit, {"interval": 3, "steps": 9}, noop={"interval": 1, "steps": 9},
        bad=(({"warmup": 1}, "option 'warmup' must be in \\[2, inf\\]"),),
        meaning=taylor_meaning, rel_l2=1e-5),
    "magnitude_cache": Case(
        dit, {"threshold": 0.5, "max_skip": 2}, loop_ctx(10), noop={"threshold": 0.0},
        bad=(({"retention": 2}, "option 'retention' must be in \\[0, 1\\]"),
             ({"first": 5, "last": 1}, "block range")),
        meaning=span_cache((0, 5), 10, {"full"}), rel_l2=1e-5),
    "residual_cache": Case(
        dit, {"threshold": 0.2}, noop={"threshold": 0.0},
        bad=(({"front": 3, "back": 3}, "leave none of the model's 6 blocks"),
             ({"threshold": -1}, "option 'threshold' must be in \\[0, inf\\]")),
        meaning=span_cache((1, 5), 10, {"compute"}), rel_l2=1e-5),
    "expert_cache": Case(
        moe_dit, {"interval": 3, "refresh": 1, "steps": 10}, noop={"interval": 1, "steps": 10},
        bad=(({"refresh": 5}, "5 is more than the 4 experts"),
             ({"target": {"fid": 1}}, "option 'target': unknown metric 'fid'; known: psnr_db, speedup")),
        meaning=expert_meaning, rel_l2=1e-5),
    # capacity factor 0.5: 8 slots per expert of 16 tokens x 2 choices, some pairs dropped
    "moe_dispatch": Case(
        moe_dit, {"capacity": 0.5}, loop_ctx(4), noop={}, noop_fixture=dit,
        bad=(({"capacity": "max"}, "option 'capacity' must be 'calibrated' or a capacity factor"),
             ({"margin": 0.5}, "option 'margin' must be in")),
        meaning=dispatch_meaning, rel_l2=1e-5),
    "cfg_skip": Case(
        dit_batch_dynamic, {"threshold": 0.99, "warmup": 1}, noop={"threshold": 1.5},
        bad=(({"warmup": -1}, "option 'warmup' must be in \\[0, inf\\]"),),
        meaning=cfg_meaning, rel_l2=1e-5),
    # -- quantizers: lossy, bounds stated (measured values in the comment) ----------------------
    # 2 buckets: two variants under a Bins schedule; measured 2e-3 over the 4-step loop
    "timestep_quant": Case(
        dit, {"buckets": 2}, loop_ctx(4), noop={}, noop_fixture=no_linears,
        bad=(({"buckets": 9}, "pass 'timestep_quant': option 'buckets' \\(9\\) exceeds the 4 calls"),
             ({"bucket": 2}, "did you mean 'buckets'")),
        meaning=loop_vs_model(4), rel_l2=0.02),
    # measured 0.004 on the tokens, 0.02 on the 4 logits (held-out ids)
    "quantize_linears": Case(
        transformer, {}, tokens_ctx, noop={"exclude": ["**"]},
        bad=(({"percentile": 40.0}, "option 'percentile' must be in \\(50, 100\\]"),
             ({"exlude": ["head"]}, "unknown option 'exlude'; did you mean 'exclude'")),
        meaning=call_vs_model(held_out_tokens), rel_l2=0.05),
    # measured 0.029 on the tokens, 0.059 on the 4 logits: every layer int4, block 32
    "quantize_weights_int4": Case(
        transformer, {"force": True}, noop={"force": True, "exclude": ["**"]},
        bad=(({"block_size": 24}, "option 'block_size' must be a power of two >= 16"),
             ({"symetric": False}, "did you mean 'symmetric'")),
        meaning=call_vs_model(held_out_tokens), rel_l2=0.1),
    # budget 0.3 of the experts' fp32 bytes: 2 experts int4, 10 int8 (block 16); measured 0.015 over one call
    "expert_quant": Case(
        moe_dit, {"weight_bytes": 0.3, "block_size": 16}, loop_ctx(3), noop={"block_size": 16}, noop_fixture=dit,
        bad=(({"bits": [3]}, "pass 'expert_quant': option 'bits' must be a non-empty choice"),
             ({"weight_bytes": 1.5}, "'expert_quant': option 'weight_bytes'")),
        meaning=call_vs_model(), rel_l2=0.05),
    # budget 0.35 of the fp32 bytes: 6 layers w8a8, 3 left fp32 (so a second run has layers to profile);
    # measured 0.003 on the tokens and the logits
    "mixed_precision": Case(
        transformer, {"weight_bytes": 0.35}, sensitivity_ctx, noop={"weight_bytes": 1.0, "formats": ["fp32"]},
        bad=(({"weight_bytes": 1.5}, "option 'weight_bytes' must be in \\(0, 1\\]"),
             ({"weight_byte": 0.3}, "did you mean 'weight_bytes'")),
        meaning=call_vs_model(held_out_tokens), rel_l2=0.05,
        twice_options={"weight_bytes": 1.0},
        twice_why="the budget is a fraction of the float bytes the profile sees; a second profile sees only "
                  "the layers left float, so the same fraction would legitimately spend again. Given their "
                  "whole bytes (1.0), the second run must keep them as they are."),
    # widths 8 and 4 chosen by the state's speed; a request's first call runs 8 bits: measured 0.007
    "dynamic_precision": Case(
        vla, {"position": [0, 1, 2], "bits": [8, 4]}, motion_ctx, noop={"position": [0, 1, 2], "exclude": ["**"]},
        bad=(({"bits": [4, 8]}, "pass 'dynamic_precision': option 'bits' must be distinct widths in 2..8"),
             ({"positon": [0]}, "unknown option 'positon'; did you mean 'position'"),
             ({"input": "robot"}, "option 'input' names 'robot', which is not a program input")),
        meaning=call_vs_model(), rel_l2=0.05),
    # -- sparsity: exact against ToMe's eager form (measured 2e-7) ----------------------------
    "layer_skip": Case(
        dit, {"skip": 2}, loop_ctx(8), noop={"skip": 0},
        bad=(({"skip": 1, "layers": ["blocks.0"]}, "give exactly one of options 'skip'"),
             ({"skp": 1}, "unknown option 'skp'; did you mean 'skip'"),
             ({"skip": 9}, "option 'skip' asks for 9 blocks; the model has 6")),
        meaning=skip_meaning, rel_l2=1e-5),
    "token_merge": Case(
        vit, {"r": 2}, noop={"r": 0},
        bad=(({"r": -1}, "pass 'token_merge': option 'r' must be in \\[0, inf\\]"),
             ({"ratoi": 0.1}, "unknown option 'ratoi'; did you mean 'ratio'"),
             ({"layers": [5]}, "option 'layers': block 5 is outside the model's 3 blocks")),
        meaning=tome_meaning, rel_l2=1e-5),
    "sparsify_activations": Case(
        transformer, {"sparsity": 0.5}, tokens_ctx, noop={"sparsity": 0.0},
        bad=(({"sparsity": 1.0}, "pass 'sparsify_activations': option 'sparsity' must be in \\[0, 1\\)"),
             ({"methd": "wina"}, "unknown option 'methd'; did you mean 'method'"),
             ({"sparsity": 0.3}, "option 'sparsity' 0.3 has no threshold")),
        meaning=teal_meaning, rel_l2=1e-6),
    "token_prune": Case(
        vla, {"keep": 6, "tokens": [4, 20], "queries": [[0, 4]], "after": 1, "score": "relevance_diversity"},
        noop={"keep": 16, "tokens": [4, 20]},
        bad=(({"keep": 0, "tokens": [4, 20]}, "pass 'token_prune': option 'keep' must be in \\[1, inf\\]"),
             ({"kepe": 2}, "unknown option 'kepe'; did you mean 'keep'"),
             ({"keep": 2, "tokens": [4, 22]}, "reads token -1 after the blocks")),
        meaning=prune_meaning, rel_l2=1e-5),
    "token_reuse": Case(
        vla, {"tokens": [4, 20], "patch": 2, "levels": [4, 8], "relevant": 4, "layers": [0.5, 0.5, 1, 1]},
        noop={"tokens": [4, 20], "patch": 2, "layers": [0, 0, 0, 0]},
        bad=(({"patch": 3}, "in 3-pixel patches does not give the 16 visual tokens"),
             ({"relevent": 2}, "unknown option 'relevent'; did you mean 'relevant'"),
             ({"levels": [13]}, "at most 12 visual tokens can be reused")),
        meaning=reuse_meaning, rel_l2=1e-5),
    # named heads (the entropy-driven choice is per graph by meaning; tests/passes/sparsity covers it)
    "sparse_attention": Case(
        vit, {"heads": {"blocks.0": [1, 2], "blocks.2": [0]}}, images_ctx, noop={"max_normalized": 0.0},
        bad=(({"mode": "sliding"}, "pass 'sparse_attention': option 'mode' must be one of"),
             ({"widow": [2, 2]}, "unknown option 'widow'; did you mean 'window'"),
             ({"window": [3, 2]}, "option 'window' \\[3, 2\\] does not divide the grid")),
        meaning=sparse_attention_meaning, rel_l2=1e-5),
    # -- decoding: exact acceptance is lossless (greedy decoding's tokens, bit for bit) ------------
    "speculative_decode": Case(
        decoder, {"drafter": "retrieval"}, decoder_ctx, noop={"drafter": "none"}, noop_fixture=one_token_decoder,
        bad=(({"radius": -1}, "pass 'speculative_decode': option 'radius' must be in \\[0, inf\\]"),
             ({"drafter": "kalman"}, "drafter 'kalman' needs option 'action_dim'"),
             ({"drafter": "kalman", "action_dim": 3}, "option 'action_dim' \\(3\\) does not divide the 8 tokens"),
             ({"radus": 1}, "unknown option 'radus'; did you mean 'radius'"),
             ({"sequence": -1.0}, "pass 'speculative_decode': option 'sequence' must be in \\[0, inf\\]")),
        meaning=call_vs_model(lambda fx_: testing.tiny_decoder_inputs(1, 77)), rel_l2=0.0),
    # -- streamed KV caches: the eager step over the frames each head's policy keeps ------------------
    "kv_policy": Case(
        streamer, {"policy": "pyramid", "head_types": [["anchor", "veil"], ["wave", "dummy"]],
                   "types": {"anchor": {"sink": 1, "recent": 2, "middle": "strided", "middle_frames": 2,
                                        "interval": 2},
                             "veil": {"sink": 1, "recent": 1, "middle": "heavy", "middle_frames": 2}}},
        noop={"policy": "window", "frames": 3},
        bad=(({"policy": "window"}, "policy 'window' needs option 'frames'"),
             ({"policy": "sink_window", "frames": 1}, "leaves no room for a window after 1 sink frame"),
             ({"policy": "pyramid", "head_types": [["anchor", "wave"]]}, "must be a \\[layers\\]\\[heads\\] "
                                                                          "table: 2 rows of 2"),
             ({"head_types": [["anchor", "ankor"], ["wave", "veil"]]}, "unknown type\\(s\\) \\['ankor'\\]"),
             ({"head_types": None}, "run analysis 'head_types' before it"),
             ({"policy": "table", "policies": [[{"sink": 1, "middle": "merged"}] * 2] * 2},
              "middle 'merged' needs middle_frames >= 1"),
             ({"policy": "table", "policies": [[{"recent": 1, "middle": "heavy", "middle_frames": 1, "interval": 2}]
                                               * 2] * 2}, "interval and phase do not apply"),
             ({"polcy": "window"}, "unknown option 'polcy'; did you mean 'policy'")),
        meaning=stream_meaning, rel_l2=1e-6),
    "kv_drop": Case(
        streamer, {"heads": [[0, 1], [1, 0]]}, noop={"heads": []},
        bad=(({"share": 1.5}, "pass 'kv_drop': option 'share' must be in \\[0, 1\\]"),
             ({"heads": [[0]]}, "option 'heads' takes \\[layer, head\\] pairs"),
             ({"heads": [[5, 0]]}, "names \\[5, 0\\]; the step has 2 layers of 2 heads"),
             ({"heads": None}, "run analysis 'head_types' before it, or give option 'heads'"),
             ({"compact": 1}, "option 'compact' expects bool, got int 1"),
             ({"shares": 0.2}, "unknown option 'shares'; did you mean 'share'")),
        meaning=stream_meaning, rel_l2=1e-6),
    # -- plan call fusion: lossless ------------------------------------------------------------------
    "fuse_calls": Case(
        denoiser, noop={}, noop_fixture=dit,
        bad=(({"graphs": ["head"]}, "pass 'fuse_calls': unknown option 'graphs'; it takes no options"),),
        meaning=call_vs_model(lambda fx_: testing.tiny_denoiser_inputs(1, 3)), rel_l2=1e-6),
    # -- action-head caching: the eager hook emulation ---------------------------------------------
    "action_cache": Case(
        denoiser, {"schedule": "bac", "updates": 3}, denoiser_ctx, noop={"schedule": "interval", "interval": 1},
        bad=(({"schedule": "fora"}, "option 'schedule': must be one of \\['bac', 'interval'\\]"),
             ({"updates": 0}, "pass 'action_cache': option 'updates' must be in \\[1, inf\\]"),
             ({"parts": "ffn", "schedule": "interval"}, "no sub-block named one of \\['ffn'\\]"),
             ({"update": 3}, "unknown option 'update'; did you mean 'updates'")),
        meaning=block_cache_meaning, rel_l2=1e-5),
    # -- placement: the parts compose to the model exactly (no compression) ------------------------
    "partition": Case(
        patchnet_costed, {"deployment": PARTITION_DEPLOYMENT, "at": PARTITION_AT, "mbit": [1, 10, 100, 1000],
                          "compress": ["none"]},
        noop={"deployment": PARTITION_DEPLOYMENT, "at": PARTITION_AT, "mbit": [0.001]},
        bad=(({"deployment": None}, "pass 'partition': option 'deployment' is required"),
             ({"deployment": PARTITION_DEPLOYMENT, "compres": ["fp16"]}, "unknown option 'compres'; did you mean "
                                                                         "'compress'"),
             ({"deployment": PARTITION_DEPLOYMENT, "second": "gpu"}, "has no device 'gpu'")),
        meaning=call_vs_model(lambda fx_: (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)),)),
        rel_l2=1e-6),
    # -- analyses: read-only ------------------------------------------------------------------
    "activation_sparsity": Case(
        transformer, ctx=tokens_ctx,
        bad=(({"sparsities": [0.5, 1.5]}, "pass 'activation_sparsity': option 'sparsities' must be in \\(0, 1\\)"),
             ({"sparsity": [0.5]}, "unknown option 'sparsity'; did you mean 'sparsities'"),
             ({"graphs": ["nope"]}, "option 'graphs': no graph 'nope'"))),
    "attention_entropy": Case(
        vit, {"query_groups": [["cls", 0, 1]]}, images_ctx,
        bad=(({"local_threshold": 0.9, "global_threshold": 0.5}, "'local_threshold' \\(0.9\\) must not exceed"),
             ({"query_groups": [["cls", 2, 1]]}, "option 'query_groups' takes \\(name, start, stop\\)"),
             ({"graphs": ["nope"]}, "pass 'attention_entropy' option 'graphs': no graph 'nope'"))),
    "head_types": Case(
        streamer, {"recent": 1, "min_frames": 3, "dummy_share": 0.25}, stream_ctx,
        bad=(({"min_frames": 2}, "option 'min_frames' \\(2\\) must exceed first_frames \\+ recent \\(2\\)"),
             ({"query_share": 0.0}, "option 'query_share' must be in \\(0, 1\\]"),
             ({"wave_mn": 0.3}, "unknown option 'wave_mn'; did you mean 'wave_min'"))),
    "token_importance": Case(
        vla, {"query_groups": [["text", 0, 4]]}, vla_ctx,
        bad=(({"keep_fraction": 0.0}, "pass 'token_importance': option 'keep_fraction' must be in \\(0, 1\\]"),
             ({"query_group": []}, "unknown option 'query_group'; did you mean 'query_groups'"))),
    "cost": Case(transformer, bad=(({"detail": True}, "pass 'cost': unknown option 'detail'; it takes no options"),)),
    "temporal_redundancy": Case(
        dit, ctx=loop_ctx(4),
        bad=(({"graph": "nope"}, "pass 'temporal_redundancy' option 'graph': no graph 'nope'"),
             ({"region": "blocks.*"}, "did you mean 'regions'"))),
    "layer_redundancy": Case(
        vit, ctx=images_ctx,
        bad=(({"graphs": "nope"}, "pass 'layer_redundancy' option 'graphs': no graph 'nope'"),
             ({"region": "blocks.*"}, "unknown option 'region'; did you mean 'regions'"))),
    "quant_sensitivity": Case(
        one_linear, {"formats": ["w8a8", "w4"], "block_size": 16}, rows_ctx,
        bad=(({"format": ["w4"]}, "unknown option 'format'; did you mean 'formats'"),
             ({"block_size": 48}, "option 'block_size' must be a power of two"))),
    # the fewest rounds: the contract, not the timings (tests/analysis/test_placement.py)
    "placement_cost": Case(
        patchnet, {"deployment": os.path.join(os.path.dirname(GOLDEN), "..", "examples", "targets",
                                              "deploy_emulated.yaml"), "at": PARTITION_AT, "repeats": 3,
                   "min_time": 0.0}, latency_ctx,
        bad=(({"devices": []}, "option 'devices' must name at least one device"),
             ({"deployment": PARTITION_DEPLOYMENT, "devices": ["gpu"]}, "has no device 'gpu'"),
             ({"repeat": 3}, "unknown option 'repeat'; did you mean 'repeats'")),
        same_record_twice=False),
    # fp32 only, the fewest rounds: the contract, not the timings (tests/analysis/test_latency.py)
    "latency": Case(
        one_linear, {"formats": [], "repeats": 3, "min_time": 0.0}, latency_ctx,
        bad=(({"repeats": 1}, "option 'repeats' must be in \\[3, inf\\]"),
             ({"formats": ["fp32"]}, "fp32 is always measured")),
        same_record_twice=False),
}

#: the passes pared itself registers (tests may register throwaway passes of their own)
BUILTIN = sorted(n for n, c in REGISTRY.items() if c.__module__.startswith("pared."))
ANALYSES = [n for n in BUILTIN if issubclass(REGISTRY[n], Analysis)]
REWRITES = [n for n in BUILTIN if not issubclass(REGISTRY[n], Analysis)]


def _case(name: str) -> Case:
    if name not in CASES:
        pytest.fail(f"pass '{name}' has no contract case: add one to CASES in {__file__}")
    return CASES[name]


def _twice_params() -> list:
    return list(REWRITES)


@functools.cache
def _first_run(name: str) -> tuple[Fixture, PassResult]:
    """The case's main run, checked by run_pass_checked (input unchanged, result well-formed)."""
    c = _case(name)
    fx_ = c.fixture()
    res = run_pass_checked(get_pass(name)(**c.options), fx_.program, c.ctx(fx_, fx_.program))
    return fx_, res


def test_every_registered_pass_has_a_case():
    missing = sorted(set(BUILTIN) - set(CASES))
    stale = sorted(set(CASES) - set(BUILTIN))
    assert not missing, f"passes without a contract case (add them to CASES): {missing}"
    assert not stale, f"contract cases for passes no longer registered: {stale}"


def test_the_harness_catches_a_pass_that_edits_its_input():
    """A pass that edits a parameter in place, or the graph it was given, fails run_pass_checked."""
    class EditsWeight:
        name, options = "edits_weight", None

        def __call__(self, program, ctx):
            with torch.no_grad():
                next(iter(program.main.module.parameters())).add_(1.0)
            return PassResult(program, modified=True)

    class EditsGraph:
        name, options = "edits_graph", None

        def __call__(self, program, ctx):
            gm = program.main.module
            out = next(n for n in gm.graph.nodes if n.op == "output")
            x = next(n for n in gm.graph.nodes if n.op == "placeholder")
            with gm.graph.inserting_before(out):
                gm.graph.call_function(torch.ops.aten.neg.default, (x,))
            gm.recompile()
            return PassResult(program, modified=True)

    for bad, msg in ((EditsWeight(), "edited in place"), (EditsGraph(), "code changed")):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 4)).eval()
        prog = capture(m, (torch.randn(2, 4),))
        with pytest.raises(AssertionError, match=msg):
            run_pass_checked(bad, prog, PassContext())


@pytest.mark.parametrize("name", REWRITES)
def test_input_unchanged_and_modified(name):
    fx_, res = _first_run(name)
    assert res.modified, f"pass '{name}' with {_case(name).options} found nothing to do on its contract fixture"
    assert res.program is not fx_.program


@pytest.mark.parametrize("name", REWRITES)
def test_noop(name):
    c = _case(name)
    assert c.noop is not None, f"pass '{name}': its case names no no-op"
    fx_ = (c.noop_fixture or c.fixture)()
    check_noop(get_pass(name)(**c.noop), fx_.program, c.ctx(fx_, fx_.program))


@pytest.mark.parametrize("name", _twice_params())
def test_running_twice_finds_nothing_more(name):
    c = _case(name)
    fx_, res = _first_run(name)
    opts = c.options if c.twice_options is None else c.twice_options
    check_idempotent(get_pass(name)(**opts), res.program, c.ctx(fx_, res.program))


@pytest.mark.parametrize("name", BUILTIN)
def test_bad_options(name):
    c = _case(name)
    assert c.bad, f"pass '{name}': its case lists no bad options"
    fx_ = c.fixture()
    for opts, msg in c.bad:        # on top of the case's options, so only the bad one is wrong
        check_bad_options(REGISTRY[name], {**c.options, **opts}, msg, program=fx_.program,
                          ctx=lambda: c.ctx(fx_, fx_.program))


#: passes whose int8 weight codes follow the build host's range (ir/isa.py: int8_weight_range): full
#: where ORT's u8s8 kernels are exact (VNNI, AMX), 7-bit on an AVX2-only x86 CPU; their programs on
#: such a host are compared with `<name>.7bit.txt`
WEIGHT_RANGE_GOLDENS = ("quantize_linears", "timestep_quant", "mixed_precision", "dynamic_precision")


def _golden_path(name: str) -> str:
    from pared.ir.isa import int8_weight_range
    seven = name in WEIGHT_RANGE_GOLDENS and int8_weight_range(None) == "7bit"
    return os.path.join(GOLDEN, f"{name}.7bit.txt" if seven else f"{name}.txt")


@pytest.mark.parametrize("name", REWRITES)
def test_structure_golden(name):
    _, res = _first_run(name)
    assert_golden(canonical_program_text(res.program), _golden_path(name))


def test_the_weight_range_goldens_differ_only_in_the_range():
    """The 7-bit goldens are the full-range ones with 63 for 127 (and the scales that follow):
    the same structure, so a pass's change cannot hide in one of the pair."""
    from pared.testing import _FLOAT
    for name in WEIGHT_RANGE_GOLDENS:
        with open(os.path.join(GOLDEN, f"{name}.txt"), encoding="utf-8") as f:
            full = f.read()
        with open(os.path.join(GOLDEN, f"{name}.7bit.txt"), encoding="utf-8") as f:
            seven = f.read()
        strip = lambda t: _FLOAT.sub("#", t).replace(", 7-bit range [-63, 63]", "").replace(
            '"weight_qmax": 63', '"weight_qmax": 127')
        assert strip(full) == strip(seven), name


#: the quantization passes: each decides, and passes/quant/convert.py converts
QUANT = ("quantize_linears", "timestep_quant", "mixed_precision", "quantize_weights_int4", "expert_quant",
         "dynamic_precision")


@pytest.mark.parametrize("name", QUANT)
def test_quantization_passes_convert_their_decisions_through_the_one_converter(name):
    # every decision is converted (on the node that now computes the layer), none left pending,
    # and each names this pass
    from pared.ir import meta
    _, res = _first_run(name)
    converted, pending = [], []
    for g in res.program.graphs.values():
        for n in g.module.graph.nodes:
            converted += [n.meta[meta.QUANT_CONVERTED]] if meta.QUANT_CONVERTED in n.meta else []
            pending += [n.name] if meta.QUANT_SPEC in n.meta else []
    assert converted and not pending, (name, len(converted), pending)
    # mixed_precision picks the formats and hands its w8a8 layers to quantize_linears, which
    # calibrates their ranges (the decision the annotation holds)
    deciders = {name, "quantize_linears"} if name == "mixed_precision" else {name}
    assert {spec.by for spec in converted} <= deciders


@pytest.mark.parametrize("name", REWRITES)
def test_numerics_against_eager(name):
    c = _case(name)
    assert c.meaning is not None, f"pass '{name}': its case gives no eager meaning"
    fx_, res = _first_run(name)
    ref, got = c.meaning(fx_, res)
    assert_close_to_eager(ref, got, rel_l2=c.rel_l2, what=f"{name} vs eager")


@pytest.mark.parametrize("name", ANALYSES)
def test_analysis_is_read_only_and_records_its_type(name):
    c = _case(name)
    fx_ = c.fixture()
    check_analysis(get_pass(name)(**c.options), fx_.program, c.ctx(fx_, fx_.program))


@pytest.mark.parametrize("name", [n for n in ANALYSES if CASES.get(n) is None or CASES[n].same_record_twice])
def test_analysis_twice_gives_the_same_record(name):
    c = _case(name)
    fx_ = c.fixture()
    records = []
    for _ in range(2):
        ctx = c.ctx(fx_, fx_.program)
        rec = check_analysis(get_pass(name)(**c.options), fx_.program, ctx)
        records.append(json.dumps(rec.to_json(), sort_keys=True))
    assert records[0] == records[1], f"analysis '{name}' gave two different records on the same program"


def test_golden_files_fail_when_missing_differ_or_regenerated(tmp_path, monkeypatch):
    path = str(tmp_path / "g.txt")
    monkeypatch.delenv("PARED_REGEN_GOLDEN", raising=False)
    with pytest.raises(AssertionError, match="is missing: create it with `PARED_REGEN_GOLDEN=1 pytest"):
        assert_golden("a\n", path)
    monkeypatch.setenv("PARED_REGEN_GOLDEN", "1")
    with pytest.raises(AssertionError, match="regenerated .*g.txt .*a regenerating run never passes"):
        assert_golden("a\nb\n", path)
    monkeypatch.delenv("PARED_REGEN_GOLDEN")
    assert_golden("a\nb\n", path)
    with pytest.raises(AssertionError, match="(?s)differs from the golden.*-b.*\\+c"):
        assert_golden("a\nc\n", path)


def test_canonical_text_is_stable_and_strips_addresses():
    fx_ = scaled()
    text = canonical_program_text(fx_.program)
    assert text == canonical_program_text(capture(fx_.model, fx_.inputs))    # a fresh capture: same text
    assert "== graph main" in text and "lin.weight: float32[8, 8]" in text and "== plan" in text
    rec = type("Rec", (), {"to_json": lambda self: {"where": "<object at 0x7f3a2b1c4d50>", "v": 1 / 3}})()
    with_rec = canonical_program_text(fx_.program.replace(records={"R": rec}))
    assert '"where": "<object at 0x?>"' in with_rec and '"v": "0.3333"' in with_rec


def test_the_checks_fail_on_passes_that_break_the_contract():
    fx_ = scaled()

    class Rebuilds:
        """Returns a new Program every time; `lies` says modified=False about it."""
        name, options = "rebuilds", None

        def __init__(self, lies: bool = False):
            self.lies = lies

        def __call__(self, program, ctx):
            if self.lies:       # a new graph, said to be unmodified
                g = program.main
                return PassResult(program.with_graph("main", g.with_module(g.copy_module())), modified=False)
            return PassResult(program.replace(), modified=True)

    with pytest.raises(AssertionError, match="should be a no-op here"):
        check_noop(get_pass("constant_folding")(), fx_.program, PassContext())
    with pytest.raises(AssertionError, match="run on its own output changed it again"):
        check_idempotent(Rebuilds(), fx_.program, PassContext())
    with pytest.raises(AssertionError, match="reported modified=False but returned other graphs"):
        check_noop(Rebuilds(lies=True), fx_.program, PassContext())
    with pytest.raises(AssertionError, match="a no-op must return the very same Program"):
        check_noop(type("Relabels", (), {"name": "relabels", "options": None, "__call__": lambda self, p, c:
                                         PassResult(p.replace(), modified=False)})(), fx_.program, PassContext())
    with pytest.raises(AssertionError, match="accepted options"):
        check_bad_options(REGISTRY["constant_folding"], {"max_bytes": 5}, "must be in")
    with pytest.raises(AssertionError, match="does not match"):
        check_bad_options(REGISTRY["constant_folding"], {"max_bytes": -1}, "expects int")
    with pytest.raises(AssertionError, match="ran with options"):
        check_bad_options(REGISTRY["constant_folding"], {"max_bytes": 5}, "must be in", program=fx_.program,
                          ctx=PassContext())
