"""Fixed-capacity KV caches of whole frames, kept per layer and head by a policy.

A streaming generator (ir/stream.py) attends to the keys and values of earlier
frames. Keeping every frame grows memory and time without bound; which frames a
head keeps is its `HeadPolicy`, built from the primitives of Pyramid Forcing and
Dummy Forcing (METHODS.md, "KV-cache policies for streaming generation"):

    sink      the first `sink` frames of the stream, kept for good
    recent    a ring of the last `recent` frames
    middle    what to keep of a frame leaving the recent ring (`middle_frames` slots):
              none      nothing (sink + recent is StreamingLLM; recent alone a sliding window)
              strided   every `interval`-th frame leaving the ring, the latest `middle_frames` of them
              periodic  one frame per period of `interval` frames, the one at `phase` within it
                        (a Wave head's period; its latest `middle_frames` periods)
              merged    `interval` consecutive leaving frames averaged into one slot (K, V and
                        frame position alike), the latest `middle_frames` such slots
              heavy     the `middle_frames` leaving frames that received the most attention
                        (H2O's heavy hitters, per frame): a leaving frame takes an empty middle
                        slot, else replaces the middle frame with the lowest score if its own
                        score is higher, else is dropped
              snap      as heavy, the score being the attention of the latest appending call
                        alone (SnapKV's observation window votes; heavy accumulates it)

A head with no slots at all (sink = recent = 0) sees only the current frame: Dummy
Forcing's dropped heads.

Scores (layouts with a `heavy` or `snap` head). Each frame slot carries a score: the attention
mass its tokens received, summed over the batch rows, query rows and tokens of the frame (the
frame is the pooling window), and for `heavy` accumulated over the appending calls while the
frame is cached, for `snap` the latest call's alone (H2O accumulates over every
decoding step; here the appending call is the one whose queries see the finished frame,
SnapKV's observation window). The step reports the mass per cache slot (`mass` [L, H, C],
added to the step graph by passes/kv/kv_policy.py); the append adds it to the scores before
placing the new frame, which starts at 0. The batch rows share one policy (positions and
validity are per layer and head), so a heavy hitter is heavy for the batch as a whole.

Layout. Shapes stay static (ONNX Runtime, TVM): every (layer, head) has the same
number of frame slots, F = the largest policy's frames; for one head its slots are

    [0, sink) sink | [sink, sink + recent) recent ring | then middle_frames middle | padding

and slot f holds the T tokens of one frame (tokens [f*T, (f+1)*T) of the cache). The
state is the cache [L, 2, B, H, F*T, Dh], each token slot's frame position
[L, H, F*T] (float) and validity [L, H, F*T] (bool), and the frames appended so far
[1] (int64). A step model reads the positions and validity per layer and head and
masks what is not valid; padding is never valid.

`KVInit` (empty state) and `KVAppend` (one frame in) are plain torch modules: the
append computes every slot's new content as alpha*old + beta*evicted + gamma*new from
the frame count with integer arithmetic, so it exports to one static graph that runs
in the Executor without torch. `KVReference` is an independent eager emulation (frame
lists) the tests hold the graph to.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import torch

from .errors import OptionError

MIDDLE_KINDS = ("none", "strided", "periodic", "merged", "heavy", "snap")
HEAVY, SNAP = MIDDLE_KINDS.index("heavy"), MIDDLE_KINDS.index("snap")
RANKED = ("heavy", "snap")      # middles that rank frames by their attention score
_NOT_PICKED = 1e30      # a score no slot reaches (a finite bound: TVM's and ORT's min over +inf alike)


@dataclass(frozen=True)
class HeadPolicy:
    """What one head keeps of the stream (see the module doc)."""

    sink: int = 0
    recent: int = 0
    middle: str = "none"
    middle_frames: int = 0
    interval: int = 1       # strided: keep every interval-th leaving frame; periodic: the period; merged: frames per slot
    phase: int = 0          # periodic: the frame of each period that is kept (0 .. interval-1)

    def __post_init__(self):
        for f in ("sink", "recent", "middle_frames", "interval", "phase"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise OptionError(f"KV head policy: {f} must be an integer >= 0, got {v!r}")
        if self.middle not in MIDDLE_KINDS:
            raise OptionError(f"KV head policy: middle must be one of {list(MIDDLE_KINDS)}, got {self.middle!r}")
        if self.interval < 1:
            raise OptionError(f"KV head policy: interval must be >= 1, got {self.interval}")
        if self.middle != "none" and self.middle_frames < 1:
            raise OptionError(f"KV head policy: middle {self.middle!r} needs middle_frames >= 1")
        if self.middle == "none" and self.middle_frames:
            raise OptionError("KV head policy: middle_frames is set but middle is 'none'")
        if self.middle != "none" and self.recent < 1:
            raise OptionError(f"KV head policy: middle {self.middle!r} keeps frames leaving the recent ring; "
                              "it needs recent >= 1")
        if self.middle == "periodic" and self.phase >= self.interval:
            raise OptionError(f"KV head policy: phase {self.phase} must be below the period {self.interval}")
        if self.middle in RANKED and (self.interval != 1 or self.phase):
            raise OptionError(f"KV head policy: middle {self.middle!r} ranks frames by their attention score; "
                              "interval and phase do not apply to it (leave them 1 and 0)")

    @property
    def frames(self) -> int:
        """Frame slots this head uses."""
        return self.sink + self.recent + self.middle_frames

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "HeadPolicy":
        unknown = set(d) - {"sink", "recent", "middle", "middle_frames", "interval", "phase"}
        if unknown:
            raise OptionError(f"KV head policy: unknown field(s) {sorted(unknown)}; known: sink, recent, middle, "
                              "middle_frames, interval, phase")
        return HeadPolicy(**dict(d))

    @staticmethod
    def window(frames: int) -> "HeadPolicy":
        """The last `frames` frames (a FIFO; a full cache of that capacity)."""
        return HeadPolicy(recent=frames)


@dataclass(frozen=True)
class KVLayout:
    """A policy per (layer, head), and the tokens per frame."""

    policies: tuple[tuple[HeadPolicy, ...], ...]     # [layer][head]
    tokens_per_frame: int

    def __post_init__(self):
        if not self.policies or not self.policies[0] or len({len(r) for r in self.policies}) != 1:
            raise OptionError("KV layout: give one policy per layer and head (a non-empty [layers][heads] table)")
        if self.tokens_per_frame < 1:
            raise OptionError(f"KV layout: tokens_per_frame must be >= 1, got {self.tokens_per_frame}")

    @staticmethod
    def uniform(policy: HeadPolicy, layers: int, heads: int, tokens_per_frame: int) -> "KVLayout":
        return KVLayout(tuple(tuple(policy for _ in range(heads)) for _ in range(layers)), tokens_per_frame)

    @property
    def layers(self) -> int:
        return len(self.policies)

    @property
    def heads(self) -> int:
        return len(self.policies[0])

    @property
    def frames(self) -> int:
        """Frame slots per (layer, head): the largest policy's (at least 1, so shapes are never empty)."""
        return max(1, max(p.frames for row in self.policies for p in row))

    @property
    def capacity(self) -> int:
        """Token slots per (layer, head)."""
        return self.frames * self.tokens_per_frame

    @property
    def scored(self) -> bool:
        """Some head ranks frames by attention (heavy, snap): the state carries frame scores, the step
        reports attention mass."""
        return any(p.middle in RANKED for row in self.policies for p in row)

    def kept_frames(self) -> float:
        """Mean frame slots in use per (layer, head) (the memory a policy holds, padding excluded)."""
        n = [p.frames for row in self.policies for p in row]
        return sum(n) / len(n)

    def to_json(self) -> dict:
        return {"tokens_per_frame": self.tokens_per_frame,
                "policies": [[p.to_json() for p in row] for row in self.policies]}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "KVLayout":
        return KVLayout(tuple(tuple(HeadPolicy.from_json(p) for p in row) for row in d["policies"]),
                        int(d["tokens_per_frame"]))

    def table(self, field: str) -> torch.Tensor:
        """[L, H] int64 of one policy field (the middle kind as its index in MIDDLE_KINDS)."""
        get = (lambda p: MIDDLE_KINDS.index(p.middle)) if field == "middle" else (lambda p: getattr(p, field))
        return torch.tensor([[get(p) for p in row] for row in self.policies], dtype=torch.int64)


def state_shapes(layout: KVLayout, batch: int | str, head_dim: int) -> dict[str, tuple]:
    """name -> shape of the state tensors (cache, pos, valid, count; score where the layout is scored)."""
    c = layout.capacity
    out = {"cache": (layout.layers, 2, batch, layout.heads, c, head_dim), "pos": (layout.layers, layout.heads, c),
           "valid": (layout.layers, layout.heads, c), "count": (1,)}
    if layout.scored:
        out["score"] = (layout.layers, layout.heads, layout.frames)
    return out


def state_bytes(layout: KVLayout, batch: int, head_dim: int, itemsize: int = 4) -> int:
    """Bytes of the state of `layout` (state_shapes) for `batch` streams: the cache at `itemsize`
    bytes an element, positions and scores float32, validity bool, the count int64."""
    per = {"cache": itemsize, "pos": 4, "valid": 1, "count": 8, "score": 4}
    return sum(math.prod(shape) * per[k] for k, shape in state_shapes(layout, batch, head_dim).items())


class KVInit(torch.nn.Module):
    """x (its batch size) -> the empty state: (cache zeros, pos zeros, valid False, count 0), and
    score zeros [L, H, F] where the layout is scored."""

    def __init__(self, layout: KVLayout, head_dim: int):
        super().__init__()
        self.layers, self.heads, self.capacity, self.head_dim = layout.layers, layout.heads, layout.capacity, head_dim
        self.frames, self.scored = layout.frames, layout.scored

    def forward(self, x: torch.Tensor):
        b = x.shape[0]
        out = (torch.zeros(self.layers, 2, b, self.heads, self.capacity, self.head_dim, dtype=x.dtype,
                           device=x.device),
               torch.zeros(self.layers, self.heads, self.capacity, device=x.device),
               torch.zeros(self.layers, self.heads, self.capacity, dtype=torch.bool, device=x.device),
               torch.zeros(1, dtype=torch.int64, device=x.device))
        if self.scored:
            out = out + (torch.zeros(self.layers, self.heads, self.frames, device=x.device),)
        return out


class KVAppend(torch.nn.Module):
    """(cache, pos, valid, count, new_kv [L, 2, B, H, T, Dh], frame_pos [1]) -> the state with the
    frame appended by each head's policy (see the module doc). A scored layout's is ScoredKVAppend."""

    def __init__(self, layout: KVLayout):
        super().__init__()
        self.L, self.H, self.F, self.T = layout.layers, layout.heads, layout.frames, layout.tokens_per_frame
        self.scored = layout.scored
        for f in ("sink", "recent", "middle", "middle_frames", "interval", "phase"):
            self.register_buffer(f"_{f}", layout.table(f), persistent=False)
        self.register_buffer("_slots", torch.arange(self.F, dtype=torch.int64), persistent=False)
        if self.scored:     # earlier[g, f] = 1 where slot g comes before slot f (the first candidate, no sort)
            self.register_buffer("_earlier", (self._slots[:, None] < self._slots[None, :]).float(), persistent=False)

    def coefficients(self, count: torch.Tensor, score: torch.Tensor | None = None,
                     filled: torch.Tensor | None = None):
        """(alpha, beta, gamma, evicted) [L, H, F] float for the frame number count[0] (0-based):
        new slot = alpha*old + beta*evicted frame + gamma*new frame; evicted: one-hot of the
        recent slot whose frame leaves the ring. A scored layout's heavy heads also need each
        frame slot's `score` and whether it is `filled` ([L, H, F])."""
        n = count.reshape(1, 1)
        S, R, M, K = self._sink, self._recent, self._middle_frames, self._interval
        kind, phase = self._middle, self._phase

        def onehot(slot: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            return (self._slots == slot[..., None]) & cond[..., None]

        def at_least_1(x: torch.Tensor) -> torch.Tensor:     # (not clamp: TVM's int clip takes no infinite bound)
            return torch.maximum(x, torch.ones_like(x))

        nn_ = n.expand(self.L, self.H)
        into_sink = nn_ < S
        into_recent = (nn_ >= S) & (R > 0)
        rslot = S + torch.remainder(nn_ - S, at_least_1(R))
        evict = into_recent & (nn_ - S >= R)
        j = nn_ - S - R                                  # the leaving frame's index past the sink
        k = at_least_1(K)
        grp, ph = torch.div(j, k, rounding_mode="floor"), torch.remainder(j, k)
        mslot = S + R + torch.remainder(grp, at_least_1(M))
        mid = evict & (M > 0)
        strided, periodic, merged = kind == 1, kind == 2, kind == 3
        replace = mid & ((strided & (ph == 0)) | (periodic & (ph == phase)) | (merged & (ph == 0)))
        merge = mid & merged & (ph > 0)
        w_new = (onehot(nn_, into_sink) | onehot(rslot, into_recent)).float()
        share = 1.0 / (ph.float() + 1.0)                 # a merged slot's share of the c-th frame: 1 / (c + 1)
        beta = onehot(mslot, replace).float() + onehot(mslot, merge).float() * share[..., None]
        if self.scored:
            ranked = (kind == HEAVY) | (kind == SNAP)
            beta = beta + self._heavy(mid & ranked, onehot(rslot, evict).float(), score, filled, S + R, M)
        alpha = 1.0 - w_new - beta
        return alpha, beta, w_new, onehot(rslot, evict).float()

    def _heavy(self, leaving: torch.Tensor, evicted: torch.Tensor, score: torch.Tensor, filled: torch.Tensor,
               first: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """beta [L, H, F] of the heavy heads whose ring frame leaves (`leaving` [L, H]): the
        first empty middle slot, else the first middle slot of the lowest score if the leaving
        frame's score is higher; zero elsewhere."""
        in_mid = (self._slots >= first[..., None]) & (self._slots < (first + M)[..., None])
        empty = (in_mid & ~filled).float()
        any_empty = empty.sum(-1) > 0
        masked = torch.where(in_mid, score, torch.full_like(score, _NOT_PICKED))
        low = -(-masked).max(-1).values     # (not amin: TVM's torch frontend has max.dim, no min.dim)
        lowest = (in_mid & (masked <= low[..., None])).float()
        cand = torch.where(any_empty[..., None], empty, lowest)
        first_cand = (cand > 0) & ((cand @ self._earlier) == 0)
        s_leave = (score * evicted).sum(-1)
        take = leaving & (any_empty | (s_leave > low))
        return (first_cand & take[..., None]).float()

    def forward(self, cache: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, count: torch.Tensor,
                new_kv: torch.Tensor, frame_pos: torch.Tensor):
        if self.scored:
            raise ValueError("KVAppend: this layout has heavy heads; use ScoredKVAppend (append_module(layout))")
        return self._append(cache, pos, valid, count, new_kv, frame_pos)

    def _append(self, cache, pos, valid, count, new_kv, frame_pos, score=None, mass=None):
        L, H, F, T = self.L, self.H, self.F, self.T
        if self.scored:
            seen = mass.reshape(L, H, F, T).sum(-1)                   # this call's queries over each frame slot
            keep = (self._middle != SNAP).to(score.dtype)[..., None]   # heavy accumulates, snap takes the latest
            score = keep * score + seen
            filled = valid.reshape(L, H, F, T)[..., 0]
            alpha, beta, gamma, ev = self.coefficients(count, score, filled)
        else:
            alpha, beta, gamma, ev = self.coefficients(count)
        b, dh = cache.shape[2], cache.shape[5]
        old = cache.reshape(L, 2, b, H, F, T, dh)

        def c7(c: torch.Tensor) -> torch.Tensor:
            return c.to(cache.dtype).reshape(L, 1, 1, H, F, 1, 1)
        evicted = (old * c7(ev)).sum(4, keepdim=True)
        new = new_kv.reshape(L, 2, b, H, 1, T, dh)
        cache = (c7(alpha) * old + c7(beta) * evicted + c7(gamma) * new).reshape(L, 2, b, H, F * T, dh)
        pf = pos.reshape(L, H, F, T)[..., 0]
        pf = alpha * pf + beta * (pf * ev).sum(-1, keepdim=True) + gamma * frame_pos.reshape(1, 1, 1)
        vf = valid.reshape(L, H, F, T)[..., 0] | (gamma > 0) | (beta > 0)
        pos = pf[..., None].expand(L, H, F, T).reshape(L, H, F * T)
        valid = vf[..., None].expand(L, H, F, T).reshape(L, H, F * T)
        if self.scored:     # scores move with their frames; a new frame starts at 0
            score = alpha * score + beta * (score * ev).sum(-1, keepdim=True)
            return cache, pos, valid, count + 1, score
        return cache, pos, valid, count + 1


class ScoredKVAppend(KVAppend):
    """KVAppend of a layout with heavy heads: (cache, pos, valid, count, score, new_kv, frame_pos,
    mass [L, H, C]) -> (cache, pos, valid, count, score)."""

    def forward(self, cache: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, count: torch.Tensor,
                score: torch.Tensor, new_kv: torch.Tensor, frame_pos: torch.Tensor, mass: torch.Tensor):
        return self._append(cache, pos, valid, count, new_kv, frame_pos, score, mass)


def append_module(layout: KVLayout) -> KVAppend:
    """The append of `layout`: ScoredKVAppend where some head keeps heavy hitters, else KVAppend."""
    return ScoredKVAppend(layout) if layout.scored else KVAppend(layout)


def rows_layout(layout: KVLayout, rows: Sequence[tuple[int, int]]) -> KVLayout:
    """The layout of a compact state that keeps only `rows` ((layer, head) pairs, in order): one
    "layer" whose "heads" are those rows, each with its own policy."""
    if not rows:
        raise OptionError("KV layout: a compact state needs at least one (layer, head) row")
    return KVLayout((tuple(layout.policies[li][h] for li, h in rows),), layout.tokens_per_frame)


class RowsKVAppend(torch.nn.Module):
    """The append of a compact state (rows_layout): (cache, pos, valid, count, new_kv [L, 2, B, H,
    T, Dh], frame_pos) with new_kv reduced to the kept rows ([1, 2, B, R, T, Dh]), then appended by
    the rows' policies. A scored layout's is ScoredRowsKVAppend (see rows_append_module)."""

    def __init__(self, layout: KVLayout, rows: Sequence[tuple[int, int]]):
        super().__init__()
        self.inner = append_module(rows_layout(layout, rows))
        self.L, self.H = layout.layers, layout.heads
        self.register_buffer("_rows", torch.tensor([li * self.H + h for li, h in rows], dtype=torch.int64),
                             persistent=False)

    def rows(self, new_kv: torch.Tensor) -> torch.Tensor:
        b, t, dh = new_kv.shape[2], new_kv.shape[4], new_kv.shape[5]
        flat = new_kv.permute(1, 2, 0, 3, 4, 5).reshape(2, b, self.L * self.H, t, dh)
        return flat.index_select(2, self._rows)[None]

    def forward(self, cache: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, count: torch.Tensor,
                new_kv: torch.Tensor, frame_pos: torch.Tensor):
        return self.inner(cache, pos, valid, count, self.rows(new_kv), frame_pos)


class ScoredRowsKVAppend(RowsKVAppend):
    """RowsKVAppend of a scored layout: (cache, pos, valid, count, score, new_kv, frame_pos, mass
    [L, H, C]) with the mass reduced to the kept rows too."""

    def forward(self, cache: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, count: torch.Tensor,
                score: torch.Tensor, new_kv: torch.Tensor, frame_pos: torch.Tensor, mass: torch.Tensor):
        mass = mass.reshape(self.L * self.H, mass.shape[-1]).index_select(0, self._rows)[None]
        return self.inner(cache, pos, valid, count, score, self.rows(new_kv), frame_pos, mass)


def rows_append_module(layout: KVLayout, rows: Sequence[tuple[int, int]]) -> RowsKVAppend:
    """The append of `layout`'s compact state of `rows`."""
    return ScoredRowsKVAppend(layout, rows) if layout.scored else RowsKVAppend(layout, rows)


class KVReference:
    """The same policies as frame lists, eagerly (what the tests hold KVAppend to).

    Per (layer, head) it keeps a dict slot -> [frame position, K/V [2, B, T, Dh], merged count,
    score]."""

    def __init__(self, layout: KVLayout):
        self.layout = layout
        self.n = 0
        self.slots: list[list[dict[int, list]]] = [[{} for _ in range(layout.heads)] for _ in range(layout.layers)]

    def append(self, new_kv: torch.Tensor, frame_pos: float, mass: torch.Tensor | None = None) -> None:
        """new_kv [L, 2, B, H, T, Dh]; mass [L, H, C]: the attention each token slot of `state()`
        received from this call's queries (a scored layout needs it)."""
        n, T = self.n, self.layout.tokens_per_frame
        if self.layout.scored and mass is None:
            raise ValueError("KVReference: a layout with heavy heads needs each call's attention mass")
        for li, row in enumerate(self.layout.policies):
            for hi, p in enumerate(row):
                slots = self.slots[li][hi]
                if mass is not None:
                    for s, e in slots.items():
                        seen = float(mass[li, hi, s * T:(s + 1) * T].double().sum())
                        e[3] = seen if p.middle == "snap" else e[3] + seen
                kv = new_kv[li, :, :, hi].clone()
                if n < p.sink:
                    slots[n] = [float(frame_pos), kv, 1, 0.0]
                    continue
                if p.recent == 0:
                    continue                                    # past the sink, a head without a ring keeps nothing
                r = p.sink + (n - p.sink) % p.recent
                leaving = slots.get(r) if n - p.sink >= p.recent else None
                slots[r] = [float(frame_pos), kv, 1, 0.0]
                if leaving is None or p.middle == "none":
                    continue
                first = p.sink + p.recent
                if p.middle in RANKED:
                    mids = range(first, first + p.middle_frames)
                    empty = [m for m in mids if m not in slots]
                    if empty:
                        slots[empty[0]] = leaving
                    else:
                        low = min(slots[m][3] for m in mids)
                        if leaving[3] > low:
                            slots[next(m for m in mids if slots[m][3] == low)] = leaving
                    continue
                j = n - p.sink - p.recent                       # the leaving frame's index past the sink
                g, ph = divmod(j, p.interval)
                m = first + g % p.middle_frames
                if p.middle in ("strided", "merged") and ph == 0 or p.middle == "periodic" and ph == p.phase:
                    slots[m] = [leaving[0], leaving[1], 1, leaving[3]]
                elif p.middle == "merged":
                    pos, kv_m, c, sc = slots[m]
                    share = 1.0 / (c + 1)
                    slots[m] = [(pos * c + leaving[0]) / (c + 1), (kv_m * c + leaving[1]) / (c + 1), c + 1,
                                (1 - share) * sc + share * leaving[3]]
        self.n += 1

    def frames_kept(self, layer: int, head: int) -> list[float]:
        """The frame positions one head holds, by slot."""
        return [self.slots[layer][head][s][0] for s in sorted(self.slots[layer][head])]

    def state(self, batch: int, head_dim: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cache, pos, valid) in KVAppend's layout."""
        lay, T = self.layout, self.layout.tokens_per_frame
        cache = torch.zeros(lay.layers, 2, batch, lay.heads, lay.capacity, head_dim, dtype=dtype)
        pos = torch.zeros(lay.layers, lay.heads, lay.capacity)
        valid = torch.zeros(lay.layers, lay.heads, lay.capacity, dtype=torch.bool)
        for li in range(lay.layers):
            for hi in range(lay.heads):
                for s, (p, kv, *_) in self.slots[li][hi].items():
                    cache[li, :, :, hi, s * T:(s + 1) * T] = kv
                    pos[li, hi, s * T:(s + 1) * T] = p
                    valid[li, hi, s * T:(s + 1) * T] = True
        return cache, pos, valid


def uniform_policy(name: str, frames: int, sink: int = 1) -> HeadPolicy:
    """The uniform policies at a budget of `frames`: `window` (the last frames), `sink_window`
    (StreamingLLM: `sink` first frames + the last ones), `heavy` (H2O: `sink` first frames, then
    half the rest recent and half heavy hitters, the recent half rounded up), `snap` (the same
    split, ranked by the latest call's attention: SnapKV)."""
    if name == "window":
        return HeadPolicy.window(frames)
    if name in ("sink_window",) + RANKED:
        if frames <= sink:
            raise OptionError(f"{name}: a budget of {frames} frame(s) leaves no room for a window after "
                              f"{sink} sink frame(s)")
        rest = frames - sink
        if name == "sink_window" or rest < 2:
            return HeadPolicy(sink=sink, recent=rest)
        return HeadPolicy(sink=sink, recent=rest - rest // 2, middle=name, middle_frames=rest // 2)
    raise OptionError(f"unknown uniform KV policy {name!r}; known: window, sink_window, heavy, snap")


def layout_from(policies: Sequence[Sequence[HeadPolicy]] | HeadPolicy, layers: int, heads: int,
                tokens_per_frame: int) -> KVLayout:
    """A KVLayout from one policy for every head or a [layers][heads] table (checked against the model)."""
    if isinstance(policies, HeadPolicy):
        return KVLayout.uniform(policies, layers, heads, tokens_per_frame)
    lay = KVLayout(tuple(tuple(r) for r in policies), tokens_per_frame)
    if (lay.layers, lay.heads) != (layers, heads):
        raise OptionError(f"KV layout: a {lay.layers}x{lay.heads} policy table for a model with {layers} layers "
                          f"and {heads} heads")
    return lay
