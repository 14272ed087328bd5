"""Speculative decoding of a captured Decoder's tokens (HeiSD retrieval drafts, KERV Kalman
drafts, Spec-VLA relaxed acceptance).

Before (ir/decode.py): N iterations of  head(tokens) -> logits; pick: token pos = argmax, pos + 1
After:   draft: all N tokens proposed at once (no head call), then until every token is fixed:
             head(tokens) -> logits; accept: keep the longest acceptable run of the draft, the
             head's own token where it first disagrees (drafters.Accept)

A greedy head call costs the same whatever it verifies (the head computes the logits of every
position in one call), so each iteration fixes at least one token and usually several: the
head calls per call fall from N to about N / (mean accepted run + 1).

Drafters (`drafter:`):
  retrieval  the tokens of the nearest stored observation (HeiSD). The table is the head's own
             greedy tokens on the calibration inputs (up to `table_size`), or an .npz file
             (`table:`) with one array per key input (named as the program's inputs) and
             `tokens` (M, N), e.g. tokenized demonstration actions. Keys: `keys:` (program input
             names), default every input with at most 256 values per row (a state vector, an
             instruction's ids; not an image). Float keys are matched by standardized L2,
             integer keys must match exactly.
  kalman     per action dimension, a constant-velocity Kalman filter over the actions decoded at
             the earlier calls of the request (KERV); the draft is its prediction of the next H
             actions. The first call of a request has no history: it decodes with a draft of
             zeros. Tokens are read as H actions of `action_dim` bins each (time-major).
  distilled  a parallel draft head (LayerNorm + 2-layer MLP on the head's condition, all N tokens
             in one call, Medusa-style) trained at compile time on the head's greedy tokens for
             the calibration inputs (`draft_hidden`, `draft_steps`; seeded).
  denoiser   another policy head's action, sampled and binned: `draft_model` (a callable, or
             `file.py:function` in a pipeline file) returns `(sampler, noise)`, a pared
             `Denoiser` whose encoder reads the Decoder's condition (the head's inputs after
             the tokens) and whose finish bins its sample into the N draft tokens, and the
             initial sample of one row (the same every call, so the draft is deterministic).
             Its steps become a steps loop of this plan (a DenoiseLoop record names it), so
             cache passes (action_cache) schedule the drafter's head. A diffusion action head
             drafting for a token head on the same backbone.
  none       a draft of zeros: with `refill: head` this is Jacobi decoding, the baseline a
             drafter has to beat.
  hybrid     two of the above (`hybrid: [fine, coarse]`, default distilled for fine motion and
             retrieval for coarse), chosen per call by the robot's motion (HeiSD's kinematic
             switch between drafter and retrieval): a `motion` select on the state input
             (`motion_input`) whose end-effector speed (`position` against `previous`, or the
             previous call's) below the `fine_share` quantile of the calibration observations' speeds
             picks the fine drafter. HeiSD's fused metric is not public; this is its speed term.

Past the first rejected position (`refill:`): `head` puts the head's own guesses there (its
argmax at those positions, computed from a prefix that was wrong at one token; Jacobi
decoding), `draft` keeps the rest of the draft. Either way each iteration fixes at least one
token, and exact acceptance stays lossless.

Acceptance (`radius:`): 0 accepts a draft token only when it equals the head's argmax, so the
tokens are exactly greedy decoding's (lossless); r > 0 accepts tokens within r bins of the
argmax (Spec-VLA: action tokens are ordered bins), trading fidelity for fewer head calls.
Two more lossy savings: `max_verify: k` stops after k head calls and keeps the draft (or the
head's guesses) for what is not verified by then (with the Kalman drafter and k = 1: KERV's
completion of the action segment instead of re-inference); `skip_verify: q` (retrieval) sends
the nearest row's tokens out without any head call when the observation is nearer to it than a
fraction q of the table's rows are to their own nearest other row (HeiSD's verify-skip);
`sequence: d` accepts the whole remaining draft when its tokens deviate from the head's argmax
by at most d bins on average (HeiSD's sequence-wise relaxed acceptance; the paper's exact
aggregate is not public, the mean absolute bin distance is this pass's).

Reads: the DecodeLoop record (capture of a pared.ir.decode.Decoder writes it).
Writes: graphs `speculative_decode.draft` (+ `.kalman_start`, `.kalman_update`; the denoiser
drafter: `speculative_decode.noise` and the sampler's graphs `draft_encoder`, `draft.start`,
`draft_head`, `draft.update`, `draft_finish`, with a DenoiseLoop record) and
`speculative_decode.accept`; the decoding Loop becomes draft + Loop(until done, at most N);
a SpeculativePlan record. Earlier rewrites of the head call (quantization, variants) stay as
they are: only the pick step is replaced. Variants of the head behind a select that chooses once
per call (dynamic_precision's motion select) are verified through that select, so every head call
of a policy call runs the variant greedy decoding would have run; a select that may choose anew
per token is refused.
Invariant: `radius: 0` without `max_verify` or `skip_verify` gives greedy decoding's tokens
exactly, whatever the drafter.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from pared.ir.capture import capture
from pared.ir.decode import DecodeLoop
from pared.ir.denoise import DenoiseLoop, Denoiser
from pared.ir.errors import OptionError, PassError, PlanError
from pared.ir.plan import Bins, Call, Loop, Node, Select, Seq, StateBuffer, Table, map_nodes
from pared.ir.program import Program
from pared.ir.selectors.motion import Motion, first_rows, speed_edges
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, Record, RewritePass, check_range, register_pass
from pared.passes.decode import drafters

NAME = "speculative_decode"
DRAFT, ACCEPT = f"{NAME}.draft", f"{NAME}.accept"
K_START, K_UPDATE = f"{NAME}.kalman_start", f"{NAME}.kalman_update"
#: the references the pass adds
N_REF, DONE_REF, KF_STATE, DIST_REF = f"{NAME}.n", f"{NAME}.done", f"{NAME}.kalman", f"{NAME}.distance"
NOISE = f"{NAME}.noise"
#: the denoiser drafter's graphs, by their names in its own capture (the head's name has no dot: cache
#: passes find a sampler's head by a graph's origin up to its first dot)
DRAFT_GRAPHS = {"encoder": "draft_encoder", "denoise.start": "draft.start", "head": "draft_head",
                "denoise.update": "draft.update", "finish": "draft_finish"}
#: default keys: inputs with at most this many values per row
_SMALL_KEY = 256


@register_pass(NAME)
class SpeculativeDecode(RewritePass):
    """Draft all tokens, verify them with one head call per iteration (see module docstring)."""

    path_options = ("table",)
    ref_options = ("draft_model",)

    #: harnesses build the model in its decoding-loop form (a pared.ir.decode.Decoder) for this pass
    capture_needs = frozenset({"loop"})

    @dataclass(frozen=True, kw_only=True)
    class Options:
        drafter: Literal["retrieval", "distilled", "kalman", "denoiser", "none", "hybrid"] = "retrieval"
        radius: int = 0                     # acceptance: 0 exact (lossless); r: within r bins of the argmax
        refill: Literal["head", "draft"] = "head"    # past a rejection: the head's guesses, or the rest of the draft
        keys: tuple[str, ...] | None = None  # retrieval: the program inputs matched (default: the small ones)
        table: str | None = None            # retrieval: an .npz table instead of the calibration inputs
        table_size: int = 4096              # retrieval / distilled: at most this many calibration inputs
        draft_hidden: int = 512             # distilled: the parallel draft head's width
        draft_steps: int = 1500             # distilled: training steps on the calibration inputs' greedy tokens
        action_dim: int | None = None       # kalman: values per action (tokens are H actions of this many)
        process_noise: float = 16.0         # kalman: acceleration variance, in bins^2 per step^2
        measurement_noise: float = 4.0      # kalman: variance of a decoded action around the filter's, bins^2
        max_verify: int | None = None       # at most this many head calls; what is not verified by then keeps
                                            # the draft (KERV's Kalman completion) or the head's guesses
        skip_verify: float | None = None    # retrieval: no head call when the observation is nearer its table
                                            # row than this quantile of the rows' own nearest distances (HeiSD)
        sequence: float | None = None       # accept a whole draft whose unverified tokens deviate from the
                                            # head's argmax by at most this many bins on average (HeiSD)
        draft_model: Any = None             # denoiser: a callable returning (a pared Denoiser over the head's
                                            # condition whose finish gives the draft tokens, its initial sample)
        hybrid: tuple[str, str] = ("distilled", "retrieval")  # hybrid: the drafters of fine and coarse motion
        motion_input: str = "state"         # hybrid: the program input holding the robot state
        position: tuple[int, ...] = ()      # hybrid: its end-effector position indices (required)
        previous: tuple[int, ...] = ()      # hybrid: the position one tick earlier (else the previous call's)
        fine_share: float = 0.5             # hybrid: calibration share of observations the fine drafter takes
        dwell: int = 1                      # hybrid: calls in a row the coarse drafter is asked for before taken

        def __post_init__(self):
            check_range(NAME, "radius", self.radius, lo=0)
            check_range(NAME, "table_size", self.table_size, lo=1)
            check_range(NAME, "process_noise", self.process_noise, lo=0, lo_open=True)
            check_range(NAME, "measurement_noise", self.measurement_noise, lo=0, lo_open=True)
            if self.drafter == "kalman" and self.action_dim is None:
                raise OptionError(f"pass '{NAME}': drafter 'kalman' needs option 'action_dim' (the values per "
                                  "action: the tokens are read as H actions of that many bins)")
            if self.action_dim is not None:
                check_range(NAME, "action_dim", self.action_dim, lo=1)
            for name in ("hybrid", "position", "previous"):
                object.__setattr__(self, name, tuple(getattr(self, name)))
            uses_retrieval = self.drafter == "retrieval" or (self.drafter == "hybrid" and "retrieval" in self.hybrid)
            if self.drafter == "hybrid":
                if len(self.hybrid) != 2 or self.hybrid[0] == self.hybrid[1] or \
                        not set(self.hybrid) <= {"retrieval", "distilled", "none"}:
                    raise OptionError(f"pass '{NAME}': option 'hybrid' takes two different drafters [fine, coarse] "
                                      f"of retrieval, distilled and none, got {list(self.hybrid)}")
                if not self.position:
                    raise OptionError(f"pass '{NAME}': drafter 'hybrid' needs option 'position' (the state indices "
                                      "of the end-effector position, whose speed picks the drafter)")
                if self.skip_verify is not None:
                    raise OptionError(f"pass '{NAME}': option 'skip_verify' reads the retrieval distance, which the "
                                      "fine drafter does not produce; use it with drafter 'retrieval'")
                check_range(NAME, "fine_share", self.fine_share, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
                check_range(NAME, "dwell", self.dwell, lo=1)
                try:
                    Motion("in:" + self.motion_input, ("fine", "coarse"), self.position, (0.0,), self.previous,
                           dwell=self.dwell)
                except PlanError as e:
                    raise OptionError(f"pass '{NAME}': {e}") from None
            if self.drafter == "denoiser" and not callable(self.draft_model):
                raise OptionError(f"pass '{NAME}': drafter 'denoiser' needs option 'draft_model': a callable (in a "
                                  "pipeline file 'path/to/file.py:function') returning (a pared Denoiser over the "
                                  f"head's condition, its initial sample); got {self.draft_model!r}")
            if self.drafter != "denoiser" and self.draft_model is not None:
                raise OptionError(f"pass '{NAME}': option 'draft_model' belongs to drafter 'denoiser', not "
                                  f"{self.drafter!r}")
            if not uses_retrieval and (self.keys is not None or self.table is not None
                                       or self.skip_verify is not None):
                raise OptionError(f"pass '{NAME}': options 'keys', 'table' and 'skip_verify' belong to drafter "
                                  f"'retrieval', not {self.drafter!r}")
            if self.max_verify is not None:
                check_range(NAME, "max_verify", self.max_verify, lo=1)
            check_range(NAME, "draft_hidden", self.draft_hidden, lo=1)
            check_range(NAME, "draft_steps", self.draft_steps, lo=0)
            if self.skip_verify is not None:
                check_range(NAME, "skip_verify", self.skip_verify, lo=0, hi=1, lo_open=True, hi_open=True)
            if self.sequence is not None:
                check_range(NAME, "sequence", self.sequence, lo=0)

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        loop_rec = program.records.get("DecodeLoop")
        if not isinstance(loop_rec, DecodeLoop):
            raise PassError(f"pass '{NAME}' needs a decoding loop in the plan: wrap the model in "
                            "pared.ir.decode.Decoder(encoder, head, n_tokens, detokenize) so capture declares it "
                            "(the program has no DecodeLoop record)")
        loops = _pick_loops(program.plan.body, loop_rec)
        if not loops:
            if ACCEPT in program.graphs:          # already speculative: nothing more to do
                return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={})
            raise PassError(f"pass '{NAME}': the plan has no greedy loop over {loop_rec.pick!r} "
                            f"({loop_rec.n_tokens} iterations) to replace; an earlier pass changed it")
        n, vocab = loop_rec.n_tokens, loop_rec.vocab
        if n == 1:          # one token is one head call whatever the draft: nothing to gain
            ctx.log.info("%s: the loop decodes one token; nothing to speculate", NAME)
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={})
        if o.action_dim is not None and n % o.action_dim:
            raise OptionError(f"pass '{NAME}': option 'action_dim' ({o.action_dim}) does not divide the "
                              f"{n} tokens per call")
        heads = _head_graphs(program, loop_rec, loops)
        graphs = dict(program.graphs)
        example_tokens = program.graphs[heads[0]].example_inputs[0]
        stats: dict = {"tokens": n}
        parts = getattr(self, f"_draft_{o.drafter}")(program, loop_rec, ctx, example_tokens)
        graphs.update(parts.graphs)
        stats.update(parts.stats)
        detail = dict(parts.detail)
        batch = example_tokens.shape[0]
        logits_ex = torch.zeros(batch, n, vocab)
        graphs[ACCEPT] = capture(drafters.Accept(o.radius, o.refill, o.sequence), (logits_ex, example_tokens,
                                                             torch.zeros(batch, 1, dtype=torch.int64)),
                                 name=ACCEPT).main

        def speculative(loop: Loop) -> Node:
            *verify, _pick = loop.body.nodes
            body = Seq((*verify, Call(ACCEPT, (loop_rec.logits, loop_rec.tokens, N_REF),
                                      (loop_rec.tokens, N_REF, DONE_REF))))
            verify: Node = Loop(body, until=DONE_REF, max_iters=min(n, o.max_verify or n))
            if o.skip_verify is not None:        # HeiSD's verify-skip: a near neighbour's tokens go out as they are
                verify = Select(Bins(DIST_REF, (detail["skip_verify_below"],), ("skip", "verify")),
                                (("skip", Seq(())), ("verify", verify)))
            if parts.cold is not None:           # the first call's own draft, verified to the end
                full = Loop(body, until=DONE_REF, max_iters=n)
                nodes = [Select(Table(("cold",), "warm"), (("cold", Seq((parts.cold, full))),
                                                          ("warm", Seq((parts.draft, verify)))), f"{NAME}.history")]
            else:
                nodes = [parts.draft, verify]
            return Seq(tuple(nodes + ([parts.after] if parts.after is not None else [])))

        body = map_nodes(program.plan.body, lambda node: speculative(node) if node in loops else node)
        plan = dataclasses.replace(program.plan, body=body).with_declarations(parts.state, parts.step_values)
        lossless = o.radius == 0 and o.max_verify is None and o.skip_verify is None and o.sequence is None
        detail.update(refill=o.refill, max_verify=o.max_verify)
        rec = SpeculativePlan(drafter=o.drafter, radius=o.radius, tokens=n, lossless=lossless, sequence=o.sequence,
                              **detail)
        new = program.replace(graphs=graphs, plan=plan).with_record(rec)
        for extra in parts.records:
            new = new.with_record(extra)
        ctx.log.info("%s: %s drafts, radius %d, %d tokens", NAME, o.drafter, o.radius, n)
        return PassResult(new, modified=True, stats=stats)

    # -- drafters: each builds its graphs and plan nodes ---------------------------------------
    def _draft_hybrid(self, program: Program, loop_rec: DecodeLoop, ctx: PassContext,
                      example_tokens: torch.Tensor) -> "DraftParts":
        o = self.options
        if o.motion_input not in loop_rec.inputs:
            raise OptionError(f"pass '{NAME}': option 'motion_input' names {o.motion_input!r}, which is not a "
                              f"program input (inputs: {list(loop_rec.inputs)})")
        calib = ctx.calibration
        if callable(calib) or not calib:
            raise PassError(f"pass '{NAME}': drafter 'hybrid' sets its speed edge on the states of calibration "
                            "inputs (a list of input tuples); none were given. Pass calibration=[...]")
        at = list(loop_rec.inputs).index(o.motion_input)
        probe = Motion("in:" + o.motion_input, ("fine",), o.position, (), o.previous)
        try:
            proxies = probe.proxies_over(first_rows(x[at] for x in calib))
            (edge,) = speed_edges([p[0] for p in proxies], (o.fine_share, 1.0 - o.fine_share), f"pass '{NAME}'")
        except PlanError as e:
            raise PassError(str(e)) from None
        graphs, cases, detail, stats = {}, [], {}, {}
        for role, drafter in zip(("fine", "coarse"), o.hybrid):
            p = getattr(self, f"_draft_{drafter}")(program, loop_rec, ctx, example_tokens)
            name = f"{DRAFT}.{drafter}"
            graphs[name] = p.graphs[DRAFT]
            cases.append((role, dataclasses.replace(p.draft, graph=name)))
            detail.update(p.detail)
            stats.update(p.stats)
        motion = Motion("in:" + o.motion_input, ("fine", "coarse"), o.position, (edge,), o.previous, dwell=o.dwell)
        detail.update(hybrid=tuple(o.hybrid), speed_edge=edge)
        return DraftParts(graphs, Select(motion, tuple(cases), f"{NAME}.motion"), detail=detail,
                          stats={**stats, "speed_edge": edge})

    def _draft_retrieval(self, program: Program, loop_rec: DecodeLoop, ctx: PassContext,
                         example_tokens: torch.Tensor) -> "DraftParts":
        o = self.options
        keys, float_keys, int_keys, order, rows, source = self._table(program, loop_rec, ctx)
        retrieval = drafters.Retrieval(float_keys, int_keys, rows, order, with_distance=o.skip_verify is not None)
        ex = tuple(program.graphs[_input_graph(program)].example_inputs[loop_rec.inputs.index(k)] for k in keys)
        outs = (loop_rec.tokens, N_REF) + ((DIST_REF,) if o.skip_verify is not None else ())
        detail = {"keys": tuple(keys), "table_rows": int(rows.shape[0]), "table": source}
        if o.skip_verify is not None:
            with torch.no_grad():
                near = retrieval.leave_one_out()
            detail["skip_verify_below"] = float(torch.quantile(near[torch.isfinite(near)], o.skip_verify))
        return DraftParts({DRAFT: capture(drafters.Counted(retrieval), ex, name=DRAFT).main},
                          Call(DRAFT, tuple(f"in:{k}" for k in keys), outs), detail=detail,
                          stats={"table_rows": int(rows.shape[0]), "keys": list(keys)})

    def _draft_distilled(self, program: Program, loop_rec: DecodeLoop, ctx: PassContext,
                         example_tokens: torch.Tensor) -> "DraftParts":
        o = self.options
        n, batch = loop_rec.n_tokens, example_tokens.shape[0]
        inputs, tokens, conds = _decode_calibration(program, loop_rec, ctx, loop_rec.cond, o.table_size, "distilled")
        mod = drafters.ParallelDraft([int(c[0].numel()) for c in conds], n, loop_rec.vocab, o.draft_hidden)
        ctx.progress(f"{NAME}: distilling a parallel draft head on {tokens.shape[0]} calibration inputs")
        fit = drafters.distill(mod, conds, tokens, o.draft_steps)
        graph = capture(drafters.Counted(mod), tuple(c[:batch] for c in conds), name=DRAFT).main
        return DraftParts({DRAFT: graph}, Call(DRAFT, tuple(loop_rec.cond), (loop_rec.tokens, N_REF)),
                          detail={"draft_hidden": o.draft_hidden, "draft_steps": o.draft_steps,
                                  "samples": int(tokens.shape[0]), **fit},
                          stats={"draft_train_accuracy": fit["train_token_accuracy"]})

    def _draft_none(self, program: Program, loop_rec: DecodeLoop, ctx: PassContext,
                    example_tokens: torch.Tensor) -> "DraftParts":
        graph = capture(drafters.Counted(_Zeros(loop_rec.n_tokens)), (example_tokens,), name=DRAFT).main
        return DraftParts({DRAFT: graph}, Call(DRAFT, (loop_rec.tokens,), (loop_rec.tokens, N_REF)))

    def _draft_denoiser(self, program: Program, loop_rec: DecodeLoop, ctx: PassContext,
                        example_tokens: torch.Tensor) -> "DraftParts":
        o = self.options
        n, batch = loop_rec.n_tokens, example_tokens.shape[0]
        what = f"pass '{NAME}': option 'draft_model' ({getattr(o.draft_model, '__name__', o.draft_model)!r})"
        made = o.draft_model()
        if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], Denoiser)
                and isinstance(made[1], torch.Tensor)):
            raise OptionError(f"{what} must return (a pared.ir.denoise.Denoiser, its initial sample tensor); got "
                              f"{type(made).__name__}")
        sampler, noise = made
        if noise.dim() < 1 or noise.shape[0] != 1 or not noise.dtype.is_floating_point:
            raise OptionError(f"{what}: the initial sample must be one float row (1, ...), got "
                              f"{tuple(noise.shape)} {noise.dtype}")
        # the head's example inputs after the tokens are the condition the sampler's encoder reads
        cond_ex = tuple(program.graphs[_head_graphs(program, loop_rec, _pick_loops(program.plan.body, loop_rec))[0]]
                        .example_inputs[1:])
        if len(cond_ex) != len(loop_rec.cond):
            raise PassError(f"pass '{NAME}': the head reads {len(loop_rec.cond)} condition tensors but its example "
                            f"has {len(cond_ex)}")
        x_ex = noise.expand(batch, *noise.shape[1:]).clone()
        counted = Denoiser(sampler.encoder, sampler.head, sampler.update, sampler.schedule, sampler.head_values,
                           finish=drafters.Counted(sampler.finish if sampler.finish is not None else _Identity()))
        with torch.no_grad():
            try:
                draft, _ = counted(*cond_ex, x_ex)
            except Exception as e:      # the user's sampler: say which part failed
                raise PassError(f"{what}: the sampler failed on the head's condition "
                                f"{[tuple(c.shape) for c in cond_ex]} and the initial sample: "
                                f"{type(e).__name__}: {e}") from e
        if draft.dtype != torch.int64 or tuple(draft.shape) != (batch, n):
            raise PassError(f"{what}: the sampler's finish must give the draft tokens, int64 of shape ({batch}, {n}); "
                            f"got {draft.dtype} {tuple(draft.shape)}")
        if int(draft.min()) < 0 or int(draft.max()) >= loop_rec.vocab:
            raise PassError(f"{what}: the sampler's draft holds tokens outside [0, {loop_rec.vocab}) "
                            f"({int(draft.min())}..{int(draft.max())}); clamp its bins in finish")
        sub = capture(counted, (*cond_ex, x_ex), name="draft")
        rec = sub.records.get("DenoiseLoop")
        graphs = {DRAFT_GRAPHS[g]: graph for g, graph in sub.graphs.items()}
        noise_graph = capture(_FixedNoise(noise), (cond_ex[0],), name=NOISE).main
        graphs[NOISE] = noise_graph
        ins = dict(zip(rec.inputs, (*loop_rec.cond, NOISE)))
        outs = dict(zip(sub.plan.outputs, (loop_rec.tokens, N_REF)))

        def ref(r: str) -> str:
            if r in outs:
                return outs[r]
            kind, sep, name = r.partition(":")
            if sep and kind == "in":
                return ins[name]
            if sep:
                return f"{kind}:{ref(name)}"
            if r.startswith("denoise."):
                return "draft." + r[len("denoise."):]
            g, _, tail = r.partition(".")
            return f"{DRAFT_GRAPHS[g]}.{tail}" if g in DRAFT_GRAPHS else r

        def rename(node: Node) -> Node:
            if isinstance(node, Call):
                return dataclasses.replace(node, graph=DRAFT_GRAPHS[node.graph], inputs=tuple(map(ref, node.inputs)),
                                           outputs=tuple(map(ref, node.outputs)))
            return node
        draft_node = Seq((Call(NOISE, (loop_rec.cond[0],), (NOISE,)), map_nodes(sub.plan.body, rename)))
        steps = tuple((ref(k), v) for k, v in sub.plan.step_values)
        loop = DenoiseLoop(head=DRAFT_GRAPHS[rec.head], update=DRAFT_GRAPHS[rec.update],
                           start=DRAFT_GRAPHS[rec.start], cond=tuple(ref(c) for c in rec.cond), x=ref(rec.x),
                           out=ref(rec.out), steps=rec.steps, values=tuple(ref(v) for v in rec.values),
                           inputs=loop_rec.inputs)
        return DraftParts(graphs, draft_node, step_values=steps, records=(loop,),
                          detail={"draft_model": getattr(o.draft_model, "__qualname__", str(o.draft_model)),
                                  "sampler_steps": rec.steps},
                          stats={"sampler_steps": rec.steps})

    def _draft_kalman(self, program: Program, loop_rec: DecodeLoop, ctx: PassContext,
                      example_tokens: torch.Tensor) -> "DraftParts":
        o = self.options
        n, batch = loop_rec.n_tokens, example_tokens.shape[0]
        h, q, r = n // o.action_dim, o.process_noise, o.measurement_noise
        kf_state = torch.zeros(batch, 5, o.action_dim)
        graphs = {
            DRAFT: capture(drafters.Counted(drafters.KalmanDraft(h, o.action_dim, loop_rec.vocab)), (kf_state,),
                           name=DRAFT).main,
            K_START: capture(drafters.KalmanStart(h, o.action_dim, q, r), (example_tokens,), name=K_START).main,
            K_UPDATE: capture(drafters.KalmanUpdate(h, o.action_dim, q, r), (example_tokens, kf_state),
                              name=K_UPDATE).main,
            f"{DRAFT}.cold": capture(drafters.Counted(_Zeros(n)), (example_tokens,), name=f"{DRAFT}.cold").main}
        kf = f"state:{KF_STATE}"
        # the first call has no history: a zero draft, verified to the end even under max_verify
        # (completing a chunk from zeros would act on bin 0); later calls: the filters' draft; after
        # each call the filters take in its tokens
        after = Select(Table(("cold",), "warm"), (("cold", Call(K_START, (loop_rec.tokens,), (kf,))),
                                                  ("warm", Call(K_UPDATE, (loop_rec.tokens, kf), (kf,)))),
                       f"{NAME}.history")
        return DraftParts(graphs, Call(DRAFT, (kf,), (loop_rec.tokens, N_REF)),
                          cold=Call(f"{DRAFT}.cold", (loop_rec.tokens,), (loop_rec.tokens, N_REF)), after=after,
                          state=(StateBuffer(KF_STATE, (None, 5, o.action_dim), "float32"),),
                          detail={"action_dim": o.action_dim, "process_noise": q, "measurement_noise": r})

    # -- the retrieval table ----------------------------------------------------------------
    def _table(self, program: Program, loop_rec: DecodeLoop, ctx: PassContext):
        o = self.options
        ex = {k: program.graphs[_input_graph(program)].example_inputs[i] for i, k in enumerate(loop_rec.inputs)}
        if o.keys is not None:
            unknown = [k for k in o.keys if k not in ex]
            if unknown or not o.keys:
                raise OptionError(f"pass '{NAME}': option 'keys': {unknown or 'none given'} are not inputs of the "
                                  f"program (its inputs: {list(loop_rec.inputs)})")
            keys = list(o.keys)
        else:
            keys = [k for k, t in ex.items() if t[0].numel() <= _SMALL_KEY]
            if not keys:
                raise PassError(f"pass '{NAME}': no program input is small enough to key the retrieval table "
                                f"(at most {_SMALL_KEY} values per row); name the keys with option 'keys'")
        if o.table is not None:
            cols, rows = _load_table(o.table, keys, loop_rec.n_tokens, ex)
            source = os.path.basename(o.table)
        else:
            cols, rows = self._from_calibration(program, loop_rec, ctx, keys)
            source = "calibration"
        float_keys, int_keys, order = [], [], []
        for k in keys:
            if cols[k].dtype.is_floating_point:
                order.append(("f", len(float_keys)))
                float_keys.append(cols[k])
            else:
                order.append(("i", len(int_keys)))
                int_keys.append(cols[k])
        if int(rows.min()) < 0 or int(rows.max()) >= loop_rec.vocab:
            raise PassError(f"pass '{NAME}': the retrieval table holds tokens outside [0, {loop_rec.vocab})")
        return keys, float_keys, int_keys, order, rows, source

    def _from_calibration(self, program: Program, loop_rec: DecodeLoop, ctx: PassContext, keys: list[str]):
        inputs, tokens, _ = _decode_calibration(program, loop_rec, ctx, (), self.options.table_size, "retrieval")
        cols = {k: torch.cat([x[loop_rec.inputs.index(k)] for x in inputs]) for k in keys}
        return cols, tokens


def _decode_calibration(program: Program, loop_rec: DecodeLoop, ctx: PassContext, refs: tuple[str, ...],
                        limit: int, drafter: str) -> tuple[list[tuple], torch.Tensor, list[torch.Tensor]]:
    """Greedy-decode up to `limit` calibration inputs with the program; returns the inputs, their
    tokens (M, N) and the values of `refs` (each concatenated over the inputs)."""
    calib = ctx.calibration
    if callable(calib) or not calib:
        raise PassError(f"pass '{NAME}': drafter '{drafter}' learns from calibration inputs (a list of input "
                        "tuples, e.g. demonstration observations); none were given. Pass calibration=[...]"
                        + (" or option 'table' (an .npz file)" if drafter == "retrieval" else ""))
    sets = list(calib)[:limit]
    greedy = program.replace(plan=dataclasses.replace(program.plan, outputs=(loop_rec.tokens, *refs)))
    runner = greedy.runner()
    inputs, rows, vals = [], [], [[] for _ in refs]
    for i, x in enumerate(sets):
        x = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        if len(x) != len(loop_rec.inputs):
            raise PassError(f"pass '{NAME}': calibration input {i} has {len(x)} tensors; the program "
                            f"takes {len(loop_rec.inputs)} ({list(loop_rec.inputs)})")
        runner.reset()
        with torch.no_grad():
            out = runner(list(x))
        inputs.append(x)
        rows.append(out[0])
        for v, o in zip(vals, out[1:]):
            v.append(o)
        if i % 256 == 255:
            ctx.progress(f"{NAME}: {i + 1}/{len(sets)} calibration inputs decoded")
    return inputs, torch.cat(rows), [torch.cat(v) for v in vals]


class _FixedNoise(torch.nn.Module):
    """The denoiser drafter's initial sample: one stored row, repeated over the batch of the condition."""

    def __init__(self, noise: torch.Tensor):
        super().__init__()
        self.register_buffer("noise", noise.detach().clone())

    def forward(self, cond0: torch.Tensor) -> torch.Tensor:
        return self.noise.expand(cond0.shape[0], *self.noise.shape[1:]).clone()


class _Identity(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Zeros(torch.nn.Module):
    """The cold-start draft: zeros shaped like the tokens."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(tokens)


#: selectors that choose once per policy call (every select and loop iteration of one call takes the
#: same case): the verify loop may call the head through them and stay greedy decoding's equal
PER_CALL_SELECTORS = frozenset({"motion"})


def _head_graphs(program: Program, rec: DecodeLoop, loops: list[Loop]) -> list[str]:
    """The graphs the greedy loops call as the head: the head itself, or the variants an earlier pass
    put in its place behind a select that chooses once per call (dynamic_precision's motion
    select). Verification then runs the variant greedy decoding would have run for that call, so
    exact acceptance stays lossless. A select that may choose per iteration (a step table, bins on
    a value of the loop) would verify a run of tokens with another variant than greedy decoding
    used for each: refused."""
    from pared.ir.plan import iter_nodes
    called = {c.graph for lp in loops for node in lp.body.nodes[:-1] for c in iter_nodes(node) if isinstance(c, Call)}
    if rec.head in program.graphs and rec.head in called:
        heads = [rec.head]
    else:
        heads = sorted(g for g in called if g.startswith(rec.head + "."))
    if not heads:
        raise PassError(f"pass '{NAME}': the decoding loop calls neither its head graph {rec.head!r} nor variants "
                        f"of it ({rec.head}.*); an earlier pass changed the loop")
    for lp in loops:
        for node in lp.body.nodes[:-1]:
            for sel in iter_nodes(node):
                if isinstance(sel, Select) and sel.selector.kind not in PER_CALL_SELECTORS:
                    raise PassError(f"pass '{NAME}': the decoding loop chooses among {[lab for lab, _ in sel.cases]} "
                                    f"by a {sel.selector.kind!r} select, which may choose anew at each token; the "
                                    "verify loop checks several tokens per head call, so it would not verify them "
                                    f"with the variants greedy decoding uses. Run {NAME} before that pass")
    return heads


def _input_graph(program: Program) -> str:
    """The graph that reads the program's inputs (the Decoder's encoder)."""
    for c in program.plan.calls():
        if any(r.startswith("in:") for r in c.inputs):
            return c.graph
    raise PassError(f"pass '{NAME}': no graph of the plan reads the program's inputs")


def _pick_loops(body: Node, rec: DecodeLoop) -> list[Loop]:
    """The greedy loops: count = N, body a Seq ending in a Call of the pick graph."""
    from pared.ir.plan import iter_nodes
    out = []
    for node in iter_nodes(body):
        if (isinstance(node, Loop) and node.count == rec.n_tokens and isinstance(node.body, Seq)
                and node.body.nodes and isinstance(node.body.nodes[-1], Call) and node.body.nodes[-1].graph == rec.pick):
            out.append(node)
    return out


def _load_table(path: str, keys: list[str], n: int, ex: dict) -> tuple[dict, torch.Tensor]:
    if not os.path.exists(path):
        raise OptionError(f"pass '{NAME}': option 'table': {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise OptionError(f"pass '{NAME}': option 'table': {path} is not an .npz of arrays ({e})") from e
    missing = [k for k in [*keys, "tokens"] if k not in data]
    if missing:
        raise OptionError(f"pass '{NAME}': option 'table': {path} lacks arrays {missing} (it has {sorted(data)}; "
                          "one per key input and 'tokens')")
    rows = torch.from_numpy(np.ascontiguousarray(data["tokens"])).to(torch.int64)
    if rows.dim() != 2 or rows.shape[1] != n:
        raise OptionError(f"pass '{NAME}': option 'table': 'tokens' in {path} must be (M, {n}), got {tuple(rows.shape)}")
    cols = {}
    for k in keys:
        a = torch.from_numpy(np.ascontiguousarray(data[k]))
        if a.shape[0] != rows.shape[0] or a[0].numel() != ex[k][0].numel():
            raise OptionError(f"pass '{NAME}': option 'table': {k!r} in {path} must be ({rows.shape[0]}, ...) with "
                              f"{ex[k][0].numel()} values per row like the input, got {tuple(a.shape)}")
        cols[k] = a.to(ex[k].dtype)
    return cols, rows


@dataclass(frozen=True)
class DraftParts:
    """What a drafter adds: its graphs; the plan node that drafts every call (or, with `cold`, every
    call but the request's first, whose draft `cold` is verified to the end); a node run after
    each call (`after`: the drafter's own history); its state; its settings for the record."""
    graphs: dict
    draft: Node
    cold: Node | None = None
    after: Node | None = None
    state: tuple[StateBuffer, ...] = ()
    detail: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    step_values: tuple = ()                 # the denoiser drafter's per-step values
    records: tuple = ()                     # program-wide records it adds (the denoiser's DenoiseLoop)


@dataclass(frozen=True)
class SpeculativePlan(Record):
    """What speculative_decode decided: the drafter, the acceptance radius (0 with no cap and no skip:
    lossless) and the drafter's settings (those of other drafters stay at their defaults)."""
    drafter: str
    radius: int
    tokens: int
    lossless: bool
    refill: str = "head"
    max_verify: int | None = None
    sequence: float | None = None
    # retrieval
    keys: tuple[str, ...] = ()
    table_rows: int = 0
    table: str = ""
    skip_verify_below: float | None = None
    # kalman
    action_dim: int | None = None
    process_noise: float | None = None
    measurement_noise: float | None = None
    # distilled
    draft_hidden: int | None = None
    draft_steps: int | None = None
    samples: int = 0
    loss_first: float | None = None
    loss_last: float | None = None
    train_token_accuracy: float | None = None
    # denoiser
    draft_model: str = ""
    sampler_steps: int | None = None
    # hybrid
    hybrid: tuple[str, ...] = ()        # (fine-motion drafter, coarse-motion drafter)
    speed_edge: float | None = None     # the end-effector speed between them
