"""Search drivers that find the setting meeting a Goal (ir/goal.py), and the executors their
trials run on.

`bisect_log`: a one-dimensional monotone search over a positive knob (a cache
threshold, a keep ratio) in log space. The caller's `ok(x)` measures one trial
and says whether it meets the goal; the goal must hold on one side of a single
boundary in [lo, hi]. With `width` w > 1 it is a (w+1)-ary search: each round
measures w knobs at once (`batch`, through an executor) and keeps the sub-range
around the boundary.

`pareto_search`: a multi-objective search (a goal that names two objectives,
speed x fidelity) with Optuna's seeded TPE sampler, asked and told in rounds of
`width` trials; `pareto_front` gives the non-dominated points.

Executors (`Trials`): how a round's trials run. `InProcess` (the default) runs
them one after another in this process; `RayTrials` runs each as one Ray task
(`ray.init(address=...)`: a local Ray when the address is None, a cluster for
"auto" or "ray://head:10001"), the search's shared state (program, calibration,
reference) put once in Ray's object store. A search's width, seed and trial count
belong to the Trials object, not to the executor kind: the same settings give the
same knobs and the same recorded points whichever executor runs them (a Ray task
runs torch on the driver's thread count, so its numbers are the driver's).
"""
from __future__ import annotations

import difflib
import hashlib
import importlib.util
import math
from typing import Any, Callable, ClassVar, Mapping, Sequence

from pared.ir.errors import OptionError

#: executors a search can run its trials on
EXECUTORS = ("in_process", "ray")
#: the keys of a `search` setting (pared.optimize(search=...), a pipeline file's `search:`)
SEARCH_OPTIONS = ("executor", "address", "width", "seed", "trials", "num_cpus")
INSTALL = "pip install 'pared[search]'"

#: one round of trials: (points, on_result(point, result) per finished trial) -> results in the points' order
Batch = Callable[..., list]


def _need(module: str, what: str) -> None:
    """Raises OptionError naming `what` when `module` is not installed."""
    if importlib.util.find_spec(module) is None:
        raise OptionError(f"{what} needs {module}, which is not installed: {INSTALL}")


class Trials:
    """Runs a search's trials; also carries the settings every search reads.

    Args:
        width: trials per round (bisect_log's points per round, mixed_precision's choices per
            round, pareto_search's asks per round); 1 is the sequential search.
        seed: the seed of sampled searches (pareto_search).
        trials: trials of a sampled search (pareto_search).
    Raises:
        OptionError: a setting out of range, naming it.
    """

    executor: ClassVar[str] = ""

    def __init__(self, *, width: int = 1, seed: int = 0, trials: int = 32):
        _check_int("width", width, 1)
        _check_int("seed", seed, 0)
        _check_int("trials", trials, 1)
        self.width, self.seed, self.trials = int(width), int(seed), int(trials)
        self.ran = 0            # trials run so far (the report's count)

    def bind(self, fn: Callable[[Any, Any], Any], shared: Any) -> Batch:
        """A runner of `fn(shared, point)` over rounds of points: `run(points, on_result=None)`
        returns the results in the points' order and calls `on_result(point, result)` as each
        trial finishes. `fn` and `shared` are fixed for every round (sent once)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """How the searches ran, for the report."""
        return {"executor": self.executor, "width": self.width, "seed": self.seed, "trials": self.trials,
                "trials_run": self.ran}

    def close(self) -> None:
        """Release what this executor started."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.describe().items())})"


class InProcess(Trials):
    """Trials one after another in this process."""

    executor = "in_process"

    def bind(self, fn: Callable[[Any, Any], Any], shared: Any) -> Batch:
        def run(points: Sequence[Any], on_result: Callable[[Any, Any], None] | None = None) -> list:
            out = []
            for p in points:
                r = fn(shared, p)
                self.ran += 1
                if on_result is not None:
                    on_result(p, r)
                out.append(r)
            return out
        return run


class RayTrials(Trials):
    """One Ray task per trial.

    Args:
        address: None: a local Ray (started here unless one is running); "auto": the cluster
            this machine joined (`ray start --address=...`); "ray://head:10001": a cluster's
            client server.
        num_cpus: CPUs of a local Ray (default: all); not for a cluster.
        width, seed, trials: as Trials.
    Raises:
        OptionError: Ray is not installed (`pip install 'pared[search]'`).
    """

    executor = "ray"

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, **settings: Any):
        super().__init__(**settings)
        _need("ray", "search: option 'executor' ray")
        _need("cloudpickle", "search: option 'executor' ray")
        if num_cpus is not None:
            _check_int("num_cpus", num_cpus, 1)
        self.address, self.num_cpus = address, num_cpus
        self._started = False

    def _ray(self) -> Any:
        import ray
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address is None and self.num_cpus is not None:
                kw["num_cpus"] = self.num_cpus
            ray.init(address=self.address, **kw)
            self._started = True
        return ray

    def bind(self, fn: Callable[[Any, Any], Any], shared: Any) -> Batch:
        import torch
        from pared.ir import portable
        ray = self._ray()
        blob = portable.dumps((fn, shared))
        key = hashlib.sha256(blob).hexdigest()[:24]
        ref = ray.put(blob)                       # once per search; each task reads it from the object store
        remote = _remote_trial()
        threads = torch.get_num_threads()

        def run(points: Sequence[Any], on_result: Callable[[Any, Any], None] | None = None) -> list:
            # the ref goes inside a list so Ray hands the task the ref, not the bytes: a worker
            # loads a search's state once and keeps it for the search's later trials
            tasks = [remote.remote(key, [ref], p, threads) for p in points]
            index = {t: i for i, t in enumerate(tasks)}
            out: list = [None] * len(points)
            left = list(tasks)
            try:
                while left:
                    done, left = ray.wait(left, num_returns=1)
                    i = index[done[0]]
                    try:
                        out[i] = ray.get(done[0])
                    except ray.exceptions.RayTaskError as e:
                        raise e.as_instanceof_cause() from None
                    self.ran += 1
                    if on_result is not None:
                        on_result(points[i], out[i])
            finally:
                for t in left:
                    ray.cancel(t)
            return out
        return run

    def describe(self) -> dict:
        d = {**super().describe(), "address": self.address or "local"}
        try:
            import ray
            if ray.is_initialized():
                d["nodes"] = sum(1 for n in ray.nodes() if n.get("Alive"))
                d["cpus"] = int(ray.cluster_resources().get("CPU", 0))
        except Exception:        # a cluster that went away: the settings still say how it ran
            pass
        return d

    def close(self) -> None:
        """Shut down the Ray this executor started (a Ray someone else started stays)."""
        if self._started:
            import ray
            ray.shutdown()
            self._started = False


# -- a trial in a Ray worker ---------------------------------------------------
_LOADED: dict[str, Any] = {}     # in a worker: search key -> (fn, shared), the latest few
_REMOTE: list = []


def _ray_trial(key: str, refs: list, point: Any, threads: int) -> Any:
    if key not in _LOADED:
        import ray
        from pared.ir import portable
        while len(_LOADED) >= 2:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = portable.loads(ray.get(refs[0]))
    fn, shared = _LOADED[key]
    import torch
    torch.set_num_threads(threads)
    return fn(shared, point)


def _remote_trial() -> Any:
    if not _REMOTE:
        import ray
        _REMOTE.append(ray.remote(num_cpus=1, max_retries=0)(_ray_trial))
    return _REMOTE[0]


# -- settings ------------------------------------------------------------------
def _check_int(option: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise OptionError(f"search: option '{option}' must be an integer >= {lo}, got {value!r}")


def parse_search(value: Any) -> dict:
    """A search setting checked and spelled out: None, "in_process", "ray", or a mapping of
    SEARCH_OPTIONS (`address` without `executor` means ray).

    Returns:
        {"executor": ..., and the options given}.
    Raises:
        OptionError: "search: option 'NAME' ..." with what it takes (and the close name for a
            typo); Ray not installed for executor ray.
    """
    if value is None:
        return {"executor": "in_process"}
    if isinstance(value, str):
        value = {"executor": value}
    if not isinstance(value, Mapping):
        raise OptionError(f"search takes 'ray', 'in_process' or a mapping of {', '.join(SEARCH_OPTIONS)}, "
                          f"got {type(value).__name__} {value!r}")
    out = {}
    for k, v in value.items():
        if k not in SEARCH_OPTIONS:
            close = difflib.get_close_matches(str(k), SEARCH_OPTIONS, n=1)
            raise OptionError(f"search: unknown option {k!r}" + (f"; did you mean '{close[0]}'?" if close else
                                                                 f"; known: {', '.join(SEARCH_OPTIONS)}"))
        out[k] = v
    executor = out.get("executor", "ray" if out.get("address") is not None else "in_process")
    if executor not in EXECUTORS:
        close = difflib.get_close_matches(str(executor), EXECUTORS, n=1)
        raise OptionError(f"search: option 'executor' takes one of {list(EXECUTORS)}, got {executor!r}"
                          + (f"; did you mean '{close[0]}'?" if close else ""))
    out["executor"] = executor
    address = out.get("address")
    if address is not None and (not isinstance(address, str) or not address.strip()):
        raise OptionError(f"search: option 'address' takes a Ray address ('auto', 'ray://head:10001'), "
                          f"got {address!r}")
    if executor == "in_process":
        for k in ("address", "num_cpus"):
            if out.get(k) is not None:
                raise OptionError(f"search: option '{k}' is for executor ray; the trials run in this process")
    if out.get("num_cpus") is not None and address is not None:
        raise OptionError("search: option 'num_cpus' sizes a local Ray; a cluster at option 'address' has its own")
    for k, lo in (("width", 1), ("seed", 0), ("trials", 1), ("num_cpus", 1)):
        if out.get(k) is not None:
            _check_int(k, out[k], lo)
    if executor == "ray":
        _need("ray", "search: option 'executor' ray")
    return out


def make_trials(value: Any) -> Trials:
    """The executor a search setting names (a Trials passes through).

    Raises:
        OptionError: see parse_search.
    """
    if isinstance(value, Trials):
        return value
    s = parse_search(value)
    settings = {k: s[k] for k in ("width", "seed", "trials") if s.get(k) is not None}
    if s["executor"] == "ray":
        return RayTrials(s.get("address"), num_cpus=s.get("num_cpus"), **settings)
    return InProcess(**settings)


def as_trials(value: Any) -> Trials:
    """`value` as an executor: a Trials as it is, None in process.

    Raises:
        TypeError: anything else (a `search` setting is made one by make_trials).
    """
    if value is None:
        return InProcess()
    if not isinstance(value, Trials):
        raise TypeError(f"trials must be a pared.analysis.search.Trials (InProcess(), RayTrials(), or "
                        f"make_trials(setting)), got {type(value).__name__} {value!r}")
    return value


def trials_of(ctx: Any) -> Trials:
    """The executor a PassContext carries (`ctx.trials`), in process when it has none.

    Raises:
        TypeError: `ctx.trials` is not a Trials.
    """
    return as_trials(getattr(ctx, "trials", None))


# -- one-dimensional: the smallest integer that meets a goal -------------------------------
def smallest_meeting(met: Callable[[int], bool], lo: int, hi: int) -> int:
    """The smallest n in [lo, hi] with met(n), by bisection, assuming met is monotone (once true,
    true for every larger n) and met(hi) holds (hi is returned without asking when lo == hi).
    Each n is asked at most once."""
    while lo < hi:
        mid = (lo + hi) // 2
        if met(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


# -- one-dimensional: bisection in log space -------------------------------------
def bisect_log(ok: Callable[[float], bool] | None, lo: float, hi: float, *, holds_above: bool, iters: int = 7,
               digits: int = 4, width: int = 1,
               batch: Callable[[list[float]], Sequence[bool]] | None = None) -> tuple[float, bool]:
    """The knob closest to the boundary, on the side where the goal holds.

    The first trial is at `hi`: for a goal that holds above the boundary it is the
    easy end (missed there: missed everywhere, no more trials); for one that holds
    below, the hard end (met there: met everywhere). Then rounds of `width` knobs
    evenly spaced (in log space) inside the range; each round keeps the sub-range
    where the goal starts to hold. Width 1 is bisection, `iters` rounds; width w
    takes ceil(iters / log2(w + 1)) rounds, so the range shrinks at least as far.

    Args:
        ok: measures one knob value; True when the goal is met there (used when no `batch`).
        lo, hi: the range (0 < lo < hi).
        holds_above: the goal holds for knobs at or above the boundary (a speedup goal
            as a threshold grows); False: at or below it (a PSNR goal).
        iters: bisection steps (the rounds of width 1).
        digits: significant digits of the knob values tried (values a person would write).
        width: knobs per round.
        batch: measures a round of knobs at once (e.g. through a Trials executor) and
            returns ok per knob, in order.
    Returns:
        (knob, met): the best knob a trial met the goal at, and True; or, when no trial
        met it, the easy end (`hi` above, `lo` below) and False.
    Raises:
        ValueError: a range or width out of bounds, or neither `ok` nor `batch`.
    """
    if not 0 < lo < hi:
        raise ValueError(f"bisect_log: need 0 < lo < hi, got lo={lo!r}, hi={hi!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"bisect_log: width must be an integer >= 1, got {width!r}")
    if batch is None and ok is None:
        raise ValueError("bisect_log: give ok (one knob) or batch (a round of knobs)")
    at = lambda m: float(f"{math.exp(m):.{digits}g}")   # noqa: E731

    def measure(xs: list[float]) -> list[bool]:
        distinct = list(dict.fromkeys(xs))         # rounding may make two knobs of a round one
        got = dict(zip(distinct, batch(distinct) if batch is not None else [ok(x) for x in distinct]))
        return [bool(got[x]) for x in xs]

    if measure([hi])[0] != holds_above:
        return (hi, False) if holds_above else (hi, True)
    best, a, b = (hi if holds_above else None), math.log(lo), math.log(hi)
    rounds = iters if width == 1 else math.ceil(iters / math.log2(width + 1))
    for _ in range(rounds):
        # (a * (w + 1 - j) + b * j) / (w + 1): for w = 1 exactly bisection's (a + b) / 2
        ms = [(a * (width + 1 - j) + b * j) / (width + 1) for j in range(1, width + 1)]
        res = measure([at(m) for m in ms])
        if holds_above:
            j = next((j for j, r in enumerate(res) if r), None)
            if j is None:
                a = ms[-1]
            else:
                best, b, a = at(ms[j]), ms[j], (ms[j - 1] if j > 0 else a)
        else:
            j = next((j for j in range(width - 1, -1, -1) if res[j]), None)
            if j is None:
                b = ms[0]
            else:
                best, a, b = at(ms[j]), ms[j], (ms[j + 1] if j + 1 < width else b)
    return (lo, False) if best is None else (best, True)


# -- several objectives: a Pareto search -------------------------------------------
def pareto_front(values: Sequence[Sequence[float]], larger: Sequence[bool]) -> list[int]:
    """Indices of the non-dominated points: no other point is at least as good in every
    objective and better in one (`larger[k]`: larger is better in objective k). Equal points
    are all kept."""
    sign = [1.0 if up else -1.0 for up in larger]
    v = [[s * x for s, x in zip(sign, p)] for p in values]

    def dominates(p: list[float], q: list[float]) -> bool:
        return all(a >= b for a, b in zip(p, q)) and any(a > b for a, b in zip(p, q))

    return [i for i, p in enumerate(v) if not any(dominates(q, p) for q in v)]


def pareto_search(batch: Callable[[list[dict]], Sequence[Sequence[float]]],
                  space: Mapping[str, tuple[float, float]], larger: Sequence[bool], *, trials: int, width: int,
                  seed: int, digits: int = 4, what: str = "search") -> list[tuple[dict, tuple[float, ...]]]:
    """Sample knobs with Optuna's multi-objective TPE (seeded), `width` asks per round, each
    round measured by `batch` and told back in order: the same seed, width and measurements
    give the same knobs whatever runs the trials.

    Args:
        batch: a round of knob settings ({name: value}) -> their objective values, in order.
        space: knob name -> (lo, hi), sampled in log space (0 < lo < hi).
        larger: per objective, whether larger is better.
        trials: asks in all; a knob that rounds to one measured before is not measured again.
        digits: significant digits of the knob values.
        what: who asks, for messages.
    Returns:
        [(knob setting, objective values)] for every distinct setting measured, in order.
    Raises:
        OptionError: Optuna is not installed.
    """
    _need("optuna", what)
    import optuna
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(directions=["maximize" if up else "minimize" for up in larger],
                                    sampler=optuna.samplers.TPESampler(seed=seed))
        seen: dict[tuple, tuple[float, ...]] = {}
        out: list[tuple[dict, tuple[float, ...]]] = []
        asked = 0
        while asked < trials:
            round_ = [study.ask() for _ in range(min(width, trials - asked))]
            asked += len(round_)
            xs = [{k: float(f"{t.suggest_float(k, lo, hi, log=True):.{digits}g}") for k, (lo, hi) in space.items()}
                  for t in round_]
            keys = [tuple(x.values()) for x in xs]
            new = list(dict.fromkeys(k for k in keys if k not in seen))
            settings = [dict(zip(space, k)) for k in new]
            for k, x, v in zip(new, settings, batch(settings) if new else []):
                seen[k] = tuple(float(y) for y in v)
                out.append((x, seen[k]))
            for t, k in zip(round_, keys):
                study.tell(t, list(seen[k]))
        return out
    finally:
        optuna.logging.set_verbosity(verbosity)
