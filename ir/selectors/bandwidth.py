"""`bandwidth`: a partition cut per call from the link's measured bandwidth, with
prediction and hysteresis (RoboECC's network-aware adjustment, "RoboECC: ...", Zheng et
al., arXiv 2603.20711, Sec. IV-B as re-implemented publicly; Neurosurgeon re-selects its
split whenever the bandwidth changes).

The runtime measures each transfer over the link (bytes / (elapsed - RTT/2)) and binds
the reference ``link:NAME`` to [the latest estimate in bytes/s, how many it has made]
(a new sample is taken only when the count grew: a call that sent nothing adds none);
on the torch side, where nothing crosses a link, nothing is bound and the selector keeps
its `initial` bandwidth. The next call's bandwidth is predicted as the mean of the last
`window` measurements. Each case owns a band of bandwidths ([edges[i-1], edges[i]),
cases ordered from the lowest bandwidth, whose cut sends the fewest bytes, to the
highest): the predicted value picks the band, but the current case is kept while the
prediction stays within `hysteresis` (a fraction) outside its band, so noise around an
edge does not flip the cut every call. A rise past the band moves to a case for a higher
bandwidth (a cut with the larger activation), a fall to a lower one. The choice is made
between calls, never inside one: the chosen case runs to the end.

`fall: immediate` (the default) predicts min(the mean, the latest measurement): a drop is
acted on at the next call, a rise only once the average has risen. The two errors do not
cost the same: a cut that sends too much over a link that just slowed pays the whole
transfer at the new bandwidth (tens of ms per call for an image at 3 Mbit/s), one that
keeps too much on the edge pays only the edge's extra compute. This is pared's addition to
RoboECC's moving average (`fall: average` is the plain moving average).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from . import Choice, PlanError, Selector, check_finite, register_selector


@dataclass
class BandwidthState:
    level: int | None = None        # the current case's index (None before the first call)
    seen: int = 0                   # the runtime's measurement count at the last sample taken
    samples: list = field(default_factory=list)   # the last `window` measurements, newest last
    predicted: float = math.nan     # the prediction the last choice used


#: how a measured drop is predicted (see the module docstring)
FALLS = ("immediate", "average")


@register_selector("bandwidth")
@dataclass(frozen=True)
class Bandwidth(Selector):
    link: str                       # the reference bound to the link's measured bandwidth: "link:NAME"
    cases: tuple[str, ...]          # one per band, lowest bandwidth first
    edges: tuple[float, ...]        # ascending band edges in bytes/s: len(cases) - 1
    initial: float                  # bandwidth (bytes/s) assumed before any measurement
    window: int = 5                 # measurements averaged to predict the next call's
    hysteresis: float = 0.1         # keep the case while the prediction is within this fraction of its band
    fall: str = "immediate"         # immediate: a drop below the average is taken at once; average: plain mean

    def __post_init__(self):
        if not isinstance(self.link, str) or not self.link.startswith("link:") or len(self.link) <= 5:
            raise PlanError(f"bandwidth selector: link must be a reference 'link:NAME', got {self.link!r}")
        object.__setattr__(self, "edges", tuple(float(e) for e in self.edges))
        if len(self.cases) < 1 or len(set(self.cases)) != len(self.cases):
            raise PlanError(f"bandwidth selector: cases must be distinct labels, got {list(self.cases)}")
        if len(self.edges) != len(self.cases) - 1:
            raise PlanError(f"bandwidth selector: {len(self.cases)} cases need {len(self.cases) - 1} edges, "
                            f"got {len(self.edges)}")
        if any(not math.isfinite(e) or e <= 0 for e in self.edges) or list(self.edges) != sorted(set(self.edges)):
            raise PlanError(f"bandwidth selector: edges must be positive and strictly ascending, got "
                            f"{list(self.edges)}")
        check_finite("bandwidth", "initial", self.initial)
        if self.initial <= 0:
            raise PlanError(f"bandwidth selector: initial must be a bandwidth > 0 (bytes/s), got {self.initial}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise PlanError(f"bandwidth selector: window must be an integer >= 1, got {self.window!r}")
        if self.fall not in FALLS:
            raise PlanError(f"bandwidth selector: fall must be one of {list(FALLS)}, got {self.fall!r}")
        check_finite("bandwidth", "hysteresis", self.hysteresis)
        if not 0 <= self.hysteresis < 1:
            raise PlanError(f"bandwidth selector: hysteresis must be in [0, 1), got {self.hysteresis}")

    def labels(self) -> tuple[str, ...]:
        return tuple(self.cases)

    def new_state(self) -> BandwidthState:
        return BandwidthState()

    def band(self, bandwidth: float) -> int:
        """The index of the case whose band holds `bandwidth`."""
        return bisect.bisect_right(self.edges, bandwidth)

    def _inside(self, level: int, bw: float) -> bool:
        lo = self.edges[level - 1] * (1 - self.hysteresis) if level > 0 else -math.inf
        hi = self.edges[level] * (1 + self.hysteresis) if level < len(self.edges) else math.inf
        return lo <= bw < hi

    def choose(self, state: BandwidthState, c: Choice) -> tuple[str, BandwidthState]:
        import numpy as np
        try:
            sig = np.asarray(c.value(self.link), dtype=np.float64).reshape(-1)
        except KeyError:
            sig = np.array([math.nan, 0.0])
        v, count = (float(sig[0]), int(sig[1])) if sig.size >= 2 else (math.nan, 0)
        samples, seen = list(state.samples), state.seen
        if count > seen and math.isfinite(v) and v > 0:   # a new measurement since the last call
            samples, seen = (samples + [v])[-self.window:], count
        pred = sum(samples) / len(samples) if samples else self.initial
        if samples and self.fall == "immediate":
            pred = min(pred, samples[-1])
        level = state.level
        if level is None or not self._inside(level, pred):
            level = self.band(pred)
        return self.cases[level], BandwidthState(level, seen, samples, pred)
