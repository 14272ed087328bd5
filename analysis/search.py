"""Search drivers that find the setting meeting a Goal (ir/goal.py).

`bisect_log`: a one-dimensional monotone search over a positive knob (a cache
threshold, a keep ratio) in log space. The caller's `ok(x)` measures one trial
and says whether it meets the goal; the goal must hold on one side of a single
boundary in [lo, hi]. The trials run in this process, one after another.
"""
from __future__ import annotations

import math
from typing import Callable


def bisect_log(ok: Callable[[float], bool], lo: float, hi: float, *, holds_above: bool, iters: int = 7,
               digits: int = 4) -> tuple[float, bool]:
    """The knob closest to the boundary, on the side where the goal holds.

    The first trial is at `hi`: for a goal that holds above the boundary it is the
    easy end (missed there: missed everywhere, no more trials); for one that holds
    below, the hard end (met there: met everywhere). Then `iters` bisection steps.

    Args:
        ok: measures one knob value; True when the goal is met there.
        lo, hi: the range (0 < lo < hi).
        holds_above: the goal holds for knobs at or above the boundary (a speedup goal
            as a threshold grows); False: at or below it (a PSNR goal).
        iters: bisection steps.
        digits: significant digits of the knob values tried (values a person would write).
    Returns:
        (knob, met): the best knob a trial met the goal at, and True; or, when no trial
        met it, the easy end (`hi` above, `lo` below) and False.
    """
    if not 0 < lo < hi:
        raise ValueError(f"bisect_log: need 0 < lo < hi, got lo={lo!r}, hi={hi!r}")
    at = lambda m: float(f"{math.exp(m):.{digits}g}")   # noqa: E731
    if ok(hi) != holds_above:
        return (hi, False) if holds_above else (hi, True)
    best, a, b = (hi if holds_above else None), math.log(lo), math.log(hi)
    for _ in range(iters):
        m = (a + b) / 2
        if ok(at(m)):
            best = at(m)
            a, b = (a, m) if holds_above else (m, b)
        else:
            a, b = (m, b) if holds_above else (a, m)
    return (lo, False) if best is None else (best, True)
