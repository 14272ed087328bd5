"""Head-aware KV-cache policies for streaming generation (Pyramid Forcing; StreamingLLM and
sliding windows as the uniform baselines).

Before (ir/stream.py): the cache keeps what the captured Streamer's layout says (by default
the last `capacity_frames` frames for every head).
After:  every (layer, head) keeps what its policy says (ir/kvcache.py: sink, recent ring,
        strided / periodic / merged middle), at a static capacity F frames per head:

    window       every head: the last `frames` frames (a FIFO)
    sink_window  every head: the first `sink` frames + the last `frames - sink` (StreamingLLM)
    pyramid      by head type (Pyramid Forcing's table, every number an option):
                   anchor: sink 3 + strided middle (interval 6, 4 frames) + recent 4
                   wave:   sink 1 + periodic middle (period 6, 4 frames) + recent 4
                   veil:   sink 3 + merged middle (2 frames per slot, 4 slots) + recent 4
                   dummy:  nothing (the current frame only; Dummy Forcing's dropped heads)
                 the types from option `head_types` (a [layers][heads] table of names) or from
                 the HeadTypes record of analysis `head_types`
    table        option `policies`: a [layers][heads] table of policies (ir/kvcache.HeadPolicy fields)

Only the cache's graphs (kv.init, kv.append) and the state declarations change: the step
graph, captured with a dynamic capacity, reads any capacity, and whatever earlier passes
did to it stays. A step captured with a static capacity takes only a layout of that
capacity (the pass says so otherwise).

Reads: the KVStream record (capture of a pared.ir.stream.Streamer writes it); for `pyramid`
without `head_types`, the HeadTypes record.
Writes: graphs kv.init and kv.append, the plan's kv.* state declarations, the KVStream record
(layout, policy).
Invariant: the program's outputs are the step's with the cache each head's policy keeps
(tests: against an eager step fed the cache of ir.kvcache.KVReference).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch

from pared.analysis.head_types import HeadTypes
from pared.ir.errors import OptionError, PassError
from pared.ir.kvcache import HeadPolicy, KVLayout, uniform_policy
from pared.ir.program import Program
from pared.ir.stream import STATES, KVStream, cache_graphs, state_declarations
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, RewritePass, check_range, register_pass

NAME = "kv_policy"
HEAD_TYPES = ("anchor", "wave", "veil", "dummy")

#: Pyramid Forcing's shipped per-type policies (METHODS.md)
PYRAMID_DEFAULTS: dict[str, dict] = {
    "anchor": {"sink": 3, "recent": 4, "middle": "strided", "middle_frames": 4, "interval": 6},
    "wave": {"sink": 1, "recent": 4, "middle": "periodic", "middle_frames": 4, "interval": 6},
    "veil": {"sink": 3, "recent": 4, "middle": "merged", "middle_frames": 4, "interval": 2},
    "dummy": {},
}


def _policy(where: str, d: Any) -> HeadPolicy:
    if isinstance(d, HeadPolicy):
        return d
    if not isinstance(d, Mapping):
        raise OptionError(f"pass '{NAME}': {where} must be a mapping of policy fields (sink, recent, middle, "
                          f"middle_frames, interval, phase), got {type(d).__name__}")
    try:
        return HeadPolicy.from_json(d)
    except OptionError as e:
        raise OptionError(f"pass '{NAME}': {where}: {e}") from None


@register_pass(NAME)
class KVPolicy(RewritePass):
    """Set what each (layer, head) keeps of a streamed KV cache (see module docstring)."""

    @dataclass(frozen=True, kw_only=True)
    class Options:
        policy: Literal["window", "sink_window", "pyramid", "table"] = "pyramid"
        frames: int | None = None          # window / sink_window: the budget in frames per head
        sink: int = 1                      # sink_window: sink frames
        head_types: list | tuple | None = None   # pyramid: [layers][heads] of anchor | wave | veil | dummy
        types: dict | None = None          # pyramid: per type, policy fields replacing the defaults
        policies: list | tuple | None = None     # table: [layers][heads] of policy fields

        def __post_init__(self):
            if self.policy in ("window", "sink_window"):
                if self.frames is None:
                    raise OptionError(f"pass '{NAME}': policy {self.policy!r} needs option 'frames' (the budget)")
                check_range(NAME, "frames", self.frames, lo=1)
                check_range(NAME, "sink", self.sink, lo=0)
                if self.policy == "sink_window":
                    uniform_policy("sink_window", self.frames, self.sink)
            elif self.frames is not None:
                raise OptionError(f"pass '{NAME}': option 'frames' belongs to policies 'window' and 'sink_window', "
                                  f"not {self.policy!r}")
            if self.policy == "table" and self.policies is None:
                raise OptionError(f"pass '{NAME}': policy 'table' needs option 'policies' ([layers][heads])")
            if self.types is not None:
                unknown = set(self.types) - set(HEAD_TYPES)
                if unknown:
                    raise OptionError(f"pass '{NAME}': option 'types' names unknown head type(s) {sorted(unknown)}; "
                                      f"known: {list(HEAD_TYPES)}")
                for t, d in self.types.items():
                    _policy(f"option 'types' ({t})", d)
            if self.head_types is not None:
                bad = {x for row in self.head_types for x in (row if isinstance(row, (list, tuple)) else [row])
                       if x not in HEAD_TYPES}
                if bad:
                    raise OptionError(f"pass '{NAME}': option 'head_types' holds unknown type(s) {sorted(bad)}; "
                                      f"known: {list(HEAD_TYPES)}")

    def layout(self, rec: KVStream, program: Program) -> KVLayout:
        """The layout the options give for this stream."""
        o, L, H, T = self.options, rec.layers, rec.heads, rec.tokens_per_frame
        if o.policy in ("window", "sink_window"):
            return KVLayout.uniform(uniform_policy(o.policy, o.frames, o.sink), L, H, T)
        if o.policy == "table":
            rows = o.policies
            self._check_table("policies", rows, L, H)
            return KVLayout(tuple(tuple(_policy(f"option 'policies' [{li}][{hi}]", p) for hi, p in enumerate(r))
                                  for li, r in enumerate(rows)), T)
        types = o.head_types
        if types is None:
            rec_types = program.records.get("HeadTypes")
            if rec_types is None:
                raise OptionError(f"pass '{NAME}': policy 'pyramid' needs each head's type: give option 'head_types' "
                                "([layers][heads] of anchor | wave | veil | dummy) or run analysis 'head_types' "
                                "before it")
            types = rec_types.types
        self._check_table("head_types", types, L, H)
        per_type = {t: _policy(f"type {t}", {**PYRAMID_DEFAULTS[t], **dict((o.types or {}).get(t, {}))})
                    for t in HEAD_TYPES}
        return KVLayout(tuple(tuple(per_type[t] for t in row) for row in types), T)

    @staticmethod
    def _check_table(option: str, rows: Any, L: int, H: int) -> None:
        if (not isinstance(rows, (list, tuple)) or len(rows) != L
                or any(not isinstance(r, (list, tuple)) or len(r) != H for r in rows)):
            raise OptionError(f"pass '{NAME}': option '{option}' must be a [layers][heads] table: {L} rows of {H} "
                              "for this model")

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        rec = program.records.get("KVStream")
        if not isinstance(rec, KVStream):
            raise PassError(f"pass '{NAME}' needs a streamed KV cache: wrap the one-frame step model in "
                            "pared.ir.stream.Streamer(step, layers=, heads=, head_dim=, tokens_per_frame=) so capture "
                            "declares it (the program has no KVStream record)")
        new = self.layout(rec, program)
        old = rec.kv_layout()
        if new == old:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={})
        out = with_layout(program, rec, new, self.options.policy)
        stats = {"frames_per_head": new.frames, "kept_frames_mean": round(new.kept_frames(), 3),
                 "capacity_tokens": new.capacity, "was_frames": old.frames}
        ctx.log.info("%s: %s, %d frame slot(s) per head (mean kept %.2f), was %d", NAME, self.options.policy,
                     new.frames, new.kept_frames(), old.frames)
        # the step graph is untouched: the head statistics (measured over the cache before) stay
        return PassResult(out, modified=True, preserved=(HeadTypes,), stats=stats)


def with_layout(program: Program, rec: KVStream, new: KVLayout, policy: str, who: str = NAME) -> Program:
    """`program` with the cache kept by layout `new`: kv.init and kv.append captured for it, the
    kv.* state declarations of its capacity, the KVStream record updated (policy: its name).

    Raises:
        PassError: when the step graph takes only its captured capacity and `new` needs another.
    """
    old = rec.kv_layout()
    if not rec.dynamic_capacity and new.capacity != old.capacity:
        raise PassError(f"pass '{who}': the step graph was captured with a static cache of {old.frames} frame(s) (it did not "
                        f"export with a dynamic capacity), and this layout needs {new.frames}; capture the "
                        f"Streamer with a layout of {new.frames} frames")
    init, append = program.graphs[rec.init], program.graphs[rec.append]
    x_ex = init.example_inputs[0]
    new_kv_ex, fp_ex = append.example_inputs[4], append.example_inputs[5]
    batch_dyn = bool(init.dynamic_dims and init.dynamic_dims[0])
    batch_dim = torch.export.Dim("batch", min=1, max=4096) if batch_dyn else None
    graphs = dict(program.graphs)
    graphs.update(cache_graphs(new, rec.head_dim, x_ex, new_kv_ex, fp_ex, batch_dim))
    plan = program.plan
    cache_decl = next(s for s in plan.state if s.name == STATES[0])
    keep = tuple(s for s in plan.state if s.name not in STATES)
    decl = state_declarations(new, cache_decl.shape[2], rec.head_dim, cache_decl.dtype)
    plan = dataclasses.replace(plan, state=keep + decl)
    return program.replace(graphs=graphs, plan=plan).with_record(
        dataclasses.replace(rec, layout=new.to_json(), policy=policy))
