"""ir/kvcache.py: the per-head KV-cache policies. KVAppend (the graph the Plan runs) against
KVReference (frame lists), over hand-picked and random layouts; what each primitive keeps."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from pared.ir.errors import OptionError
from pared.ir.kvcache import (HeadPolicy, KVAppend, KVInit, KVLayout, KVReference, append_module, layout_from,
                              state_shapes, uniform_policy)

T, B, DH = 3, 2, 4


def _run(layout: KVLayout, frames: int, seed: int = 0, mass=None):
    """Append `frames` random frames (positions 10, 11, ...) through both; assert the same state
    after every frame; return the reference. A scored layout gets each call's attention mass per
    token slot from mass(n) ([L, H, C]; default random)."""
    app, ref = append_module(layout), KVReference(layout)
    state = KVInit(layout, DH)(torch.zeros(B, 1))
    g = torch.Generator().manual_seed(seed)
    for n in range(frames):
        new = torch.randn(layout.layers, 2, B, layout.heads, T, DH, generator=g)
        if layout.scored:
            m = mass(n) if mass else torch.rand(layout.layers, layout.heads, layout.capacity, generator=g)
            state = app(*state[:5], new, torch.tensor([10.0 + n]), m)
            ref.append(new, 10.0 + n, m)
        else:
            state = app(*state, new, torch.tensor([10.0 + n]))
            ref.append(new, 10.0 + n)
        cache, pos, valid = ref.state(B, DH)
        torch.testing.assert_close(state[0], cache, atol=1e-6, rtol=1e-6, msg=f"cache after frame {n}")
        torch.testing.assert_close(state[1], pos, atol=1e-5, rtol=0, msg=f"positions after frame {n}")
        assert torch.equal(state[2], valid), f"validity after frame {n}"
        assert int(state[3]) == n + 1
        if layout.scored:       # every filled frame slot's score, as the frame lists accumulated it
            for li in range(layout.layers):
                for hi in range(layout.heads):
                    for s, e in ref.slots[li][hi].items():
                        assert float(state[4][li, hi, s]) == pytest.approx(e[3], rel=1e-5, abs=1e-5), \
                            f"score of slot {s} (layer {li}, head {hi}) after frame {n}"
    return ref


def test_each_primitive_keeps_the_frames_it_names():
    pols = ((HeadPolicy(sink=2, recent=3),                                           # StreamingLLM
             HeadPolicy(recent=4),                                                   # a sliding window
             HeadPolicy(sink=1, recent=2, middle="strided", middle_frames=2, interval=3)),
            (HeadPolicy(sink=1, recent=2, middle="periodic", middle_frames=3, interval=4, phase=1),
             HeadPolicy(sink=1, recent=2, middle="merged", middle_frames=2, interval=3),
             HeadPolicy()))                                                          # Dummy Forcing's dropped head
    lay = KVLayout(pols, T)
    ref = _run(lay, 30)
    kept = {(li, hi): ref.frames_kept(li, hi) for li in range(2) for hi in range(3)}
    last = 39.0
    assert kept[0, 0] == [10.0, 11.0, 39.0, 37.0, 38.0]
    assert sorted(kept[0, 1]) == [36.0, 37.0, 38.0, 39.0]
    # frames leave the ring of 2 at arrival n: frame n - 2, index past the sink j = n - 3 (0 .. 26)
    # strided: kept when j % 3 == 0 (frames 11 + 3k), the latest 2
    strided = sorted(kept[0, 2][3:])
    assert strided == [32.0, 35.0] and sorted(kept[0, 2][:3]) == [10.0, 38.0, last]
    # periodic: j % 4 == 1 (frames 12 + 4k), the latest 3 periods
    assert sorted(kept[1, 0][3:]) == [28.0, 32.0, 36.0]
    # merged: 3 consecutive leaving frames per slot (j = 21..23, 24..26), position their mean
    assert sorted(kept[1, 1][3:]) == [33.0, 36.0]
    assert kept[1, 2] == []
    assert lay.frames == 6 and lay.capacity == 18
    assert lay.kept_frames() == pytest.approx((5 + 4 + 5 + 6 + 5 + 0) / 6)


def test_heavy_hitters_keep_the_most_attended_leaving_frames():
    """One head: ring of 1, two heavy slots (slots 1, 2). At append n the ring holds frame n - 1,
    which then leaves with the mass it got: 5 for frames 3 and 7, 1 for the others. The middle
    fills with frames 0 and 1, frame 3 replaces the first lowest (frame 0), frame 7 the next
    (frame 1); a frame that only ties the lowest does not replace it."""
    lay = KVLayout(((HeadPolicy(recent=1, middle="heavy", middle_frames=2),),), T)

    def mass(n):
        m = torch.zeros(1, 1, lay.capacity)
        m[0, 0, :T] = (5.0 if n - 1 in (3, 7) else 1.0) / T
        return m
    ref = _run(lay, 10, mass=mass)
    assert ref.frames_kept(0, 0) == [19.0, 13.0, 17.0]
    ref = _run(lay, 3, mass=mass)
    assert ref.frames_kept(0, 0) == [12.0, 10.0, 11.0]          # empty middle slots fill first, in order
    ref = _run(lay, 6, mass=mass)
    assert ref.frames_kept(0, 0) == [15.0, 13.0, 11.0]          # frames 2 and 4 tied frame 1's score: dropped
    uni = uniform_policy("heavy", 6, sink=1)
    assert (uni.sink, uni.recent, uni.middle, uni.middle_frames) == (1, 3, "heavy", 2)
    assert uniform_policy("heavy", 2, sink=1) == HeadPolicy(sink=1, recent=1)
    assert lay.scored and KVLayout.uniform(uni, 1, 2, T).scored
    assert not KVLayout.uniform(HeadPolicy(sink=1, recent=2), 1, 2, T).scored
    assert state_shapes(lay, B, DH)["score"] == (1, 1, 3)


def test_snap_ranks_by_the_latest_call_alone():
    """A ring of 1 and one ranked slot. Frame 0 leaves with mass 5 and takes the slot; afterwards
    the slot's frame gets 0 from every call and each leaving frame 1: heavy keeps frame 0 (its 5
    accumulated), snap replaces it at once (its latest score is 0)."""
    def mass_fn(lay):
        def mass(n):
            m = torch.zeros(1, 1, lay.capacity)
            m[0, 0, :T] = (5.0 if n == 1 else 1.0) / T       # the ring slot only (slot 0)
            return m
        return mass
    kept = {}
    for kind in ("heavy", "snap"):
        lay = KVLayout(((HeadPolicy(recent=1, middle=kind, middle_frames=1),),), T)
        kept[kind] = _run(lay, 6, mass=mass_fn(lay)).frames_kept(0, 0)
    assert kept["heavy"] == [15.0, 10.0] and kept["snap"] == [15.0, 14.0]
    assert uniform_policy("snap", 5, sink=1) == HeadPolicy(sink=1, recent=2, middle="snap", middle_frames=2)


def test_a_head_without_slots_has_no_valid_slot_and_padding_stays_invalid():
    lay = KVLayout(((HeadPolicy(), HeadPolicy(recent=2)),), T)
    app = KVAppend(lay)
    state = KVInit(lay, DH)(torch.zeros(B, 1))
    for n in range(5):
        state = app(*state, torch.randn(1, 2, B, 2, T, DH), torch.tensor([float(n)]))
    assert not state[2][0, 0].any() and state[2][0, 1].all()
    assert torch.count_nonzero(state[0][:, :, :, 0]) == 0


policy = st.builds(
    lambda sink, recent, kind, m, k, ph: HeadPolicy(
        sink=sink, recent=recent if kind == "none" else max(recent, 1), middle=kind,
        middle_frames=0 if kind == "none" else m, interval=1 if kind in ("heavy", "snap") else k,
        phase=ph % k if kind == "periodic" else 0),
    st.integers(0, 3), st.integers(0, 4), st.sampled_from(["none", "strided", "periodic", "merged", "heavy", "snap"]),
    st.integers(1, 3), st.integers(1, 4), st.integers(0, 3))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(policy, min_size=2, max_size=2), min_size=1, max_size=2), st.integers(0, 2**16))
def test_append_graph_equals_frame_lists_for_any_layout(rows, seed):
    _run(KVLayout(tuple(tuple(r) for r in rows), T), 25, seed)


def test_append_exports_with_static_shapes():
    lay = KVLayout.uniform(HeadPolicy(sink=1, recent=2, middle="merged", middle_frames=2, interval=2), 2, 2, T)
    state = KVInit(lay, DH)(torch.zeros(B, 1))
    ex = (*state, torch.randn(2, 2, B, 2, T, DH), torch.tensor([0.0]))
    ep = torch.export.export(KVAppend(lay), ex, strict=False)
    for node in ep.graph.nodes:
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor):
            assert all(isinstance(d, int) for d in v.shape), node.format_node()
    assert state_shapes(lay, B, DH)["cache"] == tuple(state[0].shape)


def test_policies_are_checked():
    with pytest.raises(OptionError, match="middle 'strided' needs middle_frames >= 1"):
        HeadPolicy(recent=2, middle="strided")
    with pytest.raises(OptionError, match="it needs recent >= 1"):
        HeadPolicy(middle="merged", middle_frames=2)
    with pytest.raises(OptionError, match="phase 3 must be below the period 3"):
        HeadPolicy(recent=1, middle="periodic", middle_frames=1, interval=3, phase=3)
    with pytest.raises(OptionError, match="must be one of"):
        HeadPolicy(middle="heaviest")
    with pytest.raises(OptionError, match="interval and phase do not apply"):
        HeadPolicy(recent=1, middle="heavy", middle_frames=1, interval=2)
    with pytest.raises(OptionError, match="unknown field\\(s\\) \\['sinks'\\]"):
        HeadPolicy.from_json({"sinks": 1})
    with pytest.raises(OptionError, match="a 1x2 policy table for a model with 2 layers"):
        layout_from([[HeadPolicy(), HeadPolicy()]], 2, 2, T)
    with pytest.raises(OptionError, match="no room for a window"):
        uniform_policy("sink_window", 2, sink=2)
    lay = KVLayout.uniform(HeadPolicy(sink=1, recent=3), 2, 2, T)
    assert KVLayout.from_json(lay.to_json()) == lay
