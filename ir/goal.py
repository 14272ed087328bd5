"""Goals: one spelling, everywhere a pass (or optimize) is asked to reach something.

A goal is a mapping of metric -> bound, every term to be met:

    {psnr_db: 30}             final output's PSNR vs the unoptimized run, at least 30 dB
    {cosine: 0.995}           cosine similarity at least 0.995
    {speedup: 3}              FLOPs (or time) speedup at least 3x
    {bytes: 0.3}              at most 0.3 of the float bytes
    {latency: 0.6}            at most 0.6 of the float latency
    {rel_l2: 0.01, cosine: 0.999}
    {accuracy_drop: 0.02}     a judge's accuracy at most 0.02 below the unoptimized run's
    {error_rise: 0.1}         a judge's error at most 0.1 above the unoptimized run's (its units)

`accuracy_drop` and `error_rise` are judged: a pass that takes a `judge` (a function of the
reference's and the candidate's outputs, e.g. kv_policy's) measures them by calling it.

Each metric knows its direction (METRICS: larger is better, or smaller is). A
pass says which metrics it can measure (`allowed`); parsing names the pass, the
option and the nearest known metric on a typo. Torch-free.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .errors import OptionError

#: metric -> True when larger is better
METRICS: dict[str, bool] = {
    "psnr_db": True, "sqnr_db": True, "cosine": True, "cosine_mean": True, "agreement": True,
    "accuracy": True, "success": True, "speedup": True,
    "rel_l2": False, "rel_l1": False, "max_abs": False, "bytes": False, "latency": False, "flops": False,
    "accuracy_drop": False, "error_rise": False,
}


@dataclass(frozen=True)
class Goal:
    """Bounds to meet, as ((metric, bound), ...) in the order given."""

    terms: tuple[tuple[str, float], ...]

    @staticmethod
    def parse(value: Any, where: str, allowed: Iterable[str] | None = None, *, single: bool = False,
              positive: bool = False) -> "Goal | None":
        """A Goal from its mapping spelling (None stays None).

        Args:
            value: {metric: bound, ...} or None.
            where: who asks, for messages, e.g. "pass 'residual_cache': option 'target'".
            allowed: the metrics the caller can measure (default: every metric).
            single: exactly one term.
            positive: every bound > 0.
        Raises:
            OptionError: not a mapping, an unknown or unsupported metric (with the closest
                known one), a bound that is not a number, or one term too many.
        """
        if value is None:
            return None
        if isinstance(value, Goal):
            value = dict(value.terms)
        known = [m for m in METRICS if allowed is None or m in set(allowed)]
        example = "{" + f"{known[0]}: X" + "}" if known else "{metric: X}"
        if not isinstance(value, Mapping) or not value:
            raise OptionError(f"{where} takes a goal like {example} (metrics: {', '.join(known)}), got {value!r}")
        if single and len(value) != 1:
            raise OptionError(f"{where} takes one goal like {example}, got {len(value)}: {dict(value)!r}")
        terms = []
        for k, v in value.items():
            if k not in known:
                close = difflib.get_close_matches(str(k), known, n=1)
                raise OptionError(f"{where}: unknown metric {k!r}" + (f"; did you mean '{close[0]}'?" if close else
                                                                      f"; known: {', '.join(known)}"))
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise OptionError(f"{where}: {k} expects a number, got {v!r}")
            if positive and v <= 0:
                raise OptionError(f"{where}: {k} must be a positive number, got {v!r}")
            terms.append((str(k), float(v)))
        return Goal(tuple(terms))

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.terms)

    def met(self, measured: Mapping[str, float]) -> bool:
        """Every term holds on `measured` (metric -> value).

        Raises:
            KeyError: a metric of the goal is not in `measured`.
        """
        return all(measured[k] >= v if METRICS[k] else measured[k] <= v for k, v in self.terms)

    def larger_is_better(self, metric: str) -> bool:
        return METRICS[metric]

    def to_json(self) -> dict[str, float]:
        return dict(self.terms)

    def __str__(self) -> str:
        return ", ".join(f"{k} {'>=' if METRICS[k] else '<='} {v:g}" for k, v in self.terms)
