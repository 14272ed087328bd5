"""Streaming generation with a KV cache in the Plan.

An autoregressive generator (video frame by frame, Self Forcing / CausVid style)
calls a one-frame step model that attends to the cached keys and values of earlier
frames and returns its own:

    step(*inputs, kv_cache, cache_pos, cache_valid) -> (out..., new_kv)
        kv_cache    [L, 2, B, H, C, Dh]   cached K/V, C token slots (whole frames)
        cache_pos   [L, H, C]             each slot's frame position (float)
        cache_valid [L, H, C]             bool; invalid slots are masked
        new_kv      [L, 2, B, H, T, Dh]   this call's K/V (T tokens per frame), the last output

`Streamer(step, ...)` keeps the cache for it: the program's inputs are the step's
own `inputs` and `append` ([1] float); a call with append >= 0.5 writes its
new_kv into the cache afterwards (a frame's final re-encoding), other calls (the
denoising steps of a frame) only read it. What is kept is the `KVLayout`
(ir/kvcache.py: a policy per layer and head; default the last `capacity_frames`
frames). Eager, the Streamer holds the cache itself; a request (one stream) starts
at `reset()` or at a call whose frame position is not after the last appended one.

`capture` (ir.capture) turns it into a Program of three graphs and the cache as
state of the Plan:

    Seq[ Select(table: call 0 -> init)  init: Call kv.init (in:<first input>)
                                              -> state:kv.cache, state:kv.pos, state:kv.valid, state:kv.count
         Call step (in:..., state:kv.cache, state:kv.pos, state:kv.valid) -> step.<out>..., step.new_kv
         Select(bins on in:append at 0.5)     append: Call kv.append (state:kv.cache, state:kv.pos,
                                              state:kv.valid, state:kv.count, step.new_kv, in:<frame_pos>)
                                              -> the four states ]

The step is captured with the cache capacity dynamic (a multiple of T) when it
exports that way, so a cache pass (passes/kv) changes the capacity by replacing
kv.init and kv.append and the state declarations only; the step graph and
whatever earlier passes did to it stay. The `KVStream` record names the parts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import CaptureError
from .kvcache import HeadPolicy, KVAppend, KVInit, KVLayout, append_module, layout_from, rows_append_module, rows_layout
from .records import Record

INIT, APPEND, STEP = "kv.init", "kv.append", "step"
CACHE, POS, VALID, COUNT = "kv.cache", "kv.pos", "kv.valid", "kv.count"
STATES = (CACHE, POS, VALID, COUNT)
SCORE = "kv.score"                 # [L, H, F] each frame slot's accumulated attention (scored layouts only)
ALL_STATES = STATES + (SCORE,)
MASS = "kv_mass"                   # the step output reporting the attention each cache slot received


class Streamer(torch.nn.Module):
    """A one-frame step model with its KV cache kept (see the module doc).

    Args:
        step: ``step(*inputs, kv_cache, cache_pos, cache_valid) -> (out..., new_kv)``.
        layers, heads, head_dim: the cache's shape.
        tokens_per_frame: tokens of one frame (new_kv's token dimension).
        capacity_frames: with no `layout`, keep the last this many frames (a FIFO).
        layout: a KVLayout, one HeadPolicy for every head, or a [layers][heads] table of them.
        frame_pos_input: which of the step's own inputs is the frame position ([1] float).
    """

    def __init__(self, step: torch.nn.Module, *, layers: int, heads: int, head_dim: int, tokens_per_frame: int,
                 capacity_frames: int | None = None, layout: Any = None, frame_pos_input: int = -1):
        super().__init__()
        if layout is None:
            if not capacity_frames or capacity_frames < 1:
                raise ValueError("Streamer: give capacity_frames >= 1 (a window of the last frames) or a layout")
            layout = HeadPolicy.window(capacity_frames)
        self.layout = layout if isinstance(layout, KVLayout) else layout_from(layout, layers, heads,
                                                                               tokens_per_frame)
        if self.layout.scored:
            raise ValueError("Streamer: a 'heavy' middle ranks frames by the attention the step gives them, which an "
                             "eager step does not report; capture the Streamer with another layout and apply pass "
                             "kv_policy (it makes the step graph report its attention)")
        if self.layout.tokens_per_frame != tokens_per_frame:
            raise ValueError(f"Streamer: the layout has {self.layout.tokens_per_frame} tokens per frame, the model "
                             f"{tokens_per_frame}")
        self.step, self.head_dim, self.frame_pos_input = step, head_dim, frame_pos_input
        self.init_mod, self.append_mod = KVInit(self.layout, head_dim), KVAppend(self.layout)
        self._state: tuple | None = None
        self._last = None

    def reset(self) -> None:
        """Start a new stream: forget the cache."""
        self._state, self._last = None, None

    def forward(self, *inputs: torch.Tensor) -> Any:
        if len(inputs) < 2:
            raise ValueError("Streamer: call it with the step's own inputs and then `append` ([1] float)")
        *own, append = inputs
        frame_pos = own[self.frame_pos_input]
        if self._last is not None and float(frame_pos.reshape(-1)[0]) <= self._last:
            self.reset()                                  # a new stream starts
        if self._state is None:
            self._state = self.init_mod(own[0])
        outs = self.step(*own, *self._state[:3])
        if not isinstance(outs, (tuple, list)) or len(outs) < 2:
            raise ValueError("Streamer: the step must return (out..., new_kv)")
        *out, new_kv = outs
        if float(append.reshape(-1)[0]) >= 0.5:
            self._state = self.append_mod(*self._state, new_kv, frame_pos)
            self._last = float(frame_pos.reshape(-1)[0])
        return out[0] if len(out) == 1 else tuple(out)


@dataclass(frozen=True)
class KVStream(Record):
    """Where a captured Streamer's cache is (written by capture; read and rewritten by passes/kv).

    Attributes:
        step / init / append: the graphs; states: the state names (cache, pos, valid, count).
        inputs: the program's input names (the step's own, then `append`); frame_pos: the
            frame-position input's name.
        layers, heads, head_dim, tokens_per_frame: the cache's shape.
        layout: the KVLayout in force, set by the pass named in `policy`.
        dynamic_capacity: the step graph takes any capacity (a multiple of tokens_per_frame).
        mass: the plan reference of the step's attention-mass output ([L, H, C], what a scored
            layout's append reads), or None when the step does not report it.
        rows: None when the state holds every (layer, head) ([L, 2, B, H, C, Dh]); else the
            (layer, head) of each row of a compact state ([1, 2, B, R, C, Dh], pos and valid
            [1, R, C]: state_layout()), layer-major, as kv_drop keeps it.
    """

    step: str
    init: str
    append: str
    states: tuple[str, ...]
    inputs: tuple[str, ...]
    frame_pos: str
    layers: int
    heads: int
    head_dim: int
    tokens_per_frame: int
    layout: KVLayout
    dynamic_capacity: bool
    policy: str = "window"
    mass: str | None = None
    rows: tuple[tuple[int, int], ...] | None = None

    def kv_layout(self) -> KVLayout:
        return self.layout

    def state_layout(self) -> KVLayout:
        """The layout the state is declared in: `layout`, or for a compact state one "layer" of
        the kept rows (ir/kvcache.rows_layout)."""
        return self.layout if self.rows is None else rows_layout(self.layout, self.rows)


def stream_record(program, who: str) -> KVStream:
    """The program's KVStream record.

    Raises:
        PassError: naming pass `who`, when the program has none (the model was not a Streamer).
    """
    from .errors import PassError
    rec = program.records.get("KVStream")
    if not isinstance(rec, KVStream):
        raise PassError(f"pass '{who}' needs a streamed KV cache: wrap the one-frame step model in "
                        "pared.ir.stream.Streamer(step, layers=, heads=, head_dim=, tokens_per_frame=) so capture "
                        "declares it (the program has no KVStream record)")
    return rec


def state_declarations(layout: KVLayout, batch: Any, head_dim: int, dtype: str) -> tuple:
    """The Plan's StateBuffers of the cache (and the frame scores of a scored layout)."""
    from .plan import StateBuffer
    c = layout.capacity
    out = (StateBuffer(CACHE, (layout.layers, 2, batch, layout.heads, c, head_dim), dtype),
           StateBuffer(POS, (layout.layers, layout.heads, c), "float32"),
           StateBuffer(VALID, (layout.layers, layout.heads, c), "bool"),
           StateBuffer(COUNT, (1,), "int64"))
    if layout.scored:
        out = out + (StateBuffer(SCORE, (layout.layers, layout.heads, layout.frames), "float32"),)
    return out


def cache_graphs(layout: KVLayout, head_dim: int, first_input: torch.Tensor, new_kv: torch.Tensor,
                 frame_pos: torch.Tensor, batch_dim: Any = None, rows: Any = None) -> dict:
    """The kv.init and kv.append graphs of a layout (captured; the batch dynamic when `batch_dim`);
    with `rows` ((layer, head) pairs), of its compact state of those rows (KVStream.rows): the
    append still takes the step's full new_kv (and mass)."""
    from .capture import capture
    kept = layout if rows is None else rows_layout(layout, rows)
    init = KVInit(kept, head_dim)
    with torch.no_grad():
        state = init(first_input)
    init_dyn = None if batch_dim is None else ({0: batch_dim},)
    b = {2: batch_dim} if batch_dim is not None else None
    append = append_module(layout) if rows is None else rows_append_module(layout, rows)
    if layout.scored:
        mass = torch.zeros(layout.layers, layout.heads, kept.capacity)
        args = (*state, new_kv, frame_pos, mass)
        app_dyn = None if batch_dim is None else (b, None, None, None, None, b, None, None)
    else:
        args = (*state, new_kv, frame_pos)
        app_dyn = None if batch_dim is None else (b, None, None, None, b, None)
    return {INIT: capture(init, (first_input,), dynamic_shapes=init_dyn, name=INIT).main,
            APPEND: capture(append, args, dynamic_shapes=app_dyn, name=APPEND).main}


def append_inputs(rec: "KVStream") -> tuple[int, int]:
    """Where the append graph of `rec`'s layout takes new_kv and the frame position."""
    return (5, 6) if rec.kv_layout().scored else (4, 5)


def rewire(plan, rec: "KVStream", layout: KVLayout):
    """`plan` with the calls of kv.init and kv.append taking and giving the state `layout` needs
    (the frame scores and the step's attention mass where it is scored; `rec.mass` must then be set)."""
    import dataclasses
    st = tuple(f"state:{s}" for s in (ALL_STATES if layout.scored else STATES))
    if layout.scored and not rec.mass:
        raise CaptureError("a scored KV layout needs the step's attention mass (KVStream.mass is not set)")
    k_new, k_fp = append_inputs(rec)

    def append(c):
        extra = (rec.mass,) if layout.scored else ()
        return dataclasses.replace(c, inputs=(*st, c.inputs[k_new], c.inputs[k_fp], *extra), outputs=st)
    plan = plan.replace_calls(rec.init, lambda c: dataclasses.replace(c, outputs=st))
    return plan.replace_calls(rec.append, append)


def capture_streamer(model: Streamer, args: tuple, kwargs: dict, dynamic_shapes: Any = None):
    """The Program of a Streamer (see the module doc); ir.capture calls it."""
    from .capture import capture
    from .plan import Bins, Call, Plan, Select, Seq, Table
    from .program import Program

    if kwargs:
        raise CaptureError(f"a pared Streamer takes positional inputs only; got keyword inputs {sorted(kwargs)}")
    if len(args) < 2:
        raise CaptureError("Streamer: example inputs are the step's own inputs and then `append` ([1] float); "
                           f"got {len(args)} input(s)")
    own = tuple(args[:-1])
    lay, dh = model.layout, model.head_dim
    dyn = None if dynamic_shapes is None else tuple(dynamic_shapes)
    if dyn is not None and len(dyn) != len(args):
        raise CaptureError(f"Streamer: dynamic_shapes has {len(dyn)} entries for {len(args)} inputs")
    batch_dim = (dyn[0] or {}).get(0) if dyn else None
    with torch.no_grad():
        state = KVInit(lay, dh)(own[0])
        outs = model.step(*own, *state[:3])
    if not isinstance(outs, (tuple, list)) or len(outs) < 2 or not all(isinstance(o, torch.Tensor) for o in outs):
        raise CaptureError("Streamer: the step must return a tuple of tensors (out..., new_kv)")
    new_kv = outs[-1]
    want = (lay.layers, 2, own[0].shape[0], lay.heads, lay.tokens_per_frame, dh)
    if tuple(new_kv.shape) != want:
        raise CaptureError(f"Streamer: the step's last output (new_kv) has shape {tuple(new_kv.shape)}; the "
                           f"declared cache needs {want} (layers, 2, batch, heads, tokens_per_frame, head_dim)")
    # the step with the capacity dynamic (a multiple of the frame's tokens), so a cache pass can resize it
    own_dyn = list(dyn[:-1]) if dyn else [None] * len(own)
    frames = torch.export.Dim("kv_frames", min=2, max=4096)
    cap = lay.tokens_per_frame * frames
    bd = {} if batch_dim is None else {2: batch_dim}
    example = KVInit(KVLayout.uniform(HeadPolicy.window(max(2, lay.frames)), lay.layers, lay.heads,
                                      lay.tokens_per_frame), dh)(own[0])[:3]
    step_dyn = (*own_dyn, {4: cap, **bd}, {2: cap}, {2: cap})
    try:
        step_graph = capture(model.step, (*own, *example), dynamic_shapes=step_dyn, name=STEP).main
        dynamic = True
    except CaptureError:
        step_graph = capture(model.step, (*own, *state[:3]),
                             dynamic_shapes=None if dyn is None else (*own_dyn, bd or None, None, None),
                             name=STEP).main
        dynamic = False
    fp_name = step_graph.input_names[model.frame_pos_input % len(own)]
    frame_pos = own[model.frame_pos_input % len(own)]
    graphs = {STEP: step_graph, **cache_graphs(lay, dh, own[0], new_kv, frame_pos, batch_dim)}
    names = tuple(step_graph.input_names[:len(own)])
    if "append" in names:
        raise CaptureError("Streamer: the step has an input named 'append', the name of the streamer's own input")
    names = names + ("append",)
    st = tuple(f"state:{s}" for s in STATES)
    outs_refs = tuple(f"{STEP}.{o}" for o in step_graph.output_names)
    body = Seq((
        Select(Table(("init",), "go"), (("init", Call(INIT, (f"in:{names[0]}",), st)), ("go", Seq(()))),
               "kv.start"),
        Call(STEP, (*(f"in:{n}" for n in names[:-1]), *st[:3]), outs_refs),
        Select(Bins("in:append", (0.5,), ("keep", "append")),
               (("keep", Seq(())), ("append", Call(APPEND, (*st, outs_refs[-1], f"in:{fp_name}"), st))),
               "kv.append")))
    dtype = str(new_kv.dtype).replace("torch.", "")
    plan = Plan(names, outs_refs[:-1], body,
                state=state_declarations(lay, "B" if batch_dim is not None else own[0].shape[0], dh, dtype))
    prog = Program(graphs, plan)
    rec = KVStream(step=STEP, init=INIT, append=APPEND, states=STATES, inputs=names, frame_pos=fp_name,
                   layers=lay.layers, heads=lay.heads, head_dim=dh, tokens_per_frame=lay.tokens_per_frame,
                   layout=lay, dynamic_capacity=dynamic)
    return prog.with_record(rec)
