"""Head types of a streamed generator: where each attention head looks in the history
(Pyramid Forcing's offline classification; Dummy Forcing's attention-mass cost).

The calibration is a stream through a captured pared.ir.stream.Streamer (calls of
(inputs..., append)). At every attention site of the step graph (one per layer, in
graph order; fused scaled_dot_product_attention or a softmax feeding a matmul) the
probabilities of a sampled share of the query rows (`query_share`, seeded; Dummy
Forcing samples a third) are taken (a softmax's value) or recomputed from the tapped q,
k and mask (fused attention), and the keys
are read as the cache's C slots followed by the frame's own tokens (the Streamer's
contract). Each slot's frame comes from the step's tapped `cache_pos` / `cache_valid`
and the call's frame position. Only calls whose cache holds at least `min_frames`
frames count (a short history has no middle).

Per layer and head, averaged over batch rows, sampled queries and counted calls:
    p_first    mass on the first `first_frames` frames of the stream (the sink)
    p_recent   mass on the `recent` frames before the current one
    p_mid      mass on the rest of the history (neither first nor recent)
    p_current  mass on the current frame's own tokens
    profile    mass by frame distance 0 .. max_distance (0: the current frame; the first
               frames excluded, so the sink does not smear over distances)
    periodicity, period
               the largest share of the profile's (distance 1 .. max_distance, mean
               removed) spectral power at one frequency of at least 2 cycles, and its
               period in frames (a Wave head attends to every period-th frame)
    dummy_cost max(p_first, p_recent + p_mid) (Dummy Forcing's max(first, middle), its middle
               being all the history between the first frames and the current one): a head
               with a low cost barely uses the history, and keeps only the current frame
               under kv_drop

Types (this analysis's rule; Pyramid Forcing's logit sign-rate statistics are not public
in a form that carries over, its labels are):
    wave    periodicity >= wave_min
    anchor  otherwise, p_mid / (1 - p_current) >= anchor_min: it reads the far history
    veil    otherwise: the first and the adjacent frames carry its history
    dummy   the `dummy_share` of heads with the lowest dummy_cost (default none)

Reads: calibration; the KVStream record. Writes: HeadTypes (a record; nothing on nodes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pared.ir.errors import OptionError, PassError
from pared.ir.program import Program
from pared.ir.records import Record
from pared.ir.stream import stream_record
from pared.ir.transform import Analysis, PassContext, check_range, register_pass

from .attention_entropy import find_attention, sdpa_probabilities
from .recorder import Tap, record

_NAME = "head_types"
TYPES = ("anchor", "wave", "veil", "dummy")


@dataclass(frozen=True)
class HeadTypes(Record):
    """Per layer and head of a streamed step: its type and the statistics it was chosen from
    ([layer][head] tables; see the module doc)."""

    types: tuple[tuple[str, ...], ...]
    p_first: tuple[tuple[float, ...], ...]
    p_recent: tuple[tuple[float, ...], ...]
    p_mid: tuple[tuple[float, ...], ...]
    p_current: tuple[tuple[float, ...], ...]
    periodicity: tuple[tuple[float, ...], ...]
    period: tuple[tuple[float, ...], ...]
    dummy_cost: tuple[tuple[float, ...], ...]
    profile: tuple[tuple[tuple[float, ...], ...], ...]    # [layer][head][distance]
    calls: int                                           # calls counted (cache >= min_frames)
    options: dict

    def counts(self) -> dict[str, int]:
        out = {t: 0 for t in TYPES}
        for row in self.types:
            for t in row:
                out[t] += 1
        return out


def periodicity(profile: np.ndarray) -> tuple[float, float]:
    """(largest share of spectral power at one frequency of >= 2 cycles, its period in frames)
    of a profile over distances 1..D (mean removed); (0, 0) when it is flat or too short."""
    x = np.asarray(profile, dtype=np.float64)
    if x.size < 4:
        return 0.0, 0.0
    x = x - x.mean()
    power = np.abs(np.fft.rfft(x)) ** 2
    total = power[1:].sum()
    if total <= 1e-20 or power.size < 3:
        return 0.0, 0.0
    k = 2 + int(np.argmax(power[2:]))
    return float(power[k] / total), float(x.size / k)


class _Acc:
    def __init__(self, L: int, H: int, D: int):
        self.mass = np.zeros((L, H, 4))        # first, recent, mid, current
        self.profile = np.zeros((L, H, D + 1))
        self.n = np.zeros((L,))
        self.calls: set[int] = set()


@register_pass(_NAME)
class HeadTypesAnalysis(Analysis):
    """Classify the heads of a streamed step by where they look in the history (module doc)."""

    record = HeadTypes

    @dataclass(frozen=True, kw_only=True)
    class Options:
        first_frames: int = 1        # the sink: the stream's first frames
        recent: int = 2              # frames before the current one counted as recent
        min_frames: int = 6          # count a call only when the cache holds this many frames
        max_distance: int = 32       # the distance profile's length
        query_share: float = 1 / 3   # share of query rows sampled per call
        wave_min: float = 0.5        # periodicity at or above this: a Wave head
        anchor_min: float = 0.35     # p_mid / (1 - p_current) at or above this: an Anchor head
        dummy_share: float = 0.0     # this share of heads, lowest dummy_cost first, are Dummy heads
        seed: int = 0

        def __post_init__(self):
            check_range(_NAME, "first_frames", self.first_frames, lo=0)
            check_range(_NAME, "recent", self.recent, lo=0)
            check_range(_NAME, "min_frames", self.min_frames, lo=1)
            check_range(_NAME, "max_distance", self.max_distance, lo=4)
            check_range(_NAME, "query_share", self.query_share, lo=0, hi=1, lo_open=True)
            for f in ("wave_min", "anchor_min", "dummy_share"):
                check_range(_NAME, f, getattr(self, f), lo=0, hi=1)
            if self.min_frames <= self.first_frames + self.recent:
                raise OptionError(f"pass '{_NAME}': option 'min_frames' ({self.min_frames}) must exceed "
                                  f"first_frames + recent ({self.first_frames + self.recent}), or no counted call "
                                  "has a middle")

    def analyze(self, program: Program, ctx: PassContext) -> HeadTypes:
        o = self.options
        rec = stream_record(program, _NAME)
        if ctx.calibration is None:
            raise PassError(f"pass '{_NAME}' needs a calibration run: a stream of calls (inputs..., append) or a "
                            "loop callable that rolls one stream out through the model")
        step = program.graphs[rec.step]
        gm = step.module
        sites = find_attention(gm)
        if len(sites) != rec.layers:
            raise PassError(f"pass '{_NAME}': the step graph {rec.step!r} has {len(sites)} attention site(s) for "
                            f"{rec.layers} layers; it reads one site per layer")
        names = step.input_names
        n_own = len(rec.inputs) - 1
        pos_name, valid_name = names[n_own + 1], names[n_own + 2]
        L, H, T, D = rec.layers, rec.heads, rec.tokens_per_frame, o.max_distance
        acc = _Acc(L, H, D)
        rng = np.random.default_rng(o.seed)
        order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        trigger = {}
        for li, s in enumerate(sites):
            taps = s.taps
            trigger[max(taps, key=lambda n: order[n.name]).name] = (li, s)
        latest: dict[str, torch.Tensor] = {}

        def on_value(tap: Tap, v: torch.Tensor) -> None:
            latest[tap.node] = v
            if tap.node not in trigger:
                return
            li, s = trigger[tap.node]
            valid = latest[valid_name]
            vv = valid if valid.dim() == 1 else valid[li]
            vv = vv.expand(H, -1) if vv.dim() == 1 else vv
            frames_held = int(vv.any(0).sum()) // T
            if frames_held < o.min_frames:
                return
            g = lambda n: latest[n.name] if n is not None else None       # noqa: E731
            rows = v.shape[-2] if s.source == "softmax" else g(s.q).shape[-2]
            take = max(1, int(round(rows * o.query_share)))
            idx = torch.as_tensor(np.sort(rng.choice(rows, take, replace=False)))
            if s.source == "softmax":
                a = torch.nan_to_num(v, nan=0.0).index_select(-2, idx)
            else:
                mask = g(s.mask)
                if mask is not None and mask.shape[-2] == rows:
                    mask = mask.index_select(-2, idx)
                a = sdpa_probabilities(g(s.q).index_select(-2, idx), g(s.k), mask, is_causal=s.causal,
                                       scale=s.scale)
            a = a.reshape(-1, H, a.shape[-2], a.shape[-1])          # [B, H, rows, keys] (also from [B*H, ...])
            if a.shape[-1] != vv.shape[-1] + T:
                raise PassError(f"pass '{_NAME}': attention site {s.node.name} of {rec.step!r} has {a.shape[-1]} "
                                f"keys; a streamed step attends to its {vv.shape[-1]} cache slots and then its "
                                f"{T} own tokens")
            w = a.float().mean(dim=(0, 2))                                          # [H, C + T]
            pos = latest[pos_name]
            pp = pos if pos.dim() == 1 else pos[li]
            pp = pp.expand(H, -1) if pp.dim() == 1 else pp
            fp = float(latest[rec.frame_pos].reshape(-1)[0])
            dist = torch.round(fp - pp).long()                                     # [H, C]
            cache_w, cur_w = w[:, :-T] * vv, w[:, -T:].sum(-1)
            first = (pp < o.first_frames - 0.5) & vv
            recent = (dist >= 1) & (dist <= o.recent) & vv & ~first
            mid = vv & ~first & ~recent
            acc.mass[li] += torch.stack([(cache_w * first).sum(-1), (cache_w * recent).sum(-1),
                                         (cache_w * mid).sum(-1), cur_w], -1).double().numpy()
            prof = torch.zeros(H, D + 1, dtype=torch.float64)
            prof[:, 0] = cur_w.double()
            keep = ~first & vv & (dist >= 1) & (dist <= D)
            prof.scatter_add_(1, dist.clamp(0, D), (cache_w * keep).double())
            acc.profile[li] += prof.numpy()
            acc.n[li] += 1
            acc.calls.add(tap.call)

        ctx.progress(f"{_NAME}: recording {len(sites)} attention sites of {rec.step!r}")
        taps = {rec.step: list(dict.fromkeys([pos_name, valid_name, rec.frame_pos]
                                             + [t.name for s in sites for t in s.taps]))}
        record(program, ctx.calibration, taps, on_value)
        if not acc.n.min() > 0:
            raise PassError(f"pass '{_NAME}': no call of the calibration stream had {o.min_frames} frames in the "
                            "cache; stream longer (or lower option 'min_frames')")
        mass = acc.mass / acc.n[:, None, None]
        prof = acc.profile / acc.n[:, None, None]
        first, recent, mid, cur = (mass[..., i] for i in range(4))
        per = np.array([[periodicity(prof[li, h, 1:]) for h in range(H)] for li in range(L)])   # [L, H, 2]
        cost = np.maximum(first, mid + recent)      # Dummy Forcing's middle: all history after the first frames
        far = mid / np.maximum(1.0 - cur, 1e-12)
        types = np.where(per[..., 0] >= o.wave_min, "wave", np.where(far >= o.anchor_min, "anchor", "veil"))
        n_dummy = int(math.floor(o.dummy_share * L * H + 1e-9))
        if n_dummy:
            for flat in np.argsort(cost, axis=None, kind="stable")[:n_dummy]:
                types[np.unravel_index(flat, cost.shape)] = "dummy"

        def tab(x: np.ndarray) -> tuple:
            return tuple(tuple(round(float(v), 6) for v in row) for row in x)
        out = HeadTypes(types=tuple(tuple(str(t) for t in row) for row in types), p_first=tab(first),
                        p_recent=tab(recent), p_mid=tab(mid), p_current=tab(cur), periodicity=tab(per[..., 0]),
                        period=tab(per[..., 1]), dummy_cost=tab(cost),
                        profile=tuple(tab(prof[li]) for li in range(L)), calls=len(acc.calls),
                        options={k: getattr(o, k) for k in ("first_frames", "recent", "min_frames", "max_distance",
                                                            "query_share", "wave_min", "anchor_min", "dummy_share",
                                                            "seed")})
        ctx.log.info("%s: %s over %d calls", _NAME, out.counts(), out.calls)
        return out


def plot(rec: HeadTypes, path: str) -> str:
    """Each head's mass by frame distance (one panel per layer), coloured by type; written
    atomically to `path` (PNG). Needs matplotlib."""
    import os
    import tempfile

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = {"anchor": "tab:red", "wave": "tab:blue", "veil": "tab:green", "dummy": "tab:gray"}
    L = len(rec.types)
    fig, axes = plt.subplots(1, L, figsize=(2.6 * L, 2.4), sharey=True, squeeze=False)
    for li in range(L):
        ax = axes[0, li]
        for h, t in enumerate(rec.types[li]):
            ax.plot(range(len(rec.profile[li][h])), rec.profile[li][h], color=colours[t], lw=1.2,
                    label=f"h{h} {t}")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_title(f"layer {li}", fontsize=8)
        ax.set_xlabel("frame distance", fontsize=7)
        ax.legend(fontsize=6)
    axes[0, 0].set_ylabel("attention mass")
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=d)
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
