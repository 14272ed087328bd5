"""A small vision-language-action (VLA) policy, pure torch.

Shape of the published diffusion VLAs (CogACT, pi0-style action experts):

    image (64x64) --ViT (patch 8, 64 tokens)--> 2x2 pool -> 16 visual tokens --+
    instruction --word tokenizer--> 12 ids --embedding--> 12 text tokens ------+--> transformer
    state (39-D, normalized) --linear--> 1 state token ------------------------+    backbone (6 layers)
    learned readout token -----------------------------------------------------+         |
                                                                                readout output = cond (d)
    noisy action chunk (H=8 x 4) + timestep t + cond --DiT head (adaLN-Zero)--> predicted noise

``VLABackbone.forward(image, text_ids, state) -> cond`` and
``DiffusionActionHead.forward(noisy_actions, t, cond) -> eps`` are separate
modules so each can be exported with torch.export and the head called once per
DDIM step.  Neither has data-dependent Python control flow or in-place buffer
updates; the text padding mask is an additive attention bias computed with
tensor ops.

The ViT's 64 patch tokens are 2x2 average-pooled to 16 before the backbone:
the backbone then runs over 30 tokens instead of 78, which makes CPU training
about 2.5x faster; the 64-token ViT still sees the image at full patch
resolution.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------
# Tokenizer: word level, fixed vocabulary kept here (no hub tokenizer).
# --------------------------------------------------------------------------
VOCAB = ["<pad>", "<unk>"] + sorted(set("""
reach to the goal position push puck pick up and place it at open door close
drawer press button from top move put object slide pull turn window lever
handle left right red blue green a of on into in
""".split()))
_WORD_TO_ID = {w: i for i, w in enumerate(VOCAB)}
PAD_ID, UNK_ID = 0, 1


def tokenize(text: str, length: int) -> np.ndarray:
    """Lower-case words -> ids, padded with PAD_ID / truncated to ``length``."""
    words = re.findall(r"[a-z]+", text.lower())
    ids = [_WORD_TO_ID.get(w, UNK_ID) for w in words][:length]
    return np.array(ids + [PAD_ID] * (length - len(ids)), dtype=np.int64)


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------
@dataclass
class VLAConfig:
    image_size: int = 64
    patch: int = 8
    vit_layers: int = 2
    pool: int = 2              # visual tokens are pool x pool averaged before the backbone
    text_len: int = 12
    vocab_size: int = len(VOCAB)
    state_dim: int = 39
    d_model: int = 128
    n_heads: int = 4
    backbone_heads: int = 0    # heads of the ViT and backbone blocks (0: n_heads; the head keeps n_heads)
    backbone_layers: int = 6
    mlp_ratio: int = 4
    # action head
    action_dim: int = 4
    horizon: int = 8
    head_layers: int = 3
    d_head: int = 128
    train_timesteps: int = 100
    ddim_steps: int = 10

    @property
    def encoder_heads(self) -> int:
        """Heads of the ViT and backbone blocks."""
        return self.backbone_heads or self.n_heads


# --------------------------------------------------------------------------
# Transformer pieces (explicit matmul/softmax attention: plain ATen ops)
# --------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.h = n_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                       # (B, h, N, dh)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D // self.h))
        if bias is not None:
            att = att + bias                                   # (B, 1, 1, N) key mask
        att = att.softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, N, D)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, d: int, ratio: int):
        super().__init__()
        self.fc1 = nn.Linear(d, ratio * d)
        self.fc2 = nn.Linear(ratio * d, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, d: int, n_heads: int, mlp_ratio: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, n_heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d, mlp_ratio)

    def forward(self, x, bias=None):
        x = x + self.attn(self.ln1(x), bias)
        return x + self.mlp(self.ln2(x))


# --------------------------------------------------------------------------
# Vision encoder + backbone
# --------------------------------------------------------------------------
class ViTEncoder(nn.Module):
    def __init__(self, cfg: VLAConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch                # 8
        self.patch_embed = nn.Conv2d(3, d, cfg.patch, stride=cfg.patch)
        self.pos = nn.Parameter(torch.randn(1, self.grid * self.grid, d) * 0.02)
        self.blocks = nn.ModuleList([Block(d, cfg.encoder_heads, cfg.mlp_ratio)
                                     for _ in range(cfg.vit_layers)])
        self.ln = nn.LayerNorm(d)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: (B, 3, 64, 64) float in [0, 1] -> (B, (grid/pool)^2, d)."""
        x = self.patch_embed(image * 2.0 - 1.0)                # (B, d, 8, 8)
        B, D = x.shape[0], x.shape[1]
        x = x.flatten(2).transpose(1, 2) + self.pos            # (B, 64, d)
        for blk in self.blocks:
            x = blk(x)
        x = self.ln(x)
        # 2x2 average pooling over the patch grid -> 16 tokens
        g, p = self.grid, self.cfg.pool
        x = x.transpose(1, 2).reshape(B, D, g, g)
        x = F.avg_pool2d(x, p)
        return x.flatten(2).transpose(1, 2)


class VLABackbone(nn.Module):
    """backbone(image, text_ids, state) -> cond (B, d_model)."""

    def __init__(self, cfg: VLAConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.vit = ViTEncoder(cfg)
        self.text_emb = nn.Embedding(cfg.vocab_size, d)
        self.state_proj = nn.Sequential(nn.Linear(cfg.state_dim, d), nn.GELU(approximate="tanh"),
                                        nn.Linear(d, d))
        self.readout = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        n_vis = (cfg.image_size // cfg.patch // cfg.pool) ** 2
        n_tok = cfg.text_len + n_vis + 2
        # learned position + modality embedding for the whole sequence
        self.pos = nn.Parameter(torch.randn(1, n_tok, d) * 0.02)
        self.blocks = nn.ModuleList([Block(d, cfg.encoder_heads, cfg.mlp_ratio)
                                     for _ in range(cfg.backbone_layers)])
        self.ln = nn.LayerNorm(d)

    def forward(self, image: torch.Tensor, text_ids: torch.Tensor,
                state: torch.Tensor) -> torch.Tensor:
        """image (B,3,64,64) float [0,1]; text_ids (B,L) int64; state (B,39) normalized."""
        B = image.shape[0]
        vis = self.vit(image)
        txt = self.text_emb(text_ids)
        st = self.state_proj(state).unsqueeze(1)
        ro = self.readout.expand(B, -1, -1)
        x = torch.cat([txt, vis, st, ro], dim=1) + self.pos
        # Key mask: padded text positions get -1e9, every other key 0.
        pad = (text_ids == PAD_ID).to(x.dtype) * -1e9
        rest = torch.zeros(B, x.shape[1] - text_ids.shape[1], dtype=x.dtype, device=x.device)
        bias = torch.cat([pad, rest], dim=1)[:, None, None, :]
        for blk in self.blocks:
            x = blk(x, bias)
        return self.ln(x[:, -1])                               # readout token


# --------------------------------------------------------------------------
# Diffusion action head: a small DiT with adaLN-Zero
# --------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (B,) float timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32,
                                                        device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, mlp_ratio: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, n_heads)
        self.ln2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(d, mlp_ratio)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        nn.init.zeros_(self.ada[1].weight)                     # adaLN-Zero: block starts as identity
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.ln1(x), s1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.ln2(x), s2, sc2))


class DiffusionActionHead(nn.Module):
    """head(noisy_actions (B,H,A), t (B,) float, cond (B,d_model)) -> eps (B,H,A)."""

    def __init__(self, cfg: VLAConfig):
        super().__init__()
        d = cfg.d_head
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.action_dim, d)
        self.pos = nn.Parameter(torch.randn(1, cfg.horizon, d) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.c_proj = nn.Linear(cfg.d_model, d)
        self.blocks = nn.ModuleList([DiTBlock(d, cfg.n_heads, cfg.mlp_ratio)
                                     for _ in range(cfg.head_layers)])
        self.ln_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.out = nn.Linear(d, cfg.action_dim)
        nn.init.zeros_(self.ada_out[1].weight)
        nn.init.zeros_(self.ada_out[1].bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, noisy_actions: torch.Tensor, t: torch.Tensor,
                cond: torch.Tensor) -> torch.Tensor:
        x = self.in_proj(noisy_actions) + self.pos
        c = self.t_mlp(timestep_embedding(t, self.cfg.d_head)) + self.c_proj(cond)
        for blk in self.blocks:
            x = blk(x, c)
        shift, scale = self.ada_out(c).chunk(2, dim=-1)
        return self.out(modulate(self.ln_out(x), shift, scale))


# --------------------------------------------------------------------------
# Noise schedule and DDIM sampler
# --------------------------------------------------------------------------
def cosine_alphas_cumprod(T: int, s: float = 0.008) -> torch.Tensor:
    """Improved-DDPM cosine schedule, betas capped at 0.999."""
    steps = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos(((steps / T) + s) / (1 + s) * math.pi / 2) ** 2
    betas = torch.clamp(1 - f[1:] / f[:-1], max=0.999)
    return torch.cumprod(1 - betas, 0).float()


def ddim_timesteps(T: int, K: int) -> list[int]:
    """K evenly spaced training timesteps from T-1 down to 0 (99, 88, ..., 11, 0)."""
    return [int(round(x)) for x in np.linspace(T - 1, 0, K)]


class VLAPolicy(nn.Module):
    """Backbone + diffusion head + schedule; sampling lives outside forward."""

    def __init__(self, cfg: VLAConfig | None = None):
        super().__init__()
        self.cfg = cfg or VLAConfig()
        self.backbone = VLABackbone(self.cfg)
        self.head = DiffusionActionHead(self.cfg)
        self.register_buffer("alphas_cumprod",
                             cosine_alphas_cumprod(self.cfg.train_timesteps), persistent=False)

    def loss(self, image, text_ids, state, actions, n_noise: int = 1,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """DDPM epsilon loss.  ``actions`` (B,H,A) in [-1,1].  The backbone is run
        once and the head on ``n_noise`` independent (t, noise) draws per sample."""
        cond = self.backbone(image, text_ids, state)
        B = actions.shape[0]
        cond = cond.repeat(n_noise, 1)
        x0 = actions.repeat(n_noise, 1, 1)
        t = torch.randint(0, self.cfg.train_timesteps, (B * n_noise,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = self.alphas_cumprod[t][:, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        eps = self.head(xt, t.float(), cond)
        return F.mse_loss(eps, noise)

    @torch.no_grad()
    def sample(self, image, text_ids, state, noise: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM (eta=0) over ``cfg.ddim_steps`` steps from ``noise``
        (B,H,A); returns the action chunk clipped to [-1, 1]."""
        cond = self.backbone(image, text_ids, state)
        return ddim_sample(self.head, cond, noise, self.alphas_cumprod, self.cfg)


@torch.no_grad()
def ddim_sample(head, cond, noise, alphas_cumprod, cfg: VLAConfig) -> torch.Tensor:
    ts = ddim_timesteps(cfg.train_timesteps, cfg.ddim_steps)
    x = noise
    B = x.shape[0]
    for i, t in enumerate(ts):
        a_t = alphas_cumprod[t]
        a_prev = alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        eps = head(x, torch.full((B,), float(t)), cond)
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()       # re-derive eps after clipping
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x.clamp(-1, 1)


# --------------------------------------------------------------------------
# Autoregressive action-token head (OpenVLA style)
# --------------------------------------------------------------------------
@dataclass
class TokenHeadConfig:
    d_model: int = 128          # the backbone's cond width
    d: int = 128
    n_heads: int = 4
    layers: int = 4
    mlp_ratio: int = 4
    bins: int = 256             # each action dimension -> one of 256 uniform bins over [-1, 1]
    horizon: int = 4            # actions decoded per policy call (= actions executed)
    action_dim: int = 4

    @property
    def n_tokens(self) -> int:
        return self.horizon * self.action_dim


def actions_to_tokens(actions: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """(B,H,A) actions in [-1,1] -> (B,H*A) int64 bin ids, time-major
    (action 0's four dimensions first)."""
    a = actions.clamp(-1, 1).reshape(actions.shape[0], -1)
    return torch.round((a + 1) / 2 * (bins - 1)).long()


def tokens_to_actions(tokens, bins: int = 256, action_dim: int = 4):
    """Inverse of actions_to_tokens: bin ids -> bin centres, (B,H,A).
    Works on torch tensors and numpy arrays."""
    a = tokens * (2.0 / (bins - 1)) - 1.0
    return a.reshape(a.shape[0], -1, action_dim)


class Detokenize(nn.Module):
    """tokens (B, H*A) -> actions (B, H, A): tokens_to_actions as a module (the last part of
    a pared Decoder over the backbone and the token head)."""

    def __init__(self, bins: int = 256, action_dim: int = 4):
        super().__init__()
        self.bins, self.action_dim = bins, action_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens_to_actions(tokens.to(torch.float32), self.bins, self.action_dim)


class TokenActionHead(nn.Module):
    """head(tokens (B,N) int64, cond (B,d_model)) -> logits (B,N,bins).

    A causal transformer over [cond; tok_0 .. tok_{N-2}]: the logits at
    position j predict action token j from cond and tokens < j, so one graph
    serves every decoding step (positions >= j of ``tokens`` are ignored by the
    causal mask; fill them with anything).  Greedy decoding calls it N times.
    """

    def __init__(self, cfg: TokenHeadConfig | None = None):
        super().__init__()
        cfg = cfg or TokenHeadConfig()
        self.cfg = cfg
        d, n = cfg.d, cfg.n_tokens
        self.c_proj = nn.Sequential(nn.Linear(cfg.d_model, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.tok_emb = nn.Embedding(cfg.bins, d)
        # which action dimension a position holds matters more than where it is: both embeddings
        self.pos = nn.Parameter(torch.randn(1, n, d) * 0.02)
        self.blocks = nn.ModuleList([Block(d, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.layers)])
        self.ln = nn.LayerNorm(d)
        self.out = nn.Linear(d, cfg.bins)
        causal = torch.full((n, n), -1e9).triu(1)[None, None]
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        prev = self.tok_emb(tokens[:, :-1])
        x = torch.cat([self.c_proj(cond).unsqueeze(1), prev], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x, self.causal)
        return self.out(self.ln(x))

    def loss(self, cond: torch.Tensor, actions: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        """Cross-entropy of the expert's tokens (teacher forcing); actions (B,>=H,A)."""
        tok = actions_to_tokens(actions[:, :self.cfg.horizon], self.cfg.bins)
        logits = self(tok, cond)
        return F.cross_entropy(logits.reshape(-1, self.cfg.bins), tok.reshape(-1), label_smoothing=smoothing)


@torch.no_grad()
def greedy_decode(head, cond, cfg: TokenHeadConfig):
    """Greedy autoregressive decoding of N tokens with ``head(tokens, cond)``
    (a TokenActionHead or any callable with its signature); returns (actions
    (B,H,A), tokens (B,N))."""
    B = cond.shape[0]
    tokens = torch.zeros(B, cfg.n_tokens, dtype=torch.long)
    for j in range(cfg.n_tokens):
        logits = head(tokens, cond)
        tokens[:, j] = logits[:, j].argmax(-1)
    return tokens_to_actions(tokens, cfg.bins, cfg.action_dim), tokens


def save_token_head(path: str, head: TokenActionHead, backbone_file: str, backbone_sha256: str,
                    extra: dict | None = None):
    """The token head alone; it runs on the backbone of ``backbone_file``
    (recorded with its sha256 so a mismatched pair is refused at load)."""
    import json
    _write_safetensors(path, head, {"config": json.dumps(asdict(head.cfg)), "backbone_file": backbone_file,
                                    "backbone_sha256": backbone_sha256}, extra)


def file_sha256(path: str) -> str:
    import hashlib
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_token_head(path: str, check_backbone: str | None = None) -> tuple[TokenActionHead, dict]:
    """Load a token head; with ``check_backbone`` (a diffusion-policy weights
    file) refuse it unless it is the backbone the head was trained on."""
    import json
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    if check_backbone is not None and file_sha256(check_backbone) != meta["backbone_sha256"]:
        raise ValueError(f"{path} was trained on the backbone of {meta['backbone_file']} "
                         f"(sha256 {meta['backbone_sha256'][:12]}...), not on {check_backbone}")
    head = TokenActionHead(TokenHeadConfig(**json.loads(meta["config"])))
    head.load_state_dict(load_file(path))
    return head.eval(), meta


# --------------------------------------------------------------------------
# One policy call as one module (what pared captures and exports)
# --------------------------------------------------------------------------
class DiffusionPolicyCall(nn.Module):
    """call(image, text_ids, state, noise) -> action chunk (B,H,A): the backbone
    and the K deterministic DDIM steps of the diffusion head, unrolled (the
    timesteps and alphas are constants), so one policy call is one graph.
    Computes what ``VLAPolicy.sample`` computes."""

    def __init__(self, policy: VLAPolicy):
        super().__init__()
        self.cfg = policy.cfg
        self.backbone, self.head = policy.backbone, policy.head
        ac = policy.alphas_cumprod
        self.ts = ddim_timesteps(self.cfg.train_timesteps, self.cfg.ddim_steps)
        self.alphas = [float(ac[t]) for t in self.ts] + [1.0]

    def forward(self, image, text_ids, state, noise):
        cond = self.backbone(image, text_ids, state)
        x = noise
        for i, t in enumerate(self.ts):
            a_t, a_prev = self.alphas[i], self.alphas[i + 1]
            eps = self.head(x, torch.full_like(x[:, 0, 0], float(t)), cond)
            x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        return x.clamp(-1, 1)


class DDIMUpdate(nn.Module):
    """One deterministic DDIM step of ``DiffusionPolicyCall`` as a module:
    (x, eps, sqrt(a_t), sqrt(1-a_t), sqrt(a_prev), sqrt(1-a_prev)) -> next x, the
    coefficients as float32 tensors of shape (1,) (a pared Denoiser's step values)."""

    def forward(self, x, eps, sa, s1a, sap, s1ap):
        x0 = ((x - s1a * eps) / sa).clamp(-1, 1)
        eps = (x - sa * x0) / s1a
        return sap * x0 + s1ap * eps


class Clamp(nn.Module):
    def forward(self, x):
        return x.clamp(-1, 1)


def diffusion_denoiser(policy: VLAPolicy):
    """The policy call as a `pared.ir.denoise.Denoiser` (backbone; head + DDIMUpdate per
    DDIM step; clamp): the same actions as ``DiffusionPolicyCall``, with the K steps a
    loop of the pared Plan instead of unrolled in one graph."""
    from pared.ir.denoise import Denoiser
    return Denoiser(policy.backbone, policy.head, DDIMUpdate(), ddim_schedule(policy), head_values=("t",),
                    finish=Clamp())


def ddim_schedule(policy: VLAPolicy, steps: int | None = None) -> dict[str, list[float]]:
    """DDIMUpdate's per-step values (timestep, sqrt(a_t), sqrt(1-a_t), sqrt(a_prev), sqrt(1-a_prev))
    over the policy's `ddim_steps` (what DiffusionPolicyCall runs), or `steps` evenly spaced steps."""
    k = policy.cfg.ddim_steps if steps is None else steps
    ac = policy.alphas_cumprod
    ts = ddim_timesteps(policy.cfg.train_timesteps, k)
    a = [float(ac[t]) for t in ts] + [1.0]
    return {"t": [float(t) for t in ts], "sa": [math.sqrt(a[i]) for i in range(k)],
            "s1a": [math.sqrt(1 - a[i]) for i in range(k)], "sap": [math.sqrt(a[i + 1]) for i in range(k)],
            "s1ap": [math.sqrt(1 - a[i + 1]) for i in range(k)]}


class PassCond(nn.Module):
    """cond -> a copy of cond: the encoder of a sampler that reads another head's condition."""

    def forward(self, cond):
        return cond.clone()


class ActionTokens(nn.Module):
    """A sampled action chunk (B, H', A) -> the first `horizon` actions' bins (B, horizon*A) int64,
    as the token head reads them (actions_to_tokens)."""

    def __init__(self, horizon: int, bins: int = 256):
        super().__init__()
        self.horizon, self.bins = horizon, bins

    def forward(self, x):
        return actions_to_tokens(x[:, :self.horizon], self.bins)


def diffusion_drafter(policy: VLAPolicy, token_cfg: "TokenHeadConfig", seed: int = 0, steps: int | None = None):
    """The diffusion head as the token head's drafter (speculative_decode's `denoiser` drafter):
    (a pared Denoiser from the backbone's cond to the binned first actions of its DDIM sample,
    the fixed initial noise of one row). Both heads read the same backbone's cond, so the drafter
    adds only the head's DDIM steps to a policy call: the policy's 10, or `steps` (a coarser DDIM
    schedule of the same head: a cheaper, rougher draft)."""
    from pared.ir.denoise import Denoiser
    sampler = Denoiser(PassCond(), policy.head, DDIMUpdate(), ddim_schedule(policy, steps), head_values=("t",),
                       finish=ActionTokens(token_cfg.horizon, token_cfg.bins))
    noise = torch.randn(1, policy.cfg.horizon, policy.cfg.action_dim, generator=torch.Generator().manual_seed(seed))
    return sampler, noise


class TokenPolicyCall(nn.Module):
    """call(image, text_ids, state) -> actions (B,H,A): the backbone and greedy
    decoding of the H*A action tokens, unrolled (each step writes its token
    with tensor ops, no in-place update), so one policy call is one graph."""

    def __init__(self, backbone: VLABackbone, head: TokenActionHead):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.cfg = head.cfg

    def forward(self, image, text_ids, state):
        cond = self.backbone(image, text_ids, state)
        n = self.cfg.n_tokens
        tokens = torch.zeros_like(text_ids[:, :1]).expand(-1, n)
        slots = torch.arange(n, device=cond.device)
        for j in range(n):
            nxt = self.head(tokens, cond)[:, j].argmax(-1, keepdim=True)
            tokens = torch.where(slots == j, nxt, tokens)
        return tokens_to_actions(tokens.to(cond.dtype), self.cfg.bins, self.cfg.action_dim)


# --------------------------------------------------------------------------
# safetensors I/O (no pickle): config and normalization stats in the metadata
# --------------------------------------------------------------------------
def _write_safetensors(path: str, module: nn.Module, meta: dict, extra: dict | None = None,
                       dtype: torch.dtype | None = None):
    """The module's weights with string metadata (``extra`` values JSON-encoded),
    written atomically: never a half-written file. `dtype` (e.g. float16, for a
    file under the repository's size limit) stores the floating tensors so; the
    loaders return float32 modules, whose weights are then exactly the stored ones."""
    import json
    import os
    from safetensors.torch import save_file
    meta = dict(meta, **{k: json.dumps(v) for k, v in (extra or {}).items()})
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
          for k, v in module.state_dict().items()}
    tmp = path + ".tmp"
    save_file(sd, tmp, metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def save_policy(path: str, policy: VLAPolicy, stats: dict, extra: dict | None = None,
                dtype: torch.dtype | None = None):
    import json
    _write_safetensors(path, policy, {"config": json.dumps(asdict(policy.cfg)),
                                      "stats": json.dumps({k: np.asarray(v).tolist() for k, v in stats.items()}),
                                      "vocab": json.dumps(VOCAB)}, extra, dtype)


def load_policy(path: str) -> tuple[VLAPolicy, dict, dict]:
    import json
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    cfg = VLAConfig(**json.loads(meta["config"]))
    policy = VLAPolicy(cfg)
    policy.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()})
    stats = {k: np.array(v, dtype=np.float32) for k, v in json.loads(meta["stats"]).items()}
    return policy, stats, meta


def save_head_npz(path: str, policy: VLAPolicy, backbone_file: str, backbone_sha256: str,
                  extra: dict | None = None):
    """The diffusion head alone, float32, in a compressed .npz (no pickle: arrays and JSON strings),
    with its config and the sha256 of the policy file whose backbone it was trained on. A head
    trained on a frozen backbone ships without a copy of it (load_head_npz takes it from there)."""
    import json
    arrays = {f"head.{k}": v.detach().cpu().numpy() for k, v in policy.head.state_dict().items()}
    meta = {"config": asdict(policy.cfg), "backbone_file": backbone_file, "backbone_sha256": backbone_sha256,
            **(extra or {})}
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, __meta__=np.array(json.dumps(meta)), **arrays)
    import os
    os.replace(tmp, path)


def load_head_npz(path: str, backbone_path: str) -> tuple[VLAPolicy, dict, dict]:
    """(policy, stats, meta): the backbone (and normalization stats) of `backbone_path` with the
    head of `path` (save_head_npz). Refuses a backbone file other than the one the head was trained on."""
    import json
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["__meta__"]))
        head = {k[5:]: torch.from_numpy(z[k]) for k in z.files if k.startswith("head.")}
    if file_sha256(backbone_path) != meta["backbone_sha256"]:
        raise ValueError(f"{path}: this head was trained on the backbone of {meta['backbone_file']} "
                         f"(sha256 {meta['backbone_sha256'][:12]}...), not {backbone_path}")
    base, stats, _ = load_policy(backbone_path)
    policy = VLAPolicy(VLAConfig(**meta["config"]))
    policy.backbone.load_state_dict(base.backbone.state_dict())
    policy.head.load_state_dict(head)
    return policy, stats, meta


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


if __name__ == "__main__":
    # Self-check: shapes, parameter counts, and torch.export of both modules.
    torch.manual_seed(0)
    p = VLAPolicy().eval()
    cfg = p.cfg
    img = torch.rand(2, 3, 64, 64)
    ids = torch.from_numpy(np.stack([tokenize("open the door", cfg.text_len)] * 2))
    st = torch.randn(2, cfg.state_dim)
    cond = p.backbone(img, ids, st)
    eps = p.head(torch.randn(2, cfg.horizon, cfg.action_dim), torch.tensor([5.0, 50.0]), cond)
    print("cond", tuple(cond.shape), "eps", tuple(eps.shape))
    print("params: backbone", count_params(p.backbone), "head", count_params(p.head),
          "total", count_params(p))
    ep_b = torch.export.export(p.backbone, (img, ids, st))
    ep_h = torch.export.export(p.head, (torch.randn(2, cfg.horizon, cfg.action_dim),
                                        torch.tensor([5.0, 50.0]), cond))
    print("torch.export ok:", len(ep_b.graph.nodes), "and", len(ep_h.graph.nodes), "nodes")
    print(ddim_timesteps(cfg.train_timesteps, cfg.ddim_steps))
