"""Head-aware KV-cache policies for streaming generation (Pyramid Forcing; StreamingLLM and
sliding windows as the uniform baselines).

Before (ir/stream.py): the cache keeps what the captured Streamer's layout says (by default
the last `capacity_frames` frames for every head).
After:  every (layer, head) keeps what its policy says (ir/kvcache.py: sink, recent ring,
        strided / periodic / merged middle), at a static capacity F frames per head:

    window       every head: the last `frames` frames (a FIFO)
    sink_window  every head: the first `sink` frames + the last `frames - sink` (StreamingLLM)
    heavy        every head: the first `sink` frames, then half the rest the last frames and half
                 the heavy hitters among the frames leaving them (H2O, per frame: the most attended)
    snap         as heavy, ranked by the latest appending call's attention alone (SnapKV's
                 observation window) instead of the accumulated one
    pyramid      by head type (Pyramid Forcing's table, every number an option):
                   anchor: sink 3 + strided middle (interval 6, 4 frames) + recent 4
                   wave:   sink 1 + periodic middle (period 6, 4 frames) + recent 4
                   veil:   sink 3 + merged middle (2 frames per slot, 4 slots) + recent 4
                   dummy:  nothing (the current frame only; Dummy Forcing's dropped heads)
                 the types from option `head_types` (a [layers][heads] table of names) or from
                 the HeadTypes record of analysis `head_types`
    table        option `policies`: a [layers][heads] table of policies (ir/kvcache.HeadPolicy fields)

Any head's middle may be `heavy` or `snap` (through `types` or `policies` too). A layout with
such a head is scored: the step graph gains an output, the attention mass each cache slot received
(passes/kv/mass.py), and the state a score per frame slot that the append accumulates and
ranks by (ir/kvcache.py). Put such a policy before kv_drop, which keeps the mass right for the
heads it splits off.

Budgets. `frames: B` sizes window, sink_window, heavy and snap, and rescales every pyramid type to B frames
(its sink kept, the rest split between recent and middle in the type's own proportion).
`target: {goal}` instead searches the smallest B (bisection from 1 to `max_frames`, default the
cache's capacity now) whose layout still meets the goal on the calibration stream, measured
against the program's outputs with the cache in force before (psnr_db, cosine, rel_l2, ...);
assumed monotone (a larger budget never measures worse), recorded as KVBudgetSearch. The goal
is measured teacher-forced (goal_trials): every candidate is driven with the inputs the program
before received over the calibration stream, and the outputs compared call by call; a
free-running rollout through the candidate would measure how far two samples drift apart.
With option `judge` (a callable or `file.py:function`) the goal is measured on the rollouts
instead: the program before and each candidate run the calibration loop free-running, and
judge(reference, candidate) scores the two loops' results by the quality a user cares about
(accuracy_drop, error_rise: e.g. examples/video_ar/stream.py:judge, the digits' identity and the
motion's velocity error on the calibration clips against the full cache's). A per-call error does
not track that: on video_ar one dropped head measured 35 dB per call and still cost 2.6 identity
points over a rollout.

Only the cache's graphs (kv.init, kv.append) and the state declarations change (and, for a
scored layout, the step's mass output): the step graph, captured with a dynamic capacity,
reads any capacity, and whatever earlier passes did to it stays. A step captured with a
static capacity takes only a layout of that capacity (the pass says so otherwise).

Reads: the KVStream record (capture of a pared.ir.stream.Streamer writes it); for `pyramid`
without `head_types`, the HeadTypes record.
Writes: graphs kv.init and kv.append (and the plan's calls of them), the plan's kv.* state
declarations, the step graph's kv_mass output where the layout is scored (or its removal), the
KVStream record (layout, policy, mass); with `target`, a KVBudgetSearch record (the goal and its trials).
Invariant: the program's outputs are the step's with the cache each head's policy keeps
(tests: against an eager step fed the cache of ir.kvcache.KVReference).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import torch

from pared.analysis.head_types import HeadTypes
from pared.analysis.metrics import compare_outputs
from pared.analysis.recorder import record_calls, replay_inputs, run_free
from pared.analysis.search import smallest_meeting
from pared.ir.errors import OptionError, PassError
from pared.ir.goal import Goal
from pared.ir.kvcache import HeadPolicy, KVLayout, rows_layout, uniform_policy
from pared.ir.program import Program
from pared.ir.records import Record
from pared.ir.stream import (ALL_STATES, STATES, KVStream, append_inputs, cache_graphs, rewire, state_declarations,
                             stream_record)
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, RewritePass, check_range, register_pass
from pared.passes.kv.mass import drop_mass, report_mass

NAME = "kv_policy"
UNIFORM = ("window", "sink_window", "heavy", "snap")     # one policy for every head, sized by the budget
HEAD_TYPES = ("anchor", "wave", "veil", "dummy")

#: Pyramid Forcing's shipped per-type policies (METHODS.md)
PYRAMID_DEFAULTS: dict[str, dict] = {
    "anchor": {"sink": 3, "recent": 4, "middle": "strided", "middle_frames": 4, "interval": 6},
    "wave": {"sink": 1, "recent": 4, "middle": "periodic", "middle_frames": 4, "interval": 6},
    "veil": {"sink": 3, "recent": 4, "middle": "merged", "middle_frames": 4, "interval": 2},
    "dummy": {},
}


#: the metrics option 'target' can name (analysis.metrics.compare_outputs of the calibration stream)
TARGET_METRICS = ("psnr_db", "cosine", "cosine_mean", "rel_l2", "sqnr_db")
#: and, with option 'judge', the judged ones (the judge returns them; it may return the above too)
JUDGED_METRICS = ("accuracy_drop", "error_rise")


def judge_name(judge: Any) -> str:
    """How a record names option 'judge' ("" when there is none: the goal was measured teacher-forced)."""
    if judge is None:
        return ""
    mod = getattr(judge, "__module__", "") or ""
    return f"{mod.rsplit('.', 1)[-1]}.{getattr(judge, '__qualname__', repr(judge))}".lstrip(".")


def check_judge(name: str, judge: Any, target: Any) -> None:
    """Option 'judge' of a goal search (kv_policy, kv_drop): a callable, and only with 'target'.

    Raises:
        OptionError: naming the pass and the option.
    """
    if judge is None:
        return
    if target is None:
        raise OptionError(f"pass '{name}': option 'judge' measures option 'target' (a goal); give a target too")
    if not callable(judge):
        raise OptionError(f"pass '{name}': option 'judge' must be a callable judge(reference, candidate) -> "
                          f"{{metric: value}} or 'path/to/file.py:function', got {judge!r}")


@dataclass(frozen=True)
class KVBudgetSearch(Record):
    """kv_policy's budget search: the policy, the budget chosen (frames per head), the goal, and
    each trial (frames, ((metric, value), ...)) in the order tried; `judge`: the judge that
    measured the goal on free-running rollouts ("": teacher-forced, per call)."""

    policy: str
    frames: int
    target: tuple[tuple[str, float], ...]
    trials: tuple[tuple[int, tuple[tuple[str, float], ...]], ...]
    judge: str = ""


def goal_trials(program: Program, ctx: PassContext, goal: Goal, describe: Callable[[int], str],
                judge: Callable[[Any, Any], Mapping[str, float]] | None = None, where: str = NAME
                ) -> tuple[Callable[[int, Callable[[], Program]], bool], list]:
    """A goal search's measuring (kv_policy's budget, kv_drop's head count): met(key, build)
    measures the candidate build() against `program` once per key, appends (key, ((metric,
    value), ...)) to the returned trials list, reports progress (`describe(key)`) and says
    whether the goal holds.

    Without a judge, measured teacher-forced: the inputs of every call `program` receives over the
    calibration stream are recorded once with their outputs (analysis.recorder.record_calls), and
    `program` and each candidate are driven with those same inputs (replay_inputs), their per-call
    outputs compared. A streamed calibration is typically a free-running rollout, each frame
    generated from the earlier outputs; run through a candidate, the loop follows the candidate's
    own trajectory, and any small change sends it elsewhere, so an output metric would measure two
    different samples drifting apart (video_ar: 13 to 17 dB PSNR for 1 to 12 dropped heads) instead
    of the candidate's error. With the reference's inputs every candidate sees the same history,
    its cache computed by its own policy from it, and the error is measured per call. A list
    calibration is replayed as it is either way.

    With a judge, measured free-running (analysis.recorder.run_free): `program` and each candidate
    run the calibration loop on their own outputs, and `judge(reference, candidate)` scores the two
    results (what the loop returns, e.g. the rollouts' frames) by the quality the user cares about,
    returning at least the goal's metrics (accuracy_drop, error_rise, ...): the rollout's quality,
    which a per-call error does not track (a head whose per-call error is small can still let a
    long rollout drift).

    Raises:
        PassError: when there is no calibration stream, or the judge fails or leaves out a metric
            of the goal (naming the pass `where`, the judge and the metric).
    """
    trials: list = []
    cache: dict[int, bool] = {}
    if judge is None:
        requests, ref = record_calls(program, ctx.calibration)      # ref: what replay_inputs(program) gives

        def measure(candidate: Program) -> Mapping[str, float]:
            return compare_outputs(ref, replay_inputs(candidate, requests))
    else:
        name = judge_name(judge)
        reference = run_free(program, ctx.calibration)

        def measure(candidate: Program) -> Mapping[str, float]:
            try:
                got = judge(reference, run_free(candidate, ctx.calibration))
            except Exception as e:
                raise PassError(f"pass '{where}': option 'judge' ({name}) failed: {type(e).__name__}: {e}") from e
            if not isinstance(got, Mapping):
                raise PassError(f"pass '{where}': option 'judge' ({name}) must return a mapping of metric -> value, "
                                f"got {type(got).__name__}")
            missing = [m for m in goal.metrics if m not in got]
            if missing:
                raise PassError(f"pass '{where}': option 'judge' ({name}) returned no {missing[0]!r}, a metric of "
                                f"the goal (it returned {sorted(got)})")
            return got

    def met(key: int, build: Callable[[], Program]) -> bool:
        if key not in cache:
            measured = measure(build())
            vals = tuple((m, round(float(measured[m]), 6)) for m in goal.metrics)
            trials.append((key, vals))
            ctx.progress(f"{describe(key)}: " + ", ".join(f"{m} {v:.4g}" for m, v in vals))
            cache[key] = goal.met(measured)
        return cache[key]
    return met, trials


def rescale(p: HeadPolicy, frames: int) -> HeadPolicy:
    """A pyramid type's policy at a budget of `frames`: its sink (at most frames - 1), the rest split
    between recent and middle in the policy's own proportion (recent at least 1); a head keeping
    nothing keeps nothing."""
    if p.frames == 0:
        return p
    sink = min(p.sink, frames - 1)
    rest = frames - sink
    if p.middle == "none":
        return dataclasses.replace(p, sink=sink, recent=rest)
    recent = max(1, -(-rest * p.recent // (p.recent + p.middle_frames)))
    middle = rest - recent
    if middle < 1:
        return HeadPolicy(sink=sink, recent=rest)
    return dataclasses.replace(p, sink=sink, recent=recent, middle_frames=middle,
                               phase=min(p.phase, p.interval - 1))


def type_fields(head_type: str, override: Mapping[str, Any]) -> dict:
    """A pyramid type's policy fields: the defaults with `override` on top; an override naming
    another middle kind drops the default kind's interval and phase unless it gives its own."""
    base = dict(PYRAMID_DEFAULTS[head_type])
    if "middle" in override and override["middle"] != base.get("middle"):
        base.pop("interval", None)
        base.pop("phase", None)
    return {**base, **dict(override)}


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

    ref_options = ("judge",)

    @dataclass(frozen=True, kw_only=True)
    class Options:
        policy: Literal["window", "sink_window", "heavy", "snap", "pyramid", "table"] = "pyramid"
        frames: int | None = None          # the budget in frames per head (window, sink_window, heavy;
                                           # pyramid: rescaled)
        sink: int = 1                      # sink_window, heavy, snap: sink frames
        head_types: list | tuple | None = None   # pyramid: [layers][heads] of anchor | wave | veil | dummy
        types: dict | None = None          # pyramid: per type, policy fields replacing the defaults
        policies: list | tuple | None = None     # table: [layers][heads] of policy fields
        target: Any = None                 # instead of frames: the smallest budget meeting this goal on the
                                           # calibration stream against the cache before, e.g. {psnr_db: 30}
        max_frames: int | None = None      # with target: the largest budget tried (default: the cache's now)
        judge: Any = None                  # with target: measure it free-running, judge(reference, candidate)
                                           # -> {metric: value} (a callable or `file.py:function`)

        def __post_init__(self):
            check_judge(NAME, self.judge, self.target)
            if self.target is not None:
                if self.policy == "table":
                    raise OptionError(f"pass '{NAME}': option 'target' searches a budget; policy 'table' has none")
                if self.frames is not None:
                    raise OptionError(f"pass '{NAME}': give option 'frames' (a budget) or 'target' (a goal), not both")
                object.__setattr__(self, "target", Goal.parse(self.target, f"pass '{NAME}': option 'target'",
                                                              TARGET_METRICS + JUDGED_METRICS if self.judge
                                                              else TARGET_METRICS))
            elif self.max_frames is not None:
                raise OptionError(f"pass '{NAME}': option 'max_frames' goes with 'target'")
            if self.max_frames is not None:
                check_range(NAME, "max_frames", self.max_frames, lo=1)
            if self.policy in UNIFORM and self.frames is None and self.target is None:
                raise OptionError(f"pass '{NAME}': policy {self.policy!r} needs option 'frames' (the budget) or "
                                  "'target' (a goal)")
            if self.frames is not None:
                check_range(NAME, "frames", self.frames, lo=1)
                if self.policy == "table":
                    raise OptionError(f"pass '{NAME}': option 'frames' does not apply to policy 'table' (its "
                                      "policies say what each head keeps)")
            check_range(NAME, "sink", self.sink, lo=0)
            if self.policy in ("sink_window", "heavy", "snap") and self.frames is not None:
                try:
                    uniform_policy(self.policy, self.frames, self.sink)
                except OptionError as e:
                    raise OptionError(f"pass '{NAME}': {e}") from None
            if self.policy == "table" and self.policies is None:
                raise OptionError(f"pass '{NAME}': policy 'table' needs option 'policies' ([layers][heads])")
            if self.types is not None:
                unknown = set(self.types) - set(HEAD_TYPES)
                if unknown:
                    raise OptionError(f"pass '{NAME}': option 'types' names unknown head type(s) {sorted(unknown)}; "
                                      f"known: {list(HEAD_TYPES)}")
                for t, d in self.types.items():
                    if not isinstance(d, Mapping):
                        _policy(f"option 'types' ({t})", d)
                    _policy(f"option 'types' ({t})", type_fields(t, d))
            if self.head_types is not None:
                bad = {x for row in self.head_types for x in (row if isinstance(row, (list, tuple)) else [row])
                       if x not in HEAD_TYPES}
                if bad:
                    raise OptionError(f"pass '{NAME}': option 'head_types' holds unknown type(s) {sorted(bad)}; "
                                      f"known: {list(HEAD_TYPES)}")

    def layout(self, rec: KVStream, program: Program, frames: int | None = None) -> KVLayout:
        """The layout the options give for this stream (at a budget of `frames`, default option 'frames')."""
        o, L, H, T = self.options, rec.layers, rec.heads, rec.tokens_per_frame
        frames = o.frames if frames is None else frames
        if o.policy in UNIFORM:
            return KVLayout.uniform(uniform_policy(o.policy, frames, min(o.sink, frames - 1)), L, H, T)
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
        per_type = {t: _policy(f"type {t}", type_fields(t, (o.types or {}).get(t, {}))) for t in HEAD_TYPES}
        if frames is not None:
            per_type = {t: rescale(p, frames) for t, p in per_type.items()}
        return KVLayout(tuple(tuple(per_type[t] for t in row) for row in types), T)

    def _search(self, program: Program, rec: KVStream, ctx: PassContext, old: KVLayout) -> tuple[int, tuple]:
        """The smallest budget (frames per head) whose layout meets the goal on the calibration stream
        against the cache in force, teacher-forced (goal_trials), by bisection (assumed monotone:
        a larger budget never measures worse); returns (frames, trials: (frames, ((metric, value), ...)) in the order tried)."""
        o = self.options
        if ctx.calibration is None:
            raise PassError(f"pass '{NAME}': option 'target' needs a calibration stream to measure the goal on")
        hi = o.max_frames or old.frames
        met, trials = goal_trials(program, ctx, o.target, lambda f: f"{NAME}: {o.policy} at {f} frame(s)", o.judge)

        def meets(frames: int) -> bool:
            return met(frames, lambda: with_layout(program, rec, self.layout(rec, program, frames), o.policy))

        lo = 1 if o.policy not in ("sink_window", "heavy", "snap") else o.sink + 1
        if not meets(hi):
            ctx.log.warning("%s: even %d frames miss the goal %s; keeping %d", NAME, hi, dict(o.target.terms), hi)
            return hi, tuple(trials)
        return smallest_meeting(meets, lo, hi), tuple(trials)

    @staticmethod
    def _check_table(option: str, rows: Any, L: int, H: int) -> None:
        if (not isinstance(rows, (list, tuple)) or len(rows) != L
                or any(not isinstance(r, (list, tuple)) or len(r) != H for r in rows)):
            raise OptionError(f"pass '{NAME}': option '{option}' must be a [layers][heads] table: {L} rows of {H} "
                              "for this model")

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        rec = stream_record(program, NAME)
        o = self.options
        old = rec.kv_layout()
        trials: tuple = ()
        if o.target is not None:
            frames, trials = self._search(program, rec, ctx, old)
            new = self.layout(rec, program, frames)
        else:
            new = self.layout(rec, program)
        if new == old:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={})
        out = with_layout(program, rec, new, o.policy)
        if o.target is not None:
            out = out.with_record(KVBudgetSearch(o.policy, new.frames, o.target.terms, trials, judge_name(o.judge)))
        stats = {"frames_per_head": new.frames, "kept_frames_mean": round(new.kept_frames(), 3),
                 "capacity_tokens": new.capacity, "was_frames": old.frames}
        ctx.log.info("%s: %s, %d frame slot(s) per head (mean kept %.2f), was %d", NAME, self.options.policy,
                     new.frames, new.kept_frames(), old.frames)
        # the step graph is untouched: the head statistics (measured over the cache before) stay
        return PassResult(out, modified=True, preserved=(HeadTypes,), stats=stats)


def with_layout(program: Program, rec: KVStream, new: KVLayout, policy: str, who: str = NAME,
                rows: tuple | None = None) -> Program:
    """`program` with the cache kept by layout `new`: kv.init and kv.append captured for it, the
    kv.* state declarations of its capacity, the KVStream record updated (policy: its name). A
    scored layout (heavy hitters) makes the step graph report its attention mass (passes/kv/mass.py)
    and carries frame scores as state; an unscored one removes both. With `rows` ((layer, head)
    pairs) the state is compact, only those rows (KVStream.rows; the caller has rewritten the step
    graph to read it: kv_drop).

    Raises:
        PassError: when the step graph takes only its captured capacity and `new` needs another;
            when the state is already compact (kv_drop rewrote the step to read it).
    """
    old = rec.kv_layout()
    if not rec.dynamic_capacity and new.capacity != old.capacity:
        raise PassError(f"pass '{who}': the step graph was captured with a static cache of {old.frames} frame(s) (it did not "
                        f"export with a dynamic capacity), and this layout needs {new.frames}; capture the "
                        f"Streamer with a layout of {new.frames} frames")
    if new.scored:
        program, rec = report_mass(program, rec, who)     # (names kv_drop's split sites first)
    if rec.rows is not None:
        raise PassError(f"pass '{who}': kv_drop compacted the cache state to the {len(rec.rows)} (layer, head) "
                        "rows that keep frames and rewrote the step graph to read them; apply this pass before "
                        "kv_drop, or run kv_drop with compact: false")
    init, append = program.graphs[rec.init], program.graphs[rec.append]
    x_ex = init.example_inputs[0]
    k_new, k_fp = append_inputs(rec)
    new_kv_ex, fp_ex = append.example_inputs[k_new], append.example_inputs[k_fp]
    batch_dyn = bool(init.dynamic_dims and init.dynamic_dims[0])
    batch_dim = torch.export.Dim("batch", min=1, max=4096) if batch_dyn else None
    graphs = dict(program.graphs)
    graphs.update(cache_graphs(new, rec.head_dim, x_ex, new_kv_ex, fp_ex, batch_dim, rows))
    plan = rewire(program.plan, rec, new)
    cache_decl = next(s for s in plan.state if s.name == STATES[0])
    keep = tuple(s for s in plan.state if s.name not in ALL_STATES)
    decl = state_declarations(new if rows is None else rows_layout(new, rows), cache_decl.shape[2], rec.head_dim,
                              cache_decl.dtype)
    plan = dataclasses.replace(plan, state=keep + decl)
    rec = dataclasses.replace(rec, layout=new, policy=policy, states=ALL_STATES if new.scored else STATES,
                              rows=None if rows is None else tuple(tuple(r) for r in rows))
    out = program.replace(graphs=graphs, plan=plan).with_record(rec)
    if not new.scored and rec.mass:
        out, _ = drop_mass(out, rec)
    return out
