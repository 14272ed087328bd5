"""Fidelity metrics and side-by-side timing. Numpy only (torch-free).

Speed is a ratio measured in one process: the two callables run alternately,
after warm-up, and the median of the repeats is compared, so load from other
processes hits both sides alike.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np


@dataclass(frozen=True, kw_only=True)
class Fidelity:
    """Bounds an optimized model must meet against the original (None: unchecked)."""

    min_cosine: float | None = 0.999   # worst per-output cosine similarity
    max_rel_l2: float | None = 1e-2    # worst per-output ||a-b|| / ||b||
    max_abs: float | None = None       # worst absolute difference

    @staticmethod
    def of(spec: "Fidelity | Mapping[str, Any] | None") -> "Fidelity":
        """Bounds from a Goal's spelling ({cosine: 0.999, rel_l2: 0.01, max_abs: 0.1}, see
        pared.ir.goal) or this class's field names (min_cosine, max_rel_l2, max_abs).
        Bounds left out keep their defaults; give one as None (null) to leave it unchecked.

        Raises:
            ValueError: an unknown bound (naming the closest known one) or a bound that
                is not a number.
        """
        if spec is None:
            return Fidelity()
        if isinstance(spec, Fidelity):
            return spec
        goal = {k: v for k, v in spec.items() if k in _GOAL_FIELDS}
        fields = {k: v for k, v in spec.items() if k not in _GOAL_FIELDS}
        known = set(_GOAL_FIELDS) | {"min_cosine", "max_rel_l2", "max_abs"}
        bad = [k for k in fields if k not in known]
        if bad:
            import difflib
            close = difflib.get_close_matches(str(bad[0]), sorted(known), n=1)
            raise ValueError(f"unknown fidelity bound {bad[0]!r}" + (f"; did you mean '{close[0]}'?" if close else
                                                                   f"; known: {', '.join(sorted(known))}"))
        if goal:
            from pared.ir.errors import OptionError
            from pared.ir.goal import Goal
            try:
                parsed = Goal.parse(goal, "fidelity", tuple(_GOAL_FIELDS))
            except OptionError as e:
                raise ValueError(str(e)) from None
            fields.update({_GOAL_FIELDS[k]: v for k, v in parsed.terms})
        for k, v in fields.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ValueError(f"fidelity bound '{k}' expects a number, got {v!r}")
            if v is not None and v != v:    # NaN: every comparison is false, the bound would never fail
                raise ValueError(f"fidelity bound '{k}' is NaN; give a number (or null to leave it unchecked)")
        return Fidelity(**fields)

    def violations(self, figures: Mapping[str, float]) -> list[str]:
        out = []
        if self.min_cosine is not None and figures["cosine_min"] < self.min_cosine:
            out.append(f"cosine {figures['cosine_min']:.6f} < {self.min_cosine}")
        if self.max_rel_l2 is not None and figures["rel_l2_max"] > self.max_rel_l2:
            out.append(f"relative L2 {figures['rel_l2_max']:.3g} > {self.max_rel_l2}")
        if self.max_abs is not None and figures["max_abs"] > self.max_abs:
            out.append(f"max abs {figures['max_abs']:.3g} > {self.max_abs}")
        return out


#: a Goal's metric (pared.ir.goal) -> the Fidelity field it bounds
_GOAL_FIELDS = {"cosine": "min_cosine", "rel_l2": "max_rel_l2", "max_abs": "max_abs"}


def metrics(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """max abs, relative L2 and cosine of two arrays (flattened)."""
    a = np.asarray(reference, dtype=np.float64).ravel()
    b = np.asarray(candidate, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {np.shape(reference)} vs {np.shape(candidate)}")
    if a.size == 0:
        return {"max_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0}
    diff = a - b
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    rel = float(np.linalg.norm(diff)) / na if na > 0 else float(np.linalg.norm(diff))
    if na == 0 and nb == 0:
        cos = 1.0
    elif na == 0 or nb == 0:
        cos = 0.0
    else:
        cos = float(np.dot(a, b) / (na * nb))
    return {"max_abs": float(np.max(np.abs(diff))), "rel_l2": rel, "cosine": cos}


def summarize(pairs: Sequence[tuple[Sequence[np.ndarray], Sequence[np.ndarray]]]) -> dict[str, Any]:
    """Worst-case figures over every output of every checked input."""
    worst = {"max_abs": 0.0, "rel_l2_max": 0.0, "cosine_min": 1.0}
    cosines = []
    for ref, got in pairs:
        if len(ref) != len(got):
            raise ValueError(f"{len(got)} outputs where the original gives {len(ref)}")
        for r, g in zip(ref, got):
            m = metrics(r, g)
            worst["max_abs"] = max(worst["max_abs"], m["max_abs"])
            worst["rel_l2_max"] = max(worst["rel_l2_max"], m["rel_l2"])
            worst["cosine_min"] = min(worst["cosine_min"], m["cosine"])
            cosines.append(m["cosine"])
    worst["cosine_mean"] = float(np.mean(cosines)) if cosines else 1.0
    worst["checked_inputs"] = len(pairs)
    return worst


def side_by_side(fns: Mapping[str, Callable[[], Any]], *, repeats: int = 10, warmup: int = 2,
                 min_time: float = 0.0) -> dict[str, Any]:
    """Median seconds per call of each callable, measured alternately.

    Args:
        fns: name -> zero-argument callable (the first is the baseline).
        repeats: rounds; each round calls every callable once, in rotating order.
        warmup: untimed rounds first.
        min_time: keep adding rounds until the baseline has run this long (s).
    Returns:
        {"median_s": {name: s}, "min_s": ..., "max_s": ..., "speedup": {name: baseline/name},
         "repeats": n, "env": {...}}
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    r = 0
    while r < repeats or (min_time and sum(times[names[0]]) < min_time and r < 10 * repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
        r += 1
    med = {n: statistics.median(v) for n, v in times.items()}
    base = med[names[0]]
    return {
        "median_s": med,
        "min_s": {n: min(v) for n, v in times.items()},
        "max_s": {n: max(v) for n, v in times.items()},
        "speedup": {n: (base / med[n] if med[n] > 0 else math.inf) for n in names},
        "repeats": r,
        "env": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "cpu_count": os.cpu_count()},
    }
