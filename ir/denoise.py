"""A sampler captured whole: the denoising steps as a steps loop of the Plan.

A diffusion policy or generator is often called as one module per request that
runs its K denoising steps inside (a robot policy call: observation -> action
chunk). Captured as it is, the K steps are unrolled into one graph, and the cache
passes, whose schedules are per step, see one call. Wrapping the model in
`Denoiser` declares the parts instead:

    encoder(*inputs[:-1]) -> cond        a tensor or a tuple of tensors (run once)
    head(x, *head_values, *cond) -> out  the denoiser, once per step
    update(x, out, *update_values) -> x  the sampler's step (DDIM, Euler, ...)
    finish(x) -> outputs                 optional (a clamp); without it the program returns x

The last input is the initial sample x (the noise). `schedule` maps a name to its
K per-step values; `head_values` names those the head reads (the timestep), the
update reads the others, in the schedule's order. Each value is a float32 tensor
of shape (1,), the same in eager and in the Plan.

`Denoiser.forward` is the loop (what the Program is judged against). `capture`
(ir.capture) turns it into a Program of five graphs:

    Seq[ Call encoder        (in:...)                               -> encoder.<cond>...
         Call denoise.start  (in:<x>)                               -> denoise.x
         Loop(count=K, steps=True, Seq[
             Call head           (denoise.x, step:denoise.<h>..., encoder.<cond>...) -> denoise.out
             Call denoise.update (denoise.x, denoise.out, step:denoise.<u>...)       -> denoise.x ])
         Call finish         (denoise.x)                            -> finish.<output>... ]

Each iteration of the loop is a step (ir/plan.py): a cache pass's step table over
the head's calls, and the `step:` values, are indexed by the iteration, so the same
cache passes that schedule a denoiser called once per step schedule this loop. The
`DenoiseLoop` record (program-wide) names the parts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .errors import CaptureError
from .records import Record

X, OUT, START, UPDATE = "denoise.x", "denoise.out", "denoise.start", "denoise.update"


class Denoiser(torch.nn.Module):
    """K denoising steps with the parts declared for pared (see the module doc).

    Args:
        encoder: called once with every input but the last; returns the head's condition.
        head: ``head(x, *head_values, *cond) -> out``.
        update: ``update(x, out, *update_values) -> x``.
        schedule: name -> K floats (one per step), in the order the graphs read them.
        head_values: the schedule names the head reads; the update reads the rest.
        finish: optional module applied to the final x.
    """

    def __init__(self, encoder: torch.nn.Module, head: torch.nn.Module, update: torch.nn.Module,
                 schedule: Mapping[str, Sequence[float]], head_values: Sequence[str] = ("t",),
                 finish: torch.nn.Module | None = None):
        super().__init__()
        lens = {k: len(v) for k, v in schedule.items()}
        if not lens or len(set(lens.values())) != 1 or not next(iter(lens.values())):
            raise ValueError(f"Denoiser: schedule must map names to equally long, non-empty value lists; got "
                             f"lengths {lens}")
        missing = [k for k in head_values if k not in schedule]
        if missing:
            raise ValueError(f"Denoiser: head_values {missing} are not in the schedule {list(schedule)}")
        self.encoder, self.head, self.update, self.finish = encoder, head, update, finish
        self.schedule = {k: tuple(float(x) for x in v) for k, v in schedule.items()}
        self.head_values = tuple(head_values)
        self.update_values = tuple(k for k in schedule if k not in self.head_values)
        self.steps = next(iter(lens.values()))

    def value(self, name: str, step: int) -> torch.Tensor:
        return torch.tensor([self.schedule[name][step]], dtype=torch.float32)

    def cond(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c = self.encoder(*inputs)
        return tuple(c) if isinstance(c, (tuple, list)) else (c,)

    def forward(self, *inputs: torch.Tensor) -> Any:
        if len(inputs) < 2:
            raise ValueError("Denoiser: give the encoder's inputs and then the initial sample x")
        cond = self.cond(*inputs[:-1])
        x = inputs[-1]
        for i in range(self.steps):
            out = self.head(x, *(self.value(k, i) for k in self.head_values), *cond)
            x = self.update(x, out, *(self.value(k, i) for k in self.update_values))
        return x if self.finish is None else self.finish(x)


class Start(torch.nn.Module):
    """x -> a copy of x (binds the initial sample to the loop's carried reference)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


@dataclass(frozen=True)
class DenoiseLoop(Record):
    """Where a captured Denoiser's loop is (written by capture; read by passes).

    Attributes:
        head / update / start: the graphs.
        cond: the references the head reads after x and its values (the encoder's outputs).
        x, out: the carried sample and the head's output (X, OUT).
        steps: iterations per call; values: the step-value names (`step:<name>`), head's first.
        inputs: the program's input names.
    """

    head: str
    update: str
    start: str
    cond: tuple[str, ...]
    x: str
    out: str
    steps: int
    values: tuple[str, ...]
    inputs: tuple[str, ...]


def capture_denoiser(model: Denoiser, args: tuple, kwargs: dict, dynamic_shapes: Any = None):
    """The Program of a Denoiser (see the module doc); ir.capture calls it."""
    from .capture import capture
    from .plan import Call, Loop, Plan, Seq
    from .program import Program

    if kwargs:
        raise CaptureError("a pared Denoiser takes positional inputs only; got keyword inputs "
                           f"{sorted(kwargs)}")
    if len(args) < 2:
        raise CaptureError("Denoiser: example inputs are the encoder's inputs and then the initial sample x; "
                           f"got {len(args)} input(s)")
    enc_dyn = None if dynamic_shapes is None else tuple(dynamic_shapes)[:-1]
    enc = capture(model.encoder, args[:-1], dynamic_shapes=enc_dyn, name="encoder")
    with torch.no_grad():
        cond = model.cond(*args[:-1])
    if not all(isinstance(c, torch.Tensor) for c in cond):
        raise CaptureError("Denoiser: the encoder must return a tensor or a tuple of tensors")
    x = args[-1]
    hv = tuple(model.value(k, 0) for k in model.head_values)
    uv = tuple(model.value(k, 0) for k in model.update_values)
    with torch.no_grad():
        out = model.head(x, *hv, *cond)
    if not isinstance(out, torch.Tensor):
        raise CaptureError(f"Denoiser: head must return one tensor, got {type(out).__name__}")
    parts = {"encoder": enc.main,
             START: capture(Start(), (x,), name=START).main,
             "head": capture(model.head, (x, *hv, *cond), name="head").main,
             UPDATE: capture(model.update, (x, out, *uv), name=UPDATE).main}
    with torch.no_grad():
        x1 = model.update(x, out, *uv)
    if not isinstance(x1, torch.Tensor) or x1.shape != x.shape:
        raise CaptureError(f"Denoiser: update must return the next sample, shaped like x {tuple(x.shape)}")
    cond_refs = tuple(f"encoder.{o}" for o in enc.main.output_names)
    names = tuple(enc.main.input_names) + ("x",)
    if "x" in enc.main.input_names:
        names = tuple(enc.main.input_names) + ("x_init",)
    sample_input = f"in:{names[-1]}"
    step = lambda k: f"step:denoise.{k}"                 # noqa: E731
    body = [Call("encoder", tuple(f"in:{n}" for n in enc.main.input_names), cond_refs),
            Call(START, (sample_input,), (X,)),
            Loop(Seq((Call("head", (X, *(step(k) for k in model.head_values), *cond_refs), (OUT,)),
                      Call(UPDATE, (X, OUT, *(step(k) for k in model.update_values)), (X,)))),
                 count=model.steps, steps=True)]
    structure = None
    if model.finish is not None:
        fin = capture(model.finish, (x1,), name="finish")
        parts["finish"] = fin.main
        outs = tuple(f"finish.{o}" for o in fin.main.output_names)
        body.append(Call("finish", (X,), outs))
        structure = fin.output_structure
    else:
        outs = (X,)
    values = model.head_values + model.update_values
    plan = Plan(names, outs, Seq(tuple(body)),
                step_values=tuple((f"denoise.{k}", model.schedule[k]) for k in values))
    prog = Program(parts, plan, **({"output_structure": structure} if structure else {}))
    rec = DenoiseLoop(head="head", update=UPDATE, start=START, cond=cond_refs, x=X, out=OUT, steps=model.steps,
                      values=tuple(f"denoise.{k}" for k in values), inputs=names)
    return prog.with_record(rec)
