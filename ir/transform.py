"""Pass infrastructure: Pass, Analysis, RewritePass, PassResult, PassContext,
the registry and the PassManager. (pared.registry imports pared's own passes into
the registry; get_pass lives there.)

The contract (STYLE.md): a pass is called ``pass_(program, ctx) -> PassResult``.
Analyses leave graphs and plan as they are and return the program with one
frozen, serializable record added to its records (modified=False). Rewrites
return a new Program and never edit the one they were given. After a modifying
pass the manager drops every measurement (a record an analysis produces) not in
``preserved`` (a pass's own decisions stay), lints and recompiles the graphs.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import time
import typing
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

from .errors import OptionError, PassError
from .formats import block_size_problem
from .measure import Profiler
from .program import Program
from .records import Record, RecordStore, record_type  # noqa: F401  (re-exported: passes import Record from here)
from .target import Target

log = logging.getLogger("pared.passes")


# -- records ---------------------------------------------------------------
# Record (the base of analysis results and decisions, with to_json / from_json) and the store a
# Program keeps them in live in ir/records.py, torch-free, so the Executor can read them back;
# this module re-exports Record, RecordStore and record_type.


# -- options -----------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class NoOptions:
    """A pass without options."""


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (tuple, list):
        args = typing.get_args(hint)
        if not isinstance(value, (tuple, list)):
            return False
        inner = args[0] if args else Any
        return all(_type_ok(v, inner) for v in value)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return value != value
    if isinstance(value, (tuple, list)):
        return any(_has_nan(v) for v in value)
    if isinstance(value, Mapping):
        return any(_has_nan(v) for v in value.values())
    return False


def make_options(pass_cls: type["Pass"], given: Mapping[str, Any] | None) -> Any:
    """Build a pass's Options from a mapping, checking names, types and ranges.

    Raises:
        OptionError: "pass 'NAME': option 'OPT' ..." with the expected type or
            range and, for an unknown name, the closest known one.
    """
    opts_cls = pass_cls.Options
    given = dict(given or {})
    fields = {f.name: f for f in dataclasses.fields(opts_cls)}
    hints = typing.get_type_hints(opts_cls)
    pname = pass_cls.name
    for key, value in given.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else (
                f"; known options: {', '.join(fields)}" if fields else "; it takes no options")
            raise OptionError(f"pass '{pname}': unknown option {key!r}{hint}", ) from None
        expected = hints.get(key, Any)
        if _has_nan(value):     # every comparison with NaN is false: a range check would let it through
            raise OptionError(f"pass '{pname}': option {key!r} is NaN ({value!r}); give a number")
        if isinstance(value, list) and typing.get_origin(expected) is tuple:
            given[key] = value = tuple(value)
        if not _type_ok(value, expected):
            raise OptionError(f"pass '{pname}': option {key!r} expects {_type_name(expected)}, "
                              f"got {type(value).__name__} {value!r}")
        if expected is float and isinstance(value, int):
            given[key] = float(value)
    try:
        return opts_cls(**given)
    except (ValueError, TypeError) as e:
        msg = str(e)
        if msg.startswith("pass '"):
            raise OptionError(msg) from None
        raise OptionError(f"pass '{pname}': {msg}") from None


def check_range(pass_name: str, option: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise OptionError when value falls outside [lo, hi] (or the open ends)."""
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or \
          (hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        left = ("(" if lo_open else "[") + ("-inf" if lo is None else f"{lo:g}")
        right = ("inf" if hi is None else f"{hi:g}") + (")" if hi_open else "]")
        raise OptionError(f"pass '{pass_name}': option '{option}' must be in {left}, {right}, got {value!r}")


def check_block_size(pass_name: str, option: str, value: Any) -> None:
    """Raise OptionError unless value is a weight block size ONNX Runtime's MatMulNBits takes:
    a power of two >= 16 (the rule every block-wise weight format here follows)."""
    if block_size_problem(value) is not None:
        raise OptionError(f"pass '{pass_name}': option '{option}' must be a power of two >= 16 (ONNX Runtime's "
                          f"MatMulNBits), got {value!r}; try 32 or 128")


# -- results and context -----------------------------------------------------
#: `PassResult.preserved` for a pass that leaves every record valid (a record is kept when its
#: type is a subclass of a preserved type, and every record is a Record)
PRESERVE_ALL: tuple[type, ...] = (Record,)


@dataclass(frozen=True)
class PassResult:
    program: Program
    modified: bool
    preserved: tuple[type, ...] = ()
    stats: Mapping[str, int | float] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "stats", MappingProxyType(dict(self.stats)))


class PassContext:
    """What passes share: calibration data, the target, the measurement service,
    progress. Records are the Program's (program.records).

    Args:
        calibration: a list of input tuples, or a callable ``loop(model)`` that
            drives the model through a calibration run (a sampler loop).
        target: the Target (pared.ir.target; a mapping of its fields is converted),
            or None for target-independent work.
        measure: the Profiler analyses time models with on the target (ir/measure.py);
            injected by whoever builds the context (pared.optimize injects
            pared.backends.measure.default_profiler()); None: no measuring analysis can run.
        progress: ``progress(message)`` callback for long work (may be None); searches call it
            once per finished trial.
        trials: the executor a pass's search runs its trials on, with the search's width, seed
            and trial count (pared.analysis.search: InProcess, RayTrials; make_trials builds one
            from a `search` setting); None: in process, one trial at a time.

    Raises:
        TypeError: a target that is neither a Target, a mapping nor None.
    """

    def __init__(self, *, calibration: Any = None, target: Target | Mapping[str, Any] | None = None,
                 measure: Profiler | None = None, progress: Callable[[str], None] | None = None,
                 logger: logging.Logger | None = None, trials: Any = None):
        if isinstance(target, Mapping):
            target = Target.from_json(target, where="PassContext target")
        elif target is not None and not isinstance(target, Target):
            raise TypeError(f"PassContext: target must be a pared Target (pared.ir.target.get_target('cpu')), "
                            f"a mapping of its fields or None, got {type(target).__name__}")
        self.calibration = calibration
        self.target: Target | None = target
        self.measure: Profiler | None = measure
        self.progress = progress or (lambda msg: None)
        self.log = logger or log
        self.trials = trials

    @property
    def records(self) -> Any:
        raise AttributeError("PassContext has no records: they live on the Program (program.records, keyed by "
                             "record type and graph); an analysis returns program.with_record(record), and a pass "
                             "reads a record with ctx.require(RecordType, by, program)")

    def require(self, record_type: type, by: str, program: Program) -> Record:
        """The record of `record_type` in `program`'s records that pass `by` needs; one no earlier
        pass produced is computed on demand (see compute; the pass manager does that before the
        pass runs, so the program it hands the pass already holds it).

        Raises:
            PassError: it is missing and cannot be computed here, naming the analyses that make it.
        """
        rec = record_of(program, record_type)
        if rec is None:
            made = self.compute(record_type, program, by)
            if made is not None:
                rec = record_of(made[1].program, record_type)
        if rec is None:
            producers = _producers(record_type)
            raise PassError(f"pass '{by}' needs a {record_type.__name__}; run "
                            f"{' or '.join(repr(p) for p in producers) or 'its analysis'} before it")
        return rec

    def compute(self, record_type: type, program: Program, by: str) -> tuple[str, "PassResult"] | None:
        """Run the one registered analysis that produces `record_type`, with its default options,
        on `program` for pass `by`; its result's program holds the record. None when no analysis,
        or several, produce it (require then names them).

        Raises:
            PassError: the analysis failed, naming both passes.
        """
        producers = _producers(record_type)
        if len(producers) != 1:
            return None
        name = producers[0]
        self.progress(f"computing {record_type.__name__} for pass {by} ({name}, default options)")
        self.log.info("%s needs a %s: running %s with its default options", by, record_type.__name__, name)
        try:
            result = REGISTRY[name]()(program, self)
        except PassError as e:
            if e.args and str(e.args[0]).startswith(f"pass '{name}'"):
                raise PassError(f"pass '{by}' needs a {record_type.__name__}, computed on demand by '{name}': "
                                f"{e}") from e
            raise
        return name, result


def record_of(program: Program, record_type: type, graph: str | None = None) -> Record | None:
    """The record of `record_type` (or a subclass registered under its name) in `program`'s
    records about `graph` (None: program-wide), or None."""
    rec = program.records.get(record_type, graph=graph)
    return rec if isinstance(rec, record_type) else None


def _measured(record_type: type) -> bool:
    """Whether records of `record_type` are measurements: some registered analysis produces
    them (what a rewrite invalidates unless it preserves them). A pass's decisions (plans) are
    not: they stay true of the program that carries them."""
    return any(issubclass(c, Analysis) and isinstance(getattr(c, "record", None), type)
               and issubclass(record_type, c.record) and c.record is not Record for c in REGISTRY.values())


def _producers(record_type: type) -> list[str]:
    """The registered analyses that produce `record_type`."""
    return [n for n, c in REGISTRY.items() if issubclass(c, Analysis) and getattr(c, "record", None) is record_type]


# -- passes ------------------------------------------------------------------
#: what a pass may ask of the capture, in `Pass.capture_needs` (a harness that builds the model,
#: such as `pared bench`, gives every contender the form the pipeline's passes need)
CAPTURE_NEEDS = {
    "loop": "the model's own loop (decoding, denoising steps) as a loop of the Plan: the model built as a "
            "pared.ir.decode.Decoder or pared.ir.denoise.Denoiser instead of unrolled in one graph",
    "dynamic_batch": "the batch dimension of every input dynamic",
}


class Pass:
    """Base of every pass. Subclasses set `Options` (a frozen dataclass), and `capture_needs`
    (keys of CAPTURE_NEEDS) when they rewrite only a model captured in that form."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    requires: ClassVar[tuple[type, ...]] = ()
    capture_needs: ClassVar[frozenset[str]] = frozenset()
    #: options naming files: in a pipeline file, a relative path is relative to the file's folder
    path_options: ClassVar[tuple[str, ...]] = ()
    #: options naming a factory (`path/to/file.py:function`): a pipeline resolves the string to the
    #: function (a relative path relative to the pipeline file's folder); Python callers may give it
    ref_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any = None, **kwargs: Any):
        if options is not None and kwargs:
            raise TypeError("give options or keyword options, not both")
        if options is None:
            options = make_options(type(self), kwargs)
        elif isinstance(options, Mapping):
            options = make_options(type(self), options)
        elif not isinstance(options, self.Options):
            raise OptionError(f"pass '{self.name}': options must be {self.Options.__qualname__} "
                              f"or a mapping, got {type(options).__name__}")
        self.options = options

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


def capture_needs(passes: Sequence[Pass]) -> frozenset[str]:
    """What the passes of a pipeline need of the capture (see CAPTURE_NEEDS).

    Raises:
        ValueError: a pass declaring a need this pared does not know.
    """
    out: set[str] = set()
    for p in passes:
        unknown = set(p.capture_needs) - set(CAPTURE_NEEDS)
        if unknown:
            raise ValueError(f"pass '{p.name}' declares unknown capture needs {sorted(unknown)}; "
                             f"known: {sorted(CAPTURE_NEEDS)}")
        out |= set(p.capture_needs)
    return frozenset(out)


class Analysis(Pass):
    """A read-only pass producing one record of type `record`: it returns the program with
    the record added to its records (program-wide), graphs and plan unchanged, modified=False."""

    record: ClassVar[type] = Record

    def analyze(self, program: Program, ctx: PassContext) -> Record:
        raise NotImplementedError

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        rec = self.analyze(program, ctx)
        if not isinstance(rec, self.record):
            raise TypeError(f"analysis '{self.name}' returned {type(rec).__name__}, expected {self.record.__name__}")
        return PassResult(program.with_record(rec), modified=False, preserved=PRESERVE_ALL)


class RewritePass(Pass):
    """A pass that returns a new Program (or the same one, unmodified)."""


# -- registry ----------------------------------------------------------------
REGISTRY: dict[str, type[Pass]] = {}


def register_pass(name: str) -> Callable[[type[Pass]], type[Pass]]:
    """Class decorator: register a pass under its pipeline name.

    Raises:
        ValueError: when the name is taken by another class.
    """
    def deco(cls: type[Pass]) -> type[Pass]:
        prev = REGISTRY.get(name)
        if prev is not None and prev.__qualname__ != cls.__qualname__:
            raise ValueError(f"pass name '{name}' is already registered by "
                             f"{prev.__module__}.{prev.__qualname__}")
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return deco


def registered_pass(name: str) -> type[Pass]:
    """The pass class registered under `name` among the passes imported so far. The
    front door's pared.registry.get_pass imports pared's own passes first; ir/ never
    imports passes or analyses (they sit above it).

    Raises:
        UnknownPassError: naming the closest registered name.
    """
    try:
        return REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(REGISTRY), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known passes: {', '.join(sorted(REGISTRY))}"
        raise UnknownPassError(f"unknown pass {name!r}{hint}") from None


class UnknownPassError(OptionError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


# -- manager -----------------------------------------------------------------
class PassManager:
    """Runs passes in order.

    Before a pass: a record it `requires` that no earlier pass produced is computed on
    demand by the one registered analysis that produces it, with that analysis's
    default options (logged, and listed in the history as "NAME (for PASS)"); with
    no such analysis, or several, the pass fails naming them. A pass that reports
    modified=False may only add records. After each modifying pass: drops the
    measurements it did not preserve, lints and recompiles every graph. Any
    failure is re-raised as PassError naming the pass and the passes before it.
    """

    def __init__(self, passes: Sequence[Pass]):
        self.passes = list(passes)

    def run(self, program: Program, ctx: PassContext) -> tuple[Program, list[tuple[str, PassResult, float]]]:
        history: list[tuple[str, PassResult, float]] = []
        done: list[str] = []
        for p in self.passes:
            program = self._on_demand(p, program, ctx, history, done)
            ctx.progress(f"pass {p.name}")
            t0 = time.perf_counter()
            try:
                for rt in p.requires:
                    ctx.require(rt, p.name, program)
                result = p(program, ctx)
                if not isinstance(result, PassResult):
                    raise TypeError(f"returned {type(result).__name__}, expected PassResult")
                if not isinstance(result.program, Program):
                    raise TypeError(f"PassResult.program is {type(result.program).__name__}, expected Program")
                if not result.modified:
                    _check_unmodified(program, result.program)
                else:
                    result = dataclasses.replace(result, program=_drop_stale(result.program, result.preserved))
                    for g in result.program.graphs.values():
                        g.module.graph.lint()
                        g.module.recompile()
            except PassError as e:
                if e.args and str(e.args[0]).startswith(f"pass '{p.name}'"):
                    raise
                raise PassError(_fail_msg(p.name, done, e)) from e
            except Exception as e:
                raise PassError(_fail_msg(p.name, done, e)) from e
            dt = time.perf_counter() - t0
            stats = ", ".join(f"{k}={v}" for k, v in result.stats.items())
            ctx.log.info("%s: %s in %.2fs%s", p.name, "modified" if result.modified else "no change",
                         dt, f" ({stats})" if stats else "")
            history.append((p.name, result, dt))
            done.append(p.name)
            program = result.program
        return program, history


    @staticmethod
    def _on_demand(p: Pass, program: Program, ctx: PassContext, history: list, done: list) -> Program:
        """Run the analysis behind each record `p` requires and nobody produced yet (see run);
        returns the program with those records."""
        for rt in p.requires:
            if record_of(program, rt) is not None:
                continue
            label = f"{(_producers(rt) or ['?'])[0]} (for {p.name})"
            t0 = time.perf_counter()
            try:
                made = ctx.compute(rt, program, p.name)
            except PassError as e:
                if e.args and str(e.args[0]).startswith(f"pass '{p.name}'"):
                    raise
                raise PassError(_fail_msg(label, done, e)) from e
            except Exception as e:
                raise PassError(_fail_msg(label, done, e)) from e
            if made is not None:
                _check_unmodified(program, made[1].program)
                history.append((label, made[1], time.perf_counter() - t0))
                done.append(label)
                program = made[1].program
        return program


def same_graphs_and_plan(before: Program, after: Program) -> bool:
    """Whether `after` holds the very graphs, plan and output structure of `before` (its records
    may differ): what a result reporting modified=False may return."""
    return after is before or (after.plan is before.plan and list(after.graphs) == list(before.graphs) and
                               all(after.graphs[k] is g for k, g in before.graphs.items()) and
                               after.output_structure == before.output_structure)


def _check_unmodified(before: Program, after: Program) -> None:
    """A result that reports modified=False may add records, nothing else.

    Raises:
        TypeError: its graphs or plan are not those of `before`.
    """
    if not same_graphs_and_plan(before, after):
        raise TypeError("reported modified=False but returned a Program with other graphs or another plan "
                        "(an unmodified result may only add records)")


def _drop_stale(program: Program, preserved: tuple[type, ...]) -> Program:
    """`program` without the measurements (records an analysis produces) a modifying pass did
    not preserve; decisions stay."""
    keep = tuple(preserved)

    def stale(_: Any, rec: Any) -> bool:
        return isinstance(rec, Record) and not isinstance(rec, keep) and _measured(type(rec))

    store = program.records.without(stale)
    return program if store is program.records else program.replace(records=store)


def _fail_msg(name: str, done: Iterable[str], e: BaseException) -> str:
    before = list(done)
    after = f" (after {', '.join(before)})" if before else " (first pass)"
    return f"pass '{name}' failed{after}: {type(e).__name__}: {e}"
