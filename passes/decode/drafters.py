"""The graphs speculative decoding adds: drafters and the acceptance step (torch modules that
speculative_decode captures into the Program; each is plain tensor code that lowers to ONNX
and TVM).

Drafters propose all N tokens of a call at once:
  `Retrieval`   the tokens stored with the nearest key in a table (HeiSD's retrieval drafting):
                float keys by standardized L2, integer keys (an instruction's ids) must match.
  `KalmanDraft` / `KalmanUpdate` / `KalmanStart`
                per-dimension constant-velocity Kalman filters over the actions decoded at
                earlier calls of the request (KERV): the draft is the filters' prediction of
                the next H actions, in bins; after a call the filters take its H actions in.
`Accept` verifies a draft against the head's logits at every position (one head call) and
keeps the longest acceptable prefix plus the head's own token where it first disagrees.
"""
from __future__ import annotations

import torch
from torch import nn

#: a mismatched integer key adds this to the squared distance: never nearer than a matching one
_MISMATCH = 1e30


class Retrieval(nn.Module):
    """forward(*keys) -> draft tokens (B, N) int64: the stored tokens of the nearest row (and,
    `with_distance`, the largest over the batch of the nearest row's distance, shape (1,)).

    Args:
        float_keys: per float key input, its table (M, D) (inputs flattened from dim 1).
        int_keys: per integer key input, its table (M, D); a row whose ids differ is never chosen
            while one that matches exists.
        tokens: (M, N) int64, the tokens stored with each row.
        order: for each forward argument, ("f", i) or ("i", i): which table it is matched against.
    """

    def __init__(self, float_keys: list[torch.Tensor], int_keys: list[torch.Tensor], tokens: torch.Tensor,
                 order: list[tuple[str, int]], with_distance: bool = False):
        super().__init__()
        self.order, self.with_distance = list(order), with_distance
        for i, k in enumerate(float_keys):
            k = k.reshape(k.shape[0], -1).to(torch.float32)
            std = k.std(0).clamp_min(1e-6) if k.shape[0] > 1 else torch.ones(k.shape[1])
            # standardized: each feature weighs the same whatever its scale
            self.register_buffer(f"f{i}", (k / std).contiguous())
            self.register_buffer(f"f{i}_inv_std", (1.0 / std).contiguous())
        for i, k in enumerate(int_keys):
            self.register_buffer(f"i{i}", k.reshape(k.shape[0], -1).to(torch.int64).contiguous())
        self.register_buffer("tokens", tokens.to(torch.int64).contiguous())

    def distances(self, *keys: torch.Tensor) -> torch.Tensor:
        """(B, M): the standardized squared distance of each query to each row (+1e30 where an
        integer key differs)."""
        dist = None
        for (kind, i), x in zip(self.order, keys):
            table = getattr(self, f"{kind}{i}")
            x = x.reshape(x.shape[0], -1)
            if kind == "f":
                q = x.to(torch.float32) * getattr(self, f"f{i}_inv_std")
                # |q - k|^2 = |q|^2 - 2 q.k + |k|^2, as one matmul
                d = (q * q).sum(-1, keepdim=True) - 2.0 * q @ table.t() + (table * table).sum(-1)[None]
            else:
                d = (x[:, None, :] != table[None]).any(-1).to(torch.float32) * _MISMATCH
            dist = d if dist is None else dist + d
        return dist

    def forward(self, *keys: torch.Tensor):
        dist = self.distances(*keys)
        idx = dist.argmin(-1)
        draft = self.tokens.index_select(0, idx)
        if not self.with_distance:
            return draft
        # the farthest row's nearest distance: verification is skipped only when every row is near
        return draft, dist.amin(-1).amax(0, keepdim=True)

    def table_keys(self) -> list[torch.Tensor]:
        """The table's own keys, as queries (float keys un-standardized)."""
        out = []
        for kind, i in self.order:
            t = getattr(self, f"{kind}{i}")
            out.append(t / getattr(self, f"f{i}_inv_std") if kind == "f" else t)
        return out

    def leave_one_out(self) -> torch.Tensor:
        """(M,): each row's distance to its nearest other row (what verify-skip thresholds are
        quantiles of)."""
        d = self.distances(*self.table_keys())
        d.fill_diagonal_(float("inf"))
        return d.amin(-1)


def _cv_predict(x, v, p00, p01, p11, q):
    """One constant-velocity predict step (dt = 1, white-noise acceleration of variance q)."""
    x = x + v
    p00, p01, p11 = p00 + 2 * p01 + p11 + q / 4, p01 + p11 + q / 2, p11 + q
    return x, v, p00, p01, p11


def _cv_update(x, v, p00, p01, p11, z, r):
    """Take measurement z of the position (noise variance r)."""
    s = p00 + r
    k0, k1 = p00 / s, p01 / s
    y = z - x
    x, v = x + k0 * y, v + k1 * y
    p00, p01, p11 = (1 - k0) * p00, (1 - k0) * p01, p11 - k1 * p01
    return x, v, p00, p01, p11


class KalmanStart(nn.Module):
    """tokens (B, N) of the first call -> filter state (B, 5, A): position, velocity and the
    covariance (p00, p01, p11) per action dimension, after taking the call's H actions in."""

    def __init__(self, horizon: int, action_dim: int, q: float, r: float):
        super().__init__()
        self.h, self.a, self.q, self.r = horizon, action_dim, float(q), float(r)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        z = tokens.to(torch.float32).reshape(tokens.shape[0], self.h, self.a)
        x, v = z[:, 0], torch.zeros_like(z[:, 0])
        p00, p01, p11 = torch.full_like(x, self.r), torch.zeros_like(x), torch.full_like(x, 4.0 * self.r)
        for t in range(1, self.h):
            x, v, p00, p01, p11 = _cv_update(*_cv_predict(x, v, p00, p01, p11, self.q), z[:, t], self.r)
        return torch.stack([x, v, p00, p01, p11], 1)


class KalmanUpdate(nn.Module):
    """(tokens (B, N) of this call, state (B, 5, A)) -> the state after taking its H actions in."""

    def __init__(self, horizon: int, action_dim: int, q: float, r: float):
        super().__init__()
        self.h, self.a, self.q, self.r = horizon, action_dim, float(q), float(r)

    def forward(self, tokens: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        z = tokens.to(torch.float32).reshape(tokens.shape[0], self.h, self.a)
        x, v, p00, p01, p11 = state.unbind(1)
        for t in range(self.h):
            x, v, p00, p01, p11 = _cv_update(*_cv_predict(x, v, p00, p01, p11, self.q), z[:, t], self.r)
        return torch.stack([x, v, p00, p01, p11], 1)


class KalmanDraft(nn.Module):
    """state (B, 5, A) -> draft tokens (B, N) int64: the filters' next H positions, rounded to bins."""

    def __init__(self, horizon: int, action_dim: int, vocab: int):
        super().__init__()
        self.h, self.a, self.vocab = horizon, action_dim, vocab

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        x, v = state[:, 0], state[:, 1]
        steps = torch.arange(1, self.h + 1, dtype=torch.float32, device=state.device)
        pred = x[:, None, :] + steps[None, :, None] * v[:, None, :]           # (B, H, A)
        pred = torch.round(pred).clamp(0, self.vocab - 1)
        return pred.reshape(state.shape[0], self.h * self.a).to(torch.int64)


class ParallelDraft(nn.Module):
    """cond... -> draft tokens (B, N): all N tokens in one call from the head's condition (a
    Medusa-style parallel head), distilled from the head's greedy tokens by `distill`."""

    def __init__(self, cond_dims: list[int], n_tokens: int, vocab: int, hidden: int = 512):
        super().__init__()
        self.n, self.vocab = n_tokens, vocab
        self.norm = nn.LayerNorm(sum(cond_dims))
        self.inp = nn.Linear(sum(cond_dims), hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, n_tokens * vocab)

    def logits(self, *cond: torch.Tensor) -> torch.Tensor:
        x = self.norm(torch.cat([c.reshape(c.shape[0], -1).to(torch.float32) for c in cond], -1))
        h = torch.nn.functional.gelu(self.inp(x))
        h = h + torch.nn.functional.gelu(self.mid(h))
        return self.out(h).reshape(x.shape[0], self.n, self.vocab)

    def forward(self, *cond: torch.Tensor) -> torch.Tensor:
        return self.logits(*cond).argmax(-1)


def distill(draft: ParallelDraft, conds: list[torch.Tensor], tokens: torch.Tensor, steps: int, batch: int = 128,
            lr: float = 2e-3, seed: int = 0) -> dict:
    """Train `draft` to predict `tokens` (M, N) from `conds` (each (M, ...)) by cross-entropy; seeded
    (the global RNG is left as it was). Returns {"loss_first", "loss_last", "train_token_accuracy"}."""
    m = tokens.shape[0]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for p in draft.parameters():                 # a fresh, seeded init
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
            else:
                nn.init.zeros_(p)
        draft.norm.weight.data.fill_(1.0)
        opt = torch.optim.AdamW(draft.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
        losses = []
        draft.train()
        for _ in range(steps):
            idx = torch.randint(0, m, (min(batch, m),))
            logits = draft.logits(*[c[idx] for c in conds])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, draft.vocab), tokens[idx].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        draft.eval()
        with torch.no_grad():
            acc = float((draft(*conds) == tokens).float().mean())
    return {"loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "train_token_accuracy": acc}


class Counted(nn.Module):
    """A drafter whose draft comes with the accepted count the verify loop starts from:
    forward(*x) -> (draft (B, N), zeros (B, 1) int64)."""

    def __init__(self, drafter: nn.Module):
        super().__init__()
        self.drafter = drafter

    def forward(self, *x: torch.Tensor):
        d = self.drafter(*x)
        d, extra = (d[0], tuple(d[1:])) if isinstance(d, tuple) else (d, ())
        return (d, torch.zeros(d.shape[0], 1, dtype=torch.int64, device=d.device), *extra)


class Accept(nn.Module):
    """One verify step. forward(logits (B, N, V), tokens (B, N), n (B, 1)) ->
    (tokens', n', done (1,) int64).

    `tokens` holds n accepted tokens followed by the draft. Position j >= n is acceptable when
    its token equals the head's argmax at j (radius 0: exact, lossless) or lies within `radius`
    bins of it (Spec-VLA's relaxed acceptance over ordered bins). The longest acceptable run from
    n is kept; at the first position that is not, the head's argmax goes in (the logits there
    were computed from an accepted prefix, so it is the token greedy decoding would pick); the
    draft after it stays, to be verified next time. n' counts what is now fixed; done once every
    row has all N.

    `sequence` (HeiSD's sequence-wise relaxed acceptance): a row whose unfixed positions deviate
    from the head's argmax by at most `sequence` bins on average is accepted whole, as drafted.
    """

    def __init__(self, radius: int = 0, refill: str = "draft", sequence: float | None = None):
        super().__init__()
        self.radius, self.refill, self.sequence = int(radius), refill, sequence

    def forward(self, logits: torch.Tensor, tokens: torch.Tensor, n: torch.Tensor):
        pred = logits.argmax(-1)                                           # (B, N)
        slots = torch.arange(tokens.shape[1], device=tokens.device)[None]  # (1, N)
        ok = (tokens == pred) if self.radius == 0 else ((tokens - pred).abs() <= self.radius)
        ok = ok | (slots < n)
        # leading acceptable positions (B, 1): the first position that is not, or N
        m = torch.where(ok, tokens.shape[1], slots).amin(1, keepdim=True)
        if self.sequence is not None:
            free = slots >= n
            dev = ((tokens - pred).abs() * free).sum(1, keepdim=True).to(torch.float32)
            whole = dev <= self.sequence * free.sum(1, keepdim=True).clamp(min=1).to(torch.float32)
            m = torch.where(whole, tokens.shape[1], m)
        if self.refill == "head":     # past the first disagreement: the head's guesses (Jacobi decoding)
            tokens = torch.where(slots >= m, pred, tokens)
        else:
            tokens = torch.where(slots == m, pred, tokens)
        n = torch.clamp(m + 1, max=tokens.shape[1])
        done = (n >= tokens.shape[1]).all().reshape(1).to(torch.int64)
        return tokens, n, done
