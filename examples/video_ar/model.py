"""video_ar: a frame-causal diffusion transformer that denoises the next frame of a
moving-digits clip (examples/video_ar/data.py) conditioned on the K/V cache of
the frames before it (the CausVid / Self Forcing layout, at toy scale).

Each 32x32 frame is 64 patch tokens (4x4 patches) with a fixed 2D sin-cos
position embedding. A token attends to the tokens of its own frame and to the
cached K/V of earlier frames (block-causal). Time runs through an ALiBi bias
only, -slope_h * (frame distance), with one fixed slope per head (1, 1/2, 1/4,
1/8): no absolute frame embedding, so a rollout may run past the training length
and the cache may be cut, strided or reordered frame by frame as long as each
slot keeps its frame position. Space has, besides the absolute embedding, a
fixed locality bias per head, -beta_h * (patch distance)^2 with beta 1, 1/4,
1/16, 0 (slot s of the cache holds patch s % 64: the cache is made of whole frames). The diffusion timestep conditions every block by adaLN-Zero (as
DiT). The model predicts the clean frame x0; the schedule is the continuous
cosine one, x_t = cos(pi t / 2) x0 + sin(pi t / 2) eps, t in [0, 1].

    build_model()                 -> VideoDiT with the shipped weights (eval mode)
    VideoDiT.forward(x, t, frame_pos, kv_cache, cache_pos, cache_valid) -> (x0, new_kv)
        x           [B, 1, 32, 32]  the noisy current frame, in [-1, 1] at t = 0
        t           [B]             diffusion time in [0, 1]
        frame_pos   [1]             the current frame's index (float)
        kv_cache    [L, 2, B, H, C, Dh]   K/V of earlier frames, C token slots (static capacity)
        cache_pos   [C] or [L, H, C]  frame index of each slot (float), shared or per layer and head
        cache_valid [C] or [L, H, C]  bool: slot holds a frame (others are ignored)
        x0          [B, 1, 32, 32]  the predicted clean frame
        new_kv      [L, 2, B, H, 64, Dh]  this frame's K/V, to append to the cache
    VideoDiT.sequence(...)        the uncached training forward over a whole clip
    rollout(model, context, frames, steps=8) -> [B, frames, 1, 32, 32]  eager generation
    step_inputs(model, batch, capacity_frames) -> example inputs of one static-shape step
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "weights.safetensors")
FRAME = 32
PATCH = 4
TOKENS = (FRAME // PATCH) ** 2     # tokens per frame
TRAIN_FRAMES = 8                   # clip length seen in training (context + generated)
CONTEXT_FRAMES = 2                 # ground-truth frames a rollout starts from
CTX_T = 0.05                       # noise level of the frames whose K/V enter the cache
CONFIG = dict(dim=128, depth=6, heads=4, mlp_ratio=4)
MASKED = -1e4                      # additive bias of an invalid slot (exp underflows to 0 in fp32; fp16-safe)


def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cos(t * (math.pi / 2)), torch.sin(t * (math.pi / 2))


def _sincos_2d(side: int, dim: int) -> torch.Tensor:
    def one(pos: torch.Tensor, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.double()[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], 1)
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.cat([one(r.flatten(), dim // 2), one(c.flatten(), dim // 2)], 1).float()


def timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    args = (t * 1000)[..., None] * freqs
    return torch.cat([args.cos(), args.sin()], -1)


def alibi_slopes(heads: int, anchor_heads: int = 0) -> torch.Tensor:
    """1, 1/2, 1/4, ... per head; the last `anchor_heads` heads 0 (no decay with frame distance)."""
    return torch.tensor([2.0 ** -h if h < heads - anchor_heads else 0.0 for h in range(heads)])


def locality_betas(heads: int) -> torch.Tensor:
    """Per head: 1, 1/4, 1/16, ..., and 0 for the last head (global in space)."""
    return torch.tensor([4.0 ** -h for h in range(heads - 1)] + [0.0])


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor, attend) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [B, S, D]; c [B, S, D] (per-token conditioning); attend(q, k, v) -> [B, H, S, Dh].
        Returns h and this block's k, v [B, H, S, Dh]."""
        b, s, d = h.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, -1)
        x = self.norm1(h) * (1 + sc1) + sh1
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = attend(q, k, v).transpose(1, 2).reshape(b, s, d)
        h = h + g1 * self.proj(a)
        h = h + g2 * self.mlp(self.norm2(h) * (1 + sc2) + sh2)
        return h, k, v


class VideoDiT(nn.Module):
    def __init__(self, dim: int = 128, depth: int = 6, heads: int = 4, mlp_ratio: int = 4, stem: int = PATCH,
                 prev_frames: int = 0, anchor_heads: int = 0):
        super().__init__()
        self.dim, self.depth, self.heads, self.head_dim = dim, depth, heads, dim // heads
        if stem < PATCH or (stem - PATCH) % 2:
            raise ValueError(f"stem {stem}: the patch embedding's window must be {PATCH} or larger by an even count")
        if prev_frames < 0:
            raise ValueError(f"prev_frames must be >= 0, got {prev_frames}")
        if not 0 <= anchor_heads < heads:
            raise ValueError(f"anchor_heads must lie in [0, {heads - 1}], got {anchor_heads}")
        self.stem, self.prev_frames, self.anchor_heads = stem, prev_frames, anchor_heads
        ch = 1 + prev_frames   # the frame, then the last `prev_frames` finished frames' pixels (newest first)
        if stem == PATCH:   # plain patchify: each token sees its own 4x4 pixels
            self.patch_embed = nn.Linear(ch * PATCH * PATCH, dim)
        else:               # overlapping: each token sees a stem x stem window centred on its patch
            self.patch_conv = nn.Conv2d(ch, dim, stem, stride=PATCH, padding=(stem - PATCH) // 2)
        if prev_frames:     # x0 = network output + gate * the previous frame (a residual; starts at 0)
            self.prev_gate = nn.Parameter(torch.zeros(1))
        self.register_buffer("pos_embed", _sincos_2d(FRAME // PATCH, dim), persistent=False)
        # the last `anchor_heads` heads have slope 0: no decay with frame distance, so they can read
        # the first (true) frames as easily as the last ones at any rollout length
        self.register_buffer("slopes", alibi_slopes(heads, anchor_heads), persistent=False)
        # a fixed spatial locality bias per head, -beta_h * (patch distance)^2, so "look at
        # the same place in the last frame" is there from the start. Fixed, not learned: a
        # mask that needs a gradient sends CPU SDPA to its slow path (2x the step time here)
        g = FRAME // PATCH
        r, c = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        r, c = r.flatten().float(), c.flatten().float()
        d2 = (r[:, None] - r[None]) ** 2 + (c[:, None] - c[None]) ** 2
        self.register_buffer("spatial_bias", -locality_betas(heads)[:, None, None] * d2[None], persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, PATCH * PATCH)
        for m in (self.ada_out[1], self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    # -- patches ---------------------------------------------------------------------------
    def _tokens(self, x: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 1, 32, 32] (+ prev [B, P, 32, 32]) -> [B, 64, D]"""
        b = x.shape[0]
        g = FRAME // PATCH
        if self.prev_frames:
            if prev is None or prev.shape[1] != self.prev_frames:
                raise ValueError(f"this VideoDiT reads the last {self.prev_frames} frame(s): give prev "
                                 f"[B, {self.prev_frames}, {FRAME}, {FRAME}]")
            x = torch.cat([x, prev.to(x.dtype)], 1)
        if self.stem != PATCH:
            return self.patch_conv(x).flatten(2).transpose(1, 2) + self.pos_embed
        ch = x.shape[1]
        p = x.reshape(b, ch, g, PATCH, g, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, ch * PATCH * PATCH)
        return self.patch_embed(p) + self.pos_embed

    def _frame(self, h: torch.Tensor, c: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 64, D] (+ cond [B, 64, D]) -> [B, 1, 32, 32]"""
        b = h.shape[0]
        g = FRAME // PATCH
        shift, scale = self.ada_out(c).chunk(2, -1)
        p = self.out(self.norm_out(h) * (1 + scale) + shift)
        out = p.reshape(b, g, g, PATCH, PATCH).permute(0, 1, 3, 2, 4).reshape(b, 1, FRAME, FRAME)
        if self.prev_frames:
            out = out + self.prev_gate * prev[:, :1].to(out.dtype)
        return out

    # -- one frame against the cache (the inference step; static shapes) -------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, frame_pos: torch.Tensor, kv_cache: torch.Tensor,
                cache_pos: torch.Tensor, cache_valid: torch.Tensor,
                prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        cap = kv_cache.shape[4]
        if cap % TOKENS:
            raise ValueError(f"the KV cache holds whole frames: capacity {cap} is not a multiple of {TOKENS} tokens")
        h = self._tokens(x, prev)
        c = self.t_embed(timestep_embedding(t))[:, None, :].expand(b, TOKENS, self.dim)
        # ALiBi on the frame distance for cached slots, 0 within the frame; slot s holds patch s % 64.
        # Positions and validity are per slot [C] (every layer and head alike) or per layer, head
        # and slot [L, H, C] (a head-aware cache policy keeps other frames per head)
        per_head = cache_pos.dim() == 3
        dist = (frame_pos.reshape(1) - cache_pos).to(x.dtype)                           # [C] | [L, H, C]
        slopes = self.slopes[:, None] if not per_head else self.slopes[None, :, None]
        cached = -slopes * (dist[None, :] if not per_head else dist)                     # [H, C] | [L, H, C]
        valid = cache_valid[None, :] if not per_head else cache_valid
        cached = torch.where(valid, cached, torch.full_like(cached, MASKED))
        spatial = self.spatial_bias.to(x.dtype)                                          # [H, N, N]
        spatial_c = spatial.repeat(1, 1, cap // TOKENS)                                  # [H, N, C]

        def layer_bias(c: torch.Tensor) -> torch.Tensor:                                 # [H, C] -> [1, H, N, C + N]
            return torch.cat([c[:, None, :] + spatial_c, spatial], 2)[None]
        shared = layer_bias(cached) if not per_head else None
        new_kv = []
        for i, blk in enumerate(self.blocks):
            def attend(q, k, v, i=i):
                kk = torch.cat([kv_cache[i, 0], k], 2)
                vv = torch.cat([kv_cache[i, 1], v], 2)
                bias = shared if shared is not None else layer_bias(cached[i])
                return F.scaled_dot_product_attention(q, kk, vv, attn_mask=bias)
            h, k, v = blk(h, c, attend)
            new_kv.append(torch.stack([k, v]))
        return self._frame(h, c, prev), torch.stack(new_kv)

    # -- a whole clip at once (training; the reference for the cached path) -----------------
    def sequence(self, clean: torch.Tensor, t_clean: torch.Tensor, noisy: torch.Tensor, t_noisy: torch.Tensor,
                 noisy_pos: torch.Tensor) -> torch.Tensor:
        """Denoise several frames of a clip in one pass, each seeing the clean frames before it.

        Args:
            clean: [B, Tc, 1, 32, 32] context frames at positions 0..Tc-1 (noised to t_clean).
            t_clean: [B, Tc] their diffusion times.
            noisy: [B, Tn, 1, 32, 32] frames to denoise, at frame positions noisy_pos [Tn] (int).
            t_noisy: [B, Tn].
        Returns:
            x0 predictions [B, Tn, 1, 32, 32]. Clean frame j attends to clean frames <= j;
            noisy frame i (position p) to clean frames < p and to itself: exactly what
            `forward` computes with the cache holding clean frames 0..p-1.
        """
        b, tc, tn = clean.shape[0], clean.shape[1], noisy.shape[1]
        frames = torch.cat([clean, noisy], 1).flatten(0, 1)                         # [B*(Tc+Tn), 1, 32, 32]
        prev = None
        if self.prev_frames:    # frame at position p reads context frames p-1, ..., p-P (zeros before 0)
            P = self.prev_frames
            padded = torch.cat([torch.zeros_like(clean[:, :1]).expand(b, P, -1, -1, -1), clean], 1)
            at = torch.cat([torch.arange(tc, device=clean.device), noisy_pos.to(clean.device).long()])
            idx = (at[:, None] - torch.arange(1, P + 1, device=clean.device)[None] + P)     # [Tc+Tn, P]
            prev = padded[:, idx.flatten()].reshape(b, tc + tn, P, FRAME, FRAME).flatten(0, 1)
        h = self._tokens(frames, prev).reshape(b, (tc + tn) * TOKENS, self.dim)
        temb = self.t_embed(timestep_embedding(torch.cat([t_clean, t_noisy], 1)))     # [B, Tc+Tn, D]
        c = temb.repeat_interleave(TOKENS, 1)
        pos = torch.cat([torch.arange(tc, device=clean.device), noisy_pos.to(clean.device)]).float()
        is_clean = torch.arange(tc + tn, device=clean.device) < tc
        same = torch.arange(tc + tn, device=clean.device)
        qp, kp = pos[:, None], pos[None, :]
        allowed = (is_clean[None, :] & ((kp < qp) | (is_clean[:, None] & (kp == qp)))) | (same[:, None] == same[None, :])
        dist = (qp - kp)
        bias = -self.slopes[:, None, None] * dist[None]                                # [H, F, F]
        bias = torch.where(allowed[None], bias, torch.full_like(bias, MASKED))
        nf = tc + tn
        bias = (bias.repeat_interleave(TOKENS, 1).repeat_interleave(TOKENS, 2)
                + self.spatial_bias.to(bias.dtype).repeat(1, nf, nf))[None]              # [1, H, S, S]
        for blk in self.blocks:
            h, _, _ = blk(h, c, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
        out = h.reshape(b, tc + tn, TOKENS, self.dim)[:, tc:].flatten(0, 1)
        prev_n = None if prev is None else prev.reshape(b, tc + tn, -1, FRAME, FRAME)[:, tc:].flatten(0, 1)
        return self._frame(out, c.reshape(b, tc + tn, TOKENS, self.dim)[:, tc:].flatten(0, 1), prev_n).reshape(
            b, tn, 1, FRAME, FRAME)

    def empty_cache(self, batch: int, capacity_tokens: int, dtype=torch.float32):
        """(kv_cache, cache_pos, cache_valid) of the given capacity, all slots invalid."""
        return (torch.zeros(self.depth, 2, batch, self.heads, capacity_tokens, self.head_dim, dtype=dtype),
                torch.zeros(capacity_tokens), torch.zeros(capacity_tokens, dtype=torch.bool))


class PrevStep(nn.Module):
    """The step of a VideoDiT that reads its last frames with `prev` among the step's own inputs,
    before the cache (as pared's Streamer passes them):
    step(x, t, frame_pos, prev, kv_cache, cache_pos, cache_valid) -> (x0, new_kv)."""

    def __init__(self, model: VideoDiT):
        super().__init__()
        self.model = model

    def forward(self, x, t, frame_pos, prev, kv_cache, cache_pos, cache_valid):
        return self.model(x, t, frame_pos, kv_cache, cache_pos, cache_valid, prev)


def weights_meta(weights: str = WEIGHTS) -> dict:
    """The metadata of a weights file (the training run, its stem and prev_frames)."""
    from pared.workloads.training import read_meta
    return read_meta(weights)


def config_of(meta: dict) -> dict:
    """The architecture a weights file's metadata names: CONFIG, with the depth of a grown model."""
    return dict(CONFIG, depth=int(meta.get("depth", CONFIG["depth"])))


def grow_depth(state: dict, depth: int, new_depth: int) -> dict:
    """Weights of a `depth`-block model as those of a `new_depth`-block one that computes exactly the
    same: the new blocks, spread evenly among the old ones, are freshly initialized with their
    adaLN-Zero modulation at zero, so each adds nothing to the residual stream until trained (the
    old blocks keep their order; a start for training a deeper model)."""
    if new_depth < depth:
        raise ValueError(f"--depth can only add blocks to the --init weights' {depth}, got {new_depth}")
    if new_depth == depth:
        return state
    # old block i goes to slot round(i * new_depth / depth): the new ones fill the gaps evenly
    where = {i: round(i * new_depth / depth) for i in range(depth)}
    fresh = VideoDiT(**dict(CONFIG, depth=new_depth)).state_dict()
    out = {k: v for k, v in state.items() if not k.startswith("blocks.")}
    taken = set(where.values())
    for k, v in fresh.items():
        if k.startswith("blocks.") and int(k.split(".")[1]) not in taken:
            out[k] = v
    for k, v in state.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            out[f"blocks.{where[int(i)]}.{rest}"] = v
    return out


def build_model(weights: str | None = WEIGHTS) -> VideoDiT:
    """VideoDiT with `weights` (None: random), its stem and previous-frame inputs as the weights'
    metadata says."""
    if weights is None:
        return VideoDiT(**CONFIG).eval()
    from safetensors.torch import load_file
    if not os.path.exists(weights):
        raise FileNotFoundError(f"{weights} is missing: train it with `python {HERE}/train.py`")
    meta = weights_meta(weights)
    m = VideoDiT(**config_of(meta), stem=int(meta.get("stem", PATCH)), prev_frames=int(meta.get("prev_frames", 0)),
                 anchor_heads=int(meta.get("anchor_heads", 0)))
    m.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
    return m.eval()


def widen_stem(state: dict, stem: int) -> dict:
    """Weights of a plain-patchify model (`patch_embed`) as those of an overlapping `stem`:
    the window's centre 4x4 taps are the old weights and the rest zero, so the widened
    model computes exactly what the old one did (a start for training the stem)."""
    if "patch_embed.weight" not in state or stem == PATCH:
        return state
    out = {k: v for k, v in state.items() if not k.startswith("patch_embed.")}
    w = state["patch_embed.weight"]                                                  # [D, 16] (row, col)
    conv = torch.zeros(w.shape[0], 1, stem, stem, dtype=w.dtype)
    o = (stem - PATCH) // 2
    conv[:, 0, o:o + PATCH, o:o + PATCH] = w.reshape(-1, PATCH, PATCH)
    out["patch_conv.weight"], out["patch_conv.bias"] = conv, state["patch_embed.bias"].clone()
    return out


def widen_prev(state: dict, prev_frames: int) -> dict:
    """Weights of a model without previous-frame inputs as those of one reading the last
    `prev_frames` frames: the embedding's new input channels and the residual gate start at
    zero, so the widened model computes exactly what the old one did."""
    if not prev_frames:
        return state
    out = dict(state)
    if "patch_conv.weight" in state:
        w = state["patch_conv.weight"]                                               # [D, ch, s, s]
        if w.shape[1] == 1:
            out["patch_conv.weight"] = torch.cat([w, w.new_zeros(w.shape[0], prev_frames, *w.shape[2:])], 1)
    else:
        w = state["patch_embed.weight"]                                              # [D, ch * 16]
        if w.shape[1] == PATCH * PATCH:
            out["patch_embed.weight"] = torch.cat([w, w.new_zeros(w.shape[0], prev_frames * PATCH * PATCH)], 1)
    out.setdefault("prev_gate", torch.zeros(1))
    return out


def previous(frames: list, f: int, count: int, like: torch.Tensor) -> torch.Tensor | None:
    """[B, count, 32, 32]: frames f-1, ..., f-count of `frames` (a list of [B, 1, 32, 32]),
    zeros before frame 0; None when count is 0."""
    if not count:
        return None
    return torch.cat([frames[f - k] if f - k >= 0 else torch.zeros_like(like) for k in range(1, count + 1)], 1)


def step_inputs(model: VideoDiT, batch: int = 1, capacity_frames: int = TRAIN_FRAMES) -> tuple:
    """Example inputs of one static-shape step: frame `capacity_frames // 2` with the
    frames before it in a cache of `capacity_frames` frames (the rest invalid)."""
    g = torch.Generator().manual_seed(0)
    cap = capacity_frames * TOKENS
    kv, pos, valid = model.empty_cache(batch, cap)
    f = capacity_frames // 2
    kv.normal_(generator=g)
    pos[:f * TOKENS] = torch.arange(f).repeat_interleave(TOKENS).float()
    valid[:f * TOKENS] = True
    x = torch.randn(batch, 1, FRAME, FRAME, generator=g)
    return x, torch.full((batch,), 0.5), torch.tensor([float(f)]), kv, pos, valid


@torch.no_grad()
def rollout(model: VideoDiT, context: torch.Tensor, frames: int, *, steps: int = 8, seed: int = 0,
            window: int | None = None, ctx_t: float = CTX_T, on_frame=None) -> torch.Tensor:
    """Generate a clip frame after frame, DDIM (eta = 0, `steps` steps from t = 1) per frame.

    Args:
        context: [B, K, 1, 32, 32] ground-truth first frames in [-1, 1]; they enter the
            cache (noised to ctx_t, as in training) and are returned as they are.
        frames: total length of the returned clip (K context frames + generated ones).
        window: keep only the K/V of the last `window` frames (a FIFO); None keeps all.
        ctx_t: the noise level at which a finished frame is re-encoded into the cache.
        on_frame: called as on_frame(index, frame) after each generated frame.
    Returns:
        [B, frames, 1, 32, 32] in [-1, 1] (clamped).
    """
    g = torch.Generator().manual_seed(seed)
    b, k = context.shape[:2]
    dev = context.device
    kv = torch.zeros(model.depth, 2, b, model.heads, 0, model.head_dim)
    cpos = torch.zeros(0)
    out = [context[:, i] for i in range(k)]
    a_c, s_c = alpha_sigma(torch.tensor(ctx_t))

    P = getattr(model, "prev_frames", 0)

    def append(frame: torch.Tensor, f: int):
        nonlocal kv, cpos
        xc = a_c * frame + s_c * torch.randn(frame.shape, generator=g).to(dev)
        _, new = model(xc, torch.full((b,), ctx_t), torch.tensor([float(f)]), kv, cpos,
                       torch.ones(cpos.shape[0], dtype=torch.bool), previous(out, f, P, frame))
        kv = torch.cat([kv, new], 4)
        cpos = torch.cat([cpos, torch.full((TOKENS,), float(f))])
        if window is not None and cpos.shape[0] > window * TOKENS:
            kv, cpos = kv[..., -window * TOKENS:, :].contiguous(), cpos[-window * TOKENS:]

    for f in range(k):
        append(context[:, f], f)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for f in range(k, frames):
        x = torch.randn(b, 1, FRAME, FRAME, generator=g).to(dev)
        valid = torch.ones(cpos.shape[0], dtype=torch.bool)
        for i in range(steps):
            t, s = ts[i], ts[i + 1]
            x0, _ = model(x, t.expand(b), torch.tensor([float(f)]), kv, cpos, valid, previous(out, f, P, x))
            x0 = x0.clamp(-1, 1)
            a_t, s_t = alpha_sigma(t)
            a_s, s_s = alpha_sigma(s)
            eps = (x - a_t * x0) / s_t
            x = a_s * x0 + s_s * eps
        out.append(x)
        if on_frame is not None:
            on_frame(f, x)
        append(x, f)
    return torch.stack(out, 1)
