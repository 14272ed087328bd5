"""video_ar as a streamed program: the one-frame step with its KV cache kept by a
pared.ir.stream.Streamer (the cache becomes state of the Plan when captured), and a
rollout driver that needs only numpy, so the same loop runs the eager Streamer, the
captured Program and a torch-free artifact.

    streamer(model, frames=64)                 the full cache of a 64-frame rollout
    streamer(model, layout=KVLayout(...))      any per-head policy (ir/kvcache.py)
    rollout(call, context, frames, steps=8)    call(x, t, frame_pos, append) -> x0, numpy in and out

A model that also reads the pixels of its last P finished frames (`VideoDiT(prev_frames=P)`)
streams as step(x, t, frame_pos, prev [B, P, 32, 32], cache...): its calls take `prev` before
`append` (`rollout(..., prev_frames=P)` passes them; only the KV cache is state of the Plan).

A frame is generated as in model.rollout: DDIM from noise, `steps` calls that read
the cache (append 0), then the finished frame re-encoded at CTX_T in one call that
appends its K/V (append 1). The first CONTEXT_FRAMES true frames enter the same way.
Noise comes from numpy (seeded), so every contender sees the same draws.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np


def streamer(model: Any, frames: int | None = None, layout: Any = None):
    """A Streamer over the VideoDiT step: the last `frames` frames (a full cache for a rollout
    of that length), or `layout` (a KVLayout, one HeadPolicy, or a [layers][heads] table)."""
    from pared.ir.stream import Streamer
    from pared.workloads import example_module
    mdl = example_module("video_ar")
    step = mdl.PrevStep(model) if getattr(model, "prev_frames", 0) else model
    return Streamer(step, layers=model.depth, heads=model.heads, head_dim=model.head_dim,
                    tokens_per_frame=mdl.TOKENS, capacity_frames=frames, layout=layout, frame_pos_input=2)


def example_inputs(batch: int, prev_frames: int = 0):
    """Example inputs of the streamed step: (x, t, frame_pos, [prev,] append), torch."""
    import torch
    from pared.workloads import example_module
    mdl = example_module("video_ar")
    g = torch.Generator().manual_seed(0)
    prev = (torch.zeros(batch, prev_frames, mdl.FRAME, mdl.FRAME),) if prev_frames else ()
    return (torch.randn(batch, 1, mdl.FRAME, mdl.FRAME, generator=g), torch.full((batch,), 0.5),
            torch.tensor([0.0]), *prev, torch.tensor([1.0]))


def rollout(call: Callable[..., Any], context: np.ndarray, frames: int, *, steps: int = 8, seed: int = 0,
            ctx_t: float | None = None, on_frame: Callable[[int, np.ndarray], None] | None = None,
            prev_frames: int = 0) -> np.ndarray:
    """Generate clips frame after frame through `call(x, t, frame_pos, append) -> x0` (numpy).

    Args:
        context: [B, K, 1, 32, 32] true first frames in [-1, 1] (returned as they are).
        frames: the clip length returned (context included).
        prev_frames: the model reads its last this many frames: `call(x, t, frame_pos, prev,
            append)`, prev [B, P, 32, 32] the frames before frame_pos, newest first (zeros before 0).
    Returns:
        [B, frames, 1, 32, 32] float32 in [-1, 1].
    """
    from pared.workloads import example_module
    mdl = example_module("video_ar")
    ctx_t = mdl.CTX_T if ctx_t is None else ctx_t
    rng = np.random.default_rng(seed)
    b, k = context.shape[:2]
    f32 = np.float32
    keep, append = np.zeros(1, f32), np.ones(1, f32)

    def ac(t: float) -> tuple[float, float]:
        return math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)

    def prev(f: int) -> tuple:
        if not prev_frames:
            return ()
        zero = np.zeros_like(out[0])
        return (np.concatenate([out[f - j] if f - j >= 0 else zero for j in range(1, prev_frames + 1)], 1),)

    def commit(frame: np.ndarray, f: int) -> None:
        a, s = ac(ctx_t)
        xc = (a * frame + s * rng.standard_normal(frame.shape)).astype(f32)
        call(xc, np.full((b,), ctx_t, f32), np.array([f], f32), *prev(f), append)

    out = [context[:, i].astype(f32) for i in range(k)]
    for f in range(k):
        commit(out[f], f)
    ts = np.linspace(1.0, 0.0, steps + 1)
    for f in range(k, frames):
        x = rng.standard_normal((b, 1, mdl.FRAME, mdl.FRAME)).astype(f32)
        for i in range(steps):
            a_t, s_t = ac(ts[i])
            a_s, s_s = ac(ts[i + 1])
            x0 = np.clip(np.asarray(call(x, np.full((b,), ts[i], f32), np.array([f], f32), *prev(f), keep)), -1, 1)
            x = (a_s * x0 + s_s * (x - a_t * x0) / s_t).astype(f32)
        out.append(x)
        if on_frame is not None:
            on_frame(f, x)
        commit(x, f)
    return np.stack(out, 1)


def torch_call(model: Any) -> Callable[..., np.ndarray]:
    """A torch module (the Streamer, or a captured Program) as a numpy `call` for `rollout`."""
    import torch

    def call(*arrays: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(*[torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])
        return out.detach().cpu().numpy()
    return call


# -- for pipeline files (`pared optimize examples/pipelines/video_ar.yaml`) ----------------------
ROLLOUT_FRAMES = 64      # 8x the training length: the full cache a streamed rollout of that length needs


def build_streamer():
    """The shipped model with the full cache of a ROLLOUT_FRAMES-frame rollout."""
    from pared.workloads import example_module
    return streamer(example_module("video_ar").build_model(), frames=ROLLOUT_FRAMES)


def example_inputs_stream():
    from pared.workloads import example_module
    return example_inputs(4, int(example_module("video_ar").weights_meta().get("prev_frames", 0)))


def calibration_stream():
    """A loop rolling out 4 training clips for 32 frames (what head_types calibrates on)."""
    from pared.workloads import get_workload
    return get_workload("video_ar", batch=4, calib_frames=32).calibration()


def judge(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """The rollout-quality judge of a cache budget search (kv_policy / kv_drop option `judge`): two
    rollouts of the workload's calibration stream (`VideoARWorkload.calibration`: training clips
    0..B-1, frames in [-1, 1], [B, T, 1, 32, 32]) measured against the true clips by quality.py, the
    generated frames only:

        accuracy_drop  the reference's identity (the judge reading each tracked digit) minus the
                       candidate's, in points of [0, 1]
        error_rise     the candidate's velocity error minus the reference's, px/frame
        psnr_db        the candidate's frames against the reference's (analysis.metrics.psnr_db:
                       identical rollouts give its cap)

    Raises:
        ValueError: rollouts of another shape, or whose context frames are not those clips'."""
    from pared.analysis.metrics import psnr_db
    from pared.workloads import example_module
    data, mdl, q = (example_module("video_ar", "data.py"), example_module("video_ar"),
                    example_module("video_ar", "quality.py"))
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.shape != candidate.shape or reference.ndim != 5 or reference.shape[2:] != (1, mdl.FRAME, mdl.FRAME):
        raise ValueError(f"video_ar judge: expected two rollouts [B, T, 1, {mdl.FRAME}, {mdl.FRAME}] of one shape, "
                         f"got {reference.shape} and {candidate.shape}")
    b, t = reference.shape[:2]
    k = mdl.CONTEXT_FRAMES
    clips = [data.video(i, t, "train") for i in range(b)]
    truth = np.stack([c.frames[:k] for c in clips]).astype(np.float32) * 2 - 1
    if not np.allclose(reference[:, :k], truth, atol=1e-5):
        raise ValueError("video_ar judge: the rollouts do not start from the calibration clips (training clips "
                         f"0..{b - 1}); it judges VideoARWorkload.calibration's rollouts only")
    px = lambda v: (np.clip(v, -1, 1) + 1) / 2       # noqa: E731
    j = example_module("judge").load_judge()
    ref, got = q.measure(px(reference), clips, j), q.measure(px(candidate), clips, j)
    return {"accuracy_drop": float(np.mean(ref["identity"][k:]) - np.mean(got["identity"][k:])),
            "error_rise": float(np.mean(got["velocity_error"][k:]) - np.mean(ref["velocity_error"][k:])),
            "psnr_db": psnr_db(px(reference[:, k:]), px(candidate[:, k:]))}
