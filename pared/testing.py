"""Shared assertions and tiny seeded models for pared's tests (and users' own)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import torch
from torch import nn

from pared.ir.capture import capture
from pared.ir.plan import Call, Plan, StateBuffer, Table
from pared.ir.program import Program


def op_count(program: Program, op: str, graph: str | None = None) -> int:
    """How many call_function nodes run `op`: "aten.mm" counts every overload, "aten.mm.default" one."""
    g = program.graphs[graph] if graph else program.main
    return sum(v for k, v in g.op_counts().items() if k == op or k.startswith(op + "."))


def assert_close_to_eager(reference: Any, got: Any, *, rel_l2: float = 1e-4, what: str = "output") -> None:
    """Every leaf of `got` within `rel_l2` relative L2 of `reference` (tensors or arrays, any nesting)."""
    import torch.utils._pytree as pytree
    ref = [np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
           for x in pytree.tree_leaves(reference)]
    out = [np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
           for x in pytree.tree_leaves(got)]
    assert len(ref) == len(out), f"{what}: {len(out)} leaves, expected {len(ref)}"
    for i, (r, o) in enumerate(zip(ref, out)):
        assert r.shape == o.shape, f"{what}[{i}]: shape {o.shape}, expected {r.shape}"
        denom = np.linalg.norm(r) or 1.0
        err = float(np.linalg.norm(r - o) / denom)
        assert err <= rel_l2, f"{what}[{i}]: relative L2 {err:.3g} > {rel_l2}"


def state_snapshot(model: nn.Module) -> dict:
    """Bit-exact copy of parameters, buffers and train/eval modes, to prove a model was not mutated."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def assert_unchanged(model: nn.Module, snapshot: dict) -> None:
    now = state_snapshot(model)
    assert now["modes"] == snapshot["modes"], "train/eval mode changed"
    assert now["requires_grad"] == snapshot["requires_grad"], "requires_grad changed"
    assert now["tensors"].keys() == snapshot["tensors"].keys(), "parameters or buffers added/removed"
    for k, v in snapshot["tensors"].items():
        assert torch.equal(now["tensors"][k], v), f"{k} changed"


def save_program(program: Program, path: str, target: dict) -> str:
    """Lower every graph of `program` for `target` (a target's JSON form) and write
    the artifact atomically at `path`, with the plan and the program's records, as
    `Optimized.save` does but without a fidelity run. Returns the artifact path."""
    from pared.backends.artifact import write_artifact
    from pared.backends.lower import lower_program
    from pared.ir.transform import Record

    from pared.ir.isa import host_cpu

    def build(tmp: str) -> dict:
        graphs = lower_program(program, target, tmp)
        return {"graphs": graphs, "plan": program.plan.to_json(), "target": target,
                "build_cpu": host_cpu().to_json(),
                "output_structure": program.output_structure,
                "records": {k: r.to_json() for k, r in program.records.items() if isinstance(r, Record)}}
    return write_artifact(str(path), build)


def run_torch_free(code: str, *, cwd: str | None = None, timeout: int = 300) -> str:
    """Run Python code in a subprocess where `import torch` fails; return stdout.

    Raises:
        AssertionError: with stderr, when the code fails.
    """
    prelude = textwrap.dedent("""
        import sys
        class _NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this process (torch-free check)")
                return None
        sys.meta_path.insert(0, _NoTorch())
    """)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    p = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                       cwd=cwd, timeout=timeout, env=env)
    assert p.returncode == 0, f"torch-free subprocess failed:\n{p.stderr[-3000:]}"
    return p.stdout


#: the CPU features hide_isa hides to show an AVX2-only x86 CPU (an AMD EPYC of the Zen 2 kind)
AVX2_ONLY = ("avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
_HIDE_ISA_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "support",
                             "hide_isa.c")


def hidden_isa_env(hide: "tuple[str, ...] | list[str]" = AVX2_ONLY) -> tuple[dict | None, str]:
    """The environment that runs a child process on this CPU with the features `hide` hidden from
    CPUID (tests/support/hide_isa.c, built here with cc and kept in build/), so ONNX Runtime and
    LLVM pick the kernels a CPU without them runs, at this CPU's speed.

    Returns:
        (env, note): env is None when it cannot work here, and note says why (no x86, no C
        compiler, no CPUID faulting in this kernel or CPU); otherwise note names the features hidden.
    """
    import hashlib
    import platform
    import shutil
    if platform.machine() not in ("x86_64", "AMD64"):
        return None, f"hiding x86 features needs an x86 CPU (this is {platform.machine()})"
    if not os.path.exists(_HIDE_ISA_SRC):
        return None, f"{_HIDE_ISA_SRC} is missing (pared.testing runs from a source checkout)"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, "no C compiler (cc) to build tests/support/hide_isa.c"
    with open(_HIDE_ISA_SRC, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    out_dir = os.path.join(os.path.dirname(os.path.dirname(_HIDE_ISA_SRC)), "..", "build")
    so = os.path.abspath(os.path.join(out_dir, f"hide_isa-{digest}.so"))
    if not os.path.exists(so):
        os.makedirs(os.path.dirname(so), exist_ok=True)
        tmp = f"{so}.{os.getpid()}.tmp"
        p = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, _HIDE_ISA_SRC, "-ldl"], capture_output=True,
                           text=True)
        if p.returncode != 0:
            return None, f"building hide_isa.c failed: {p.stderr.strip()[-500:]}"
        os.replace(tmp, so)
    env = dict(os.environ, PARED_HIDE_ISA=",".join(hide), OMP_WAIT_POLICY="PASSIVE")
    env["LD_PRELOAD"] = " ".join([so] + [p for p in os.environ.get("LD_PRELOAD", "").split() if p])
    probe = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('PARED_HIDE_ISA_STATUS'))"],
                           capture_output=True, text=True, env=env)
    if probe.stdout.strip() != "active":
        return None, ("this kernel or CPU has no CPUID faulting (no 'cpuid_fault' in /proc/cpuinfo), which "
                      f"hide_isa.c needs: {probe.stderr.strip()[-300:]}")
    return env, f"CPUID without {', '.join(hide)}"


def run_python(code: str, env: dict | None = None, timeout: int = 600) -> str:
    """Run Python `code` in a subprocess with `env` (e.g. hidden_isa_env's); return stdout.

    Raises:
        AssertionError: with stderr, when the code fails.
    """
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       env=env or dict(os.environ), timeout=timeout)
    assert p.returncode == 0, f"subprocess failed:\n{p.stderr[-3000:]}"
    return p.stdout


class TinyTransformer(nn.Module):
    """A pre-norm transformer encoder (embedding in, pooled and per-token out): the spine's test model."""

    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4, layers: int = 2, seq: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, seq, dim) * 0.02)
        self.blocks = nn.ModuleList([TinyBlock(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, ids: torch.Tensor) -> dict:
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        for b in self.blocks:
            x = b(x)
        x = self.norm(x)
        return {"tokens": x, "logits": self.head(x.mean(dim=1))}


class TinyBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


def tiny_transformer(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(seed)
    m = TinyTransformer().eval()
    return m, (torch.randint(0, 50, (2, 16)),)


class _Full(nn.Module):
    """Computes the expensive part and emits it as the feature to cache."""
    def __init__(self):
        super().__init__()
        self.deep = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
        self.shallow = nn.Linear(8, 8)

    def forward(self, x):
        h = self.deep(x)
        return self.shallow(x) + h, h


class _Reuse(nn.Module):
    def __init__(self, full):
        super().__init__()
        self.shallow = full.shallow

    def forward(self, x, h):
        return self.shallow(x) + h


def two_graph_program() -> "tuple[nn.Module, Program]":
    """A two-graph Program whose Table plan caches a feature at step 0 and reuses it
    for two steps (the shape of a cache rewrite). Returns (the full module, program)."""
    torch.manual_seed(0)
    full = _Full().eval()
    x = torch.randn(2, 8)
    pf = capture(full, (x,), name="full")
    pr = capture(_Reuse(full), (x, torch.randn(2, 8)), name="reuse")
    plan = Plan(inputs=("x",), outputs=("y",),
                routines=(("full", (Call("full", ("in:x",), ("y", "state:h")),)),
                          ("reuse", (Call("reuse", ("in:x", "state:h"), ("y",)),))),
                schedule=Table(("full", "reuse", "reuse"), default="full"), state=(StateBuffer("h"),))
    return full, Program({"full": pf.main, "reuse": pr.main}, plan)


class _TinyBlock(nn.Module):
    """adaLN-style residual block: h + gate * mlp(norm(h) * (1 + scale) + shift)."""
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.ada = nn.Linear(dim, 3 * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(c).unsqueeze(1).chunk(3, dim=-1)
        return h + gate * self.mlp(self.norm(h) * (1 + scale) + shift)


class TinyDiT(nn.Module):
    """A timestep-conditioned stack of residual blocks over tokens: the shape of a
    diffusion transformer, small enough for pass tests. forward(x [B,T,C], t [B])."""

    def __init__(self, channels: int = 4, dim: int = 32, layers: int = 6):
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(channels, dim)
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([_TinyBlock(dim) for _ in range(layers)])
        self.out = nn.Linear(dim, channels)

    def cond(self, t: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-torch.arange(self.dim // 2, dtype=torch.float32) * (4.0 / self.dim))
        a = t.float()[:, None] * freqs[None]
        return self.t_mlp(torch.cat([a.sin(), a.cos()], dim=-1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, span: tuple[int, int] | None = None,
                residual: torch.Tensor | None = None, record: dict | None = None) -> torch.Tensor:
        """`span=(first, last)` with `residual`: replace those blocks by `input + residual`
        (the eager meaning of a cache reuse); `record`: store each span's residual."""
        c = self.cond(t)
        h = self.embed(x)
        i = 0
        while i < len(self.blocks):
            if span is not None and i == span[0] and residual is not None:
                h = h + residual
                i = span[1] + 1
                continue
            h_in = h
            for j in range(i, (span[1] + 1) if span is not None and i == span[0] else i + 1):
                h = self.blocks[j](h, c)
            if record is not None and span is not None and i == span[0]:
                record["residual"] = h - h_in
            i = j + 1
        return self.out(h)


def tiny_dit(seed: int = 0, layers: int = 6, batch: int = 2) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(seed)
    m = TinyDiT(layers=layers).eval()
    # train-free, but make consecutive steps similar like a real denoiser's:
    with torch.no_grad():
        for b in m.blocks:
            b.ada.weight.mul_(0.2)
    return m, (torch.randn(batch, 8, 4), torch.full((batch,), 900.0))


class TinyAttention(nn.Module):
    """Single-head self-attention over tokens [B, N, d]."""
    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        w = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        return self.proj(w @ v)


class TinyMoE(nn.Module):
    """Top-k routed experts with stacked weights ([E, d, h], one batched matmul for
    all experts, as in the dit_moe_mnist workload) plus a shared expert."""
    def __init__(self, dim: int, experts: int = 4, hidden: int = 16, top_k: int = 2):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, dim, hidden) * dim ** -0.5)
        self.b1 = nn.Parameter(torch.randn(experts, 1, hidden) * 0.1)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, dim) * hidden ** -0.5)
        self.b2 = nn.Parameter(torch.randn(experts, 1, dim) * 0.1)
        self.shared = nn.Linear(dim, dim)

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, idx = self.router(flat).softmax(-1).topk(self.top_k, dim=-1)
        return gate / gate.sum(-1, keepdim=True), idx

    def experts(self, flat: torch.Tensor) -> torch.Tensor:
        """Every expert's output for every token: [E, T, d]."""
        h = nn.functional.gelu(torch.matmul(flat.unsqueeze(0), self.w1) + self.b1)
        return torch.matmul(h, self.w2) + self.b2

    def combine(self, flat: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        t = flat.shape[0]
        rows = idx * t + torch.arange(t).unsqueeze(-1)
        picked = y.reshape(-1, y.shape[-1]).index_select(0, rows.reshape(-1)).reshape(t, self.top_k, -1)
        return (picked * gate.unsqueeze(-1)).sum(1) + self.shared(flat)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        flat = h.reshape(b * n, d)
        gate, idx = self.route(flat)
        return self.combine(flat, self.experts(flat), gate, idx).reshape(b, n, d)


class _TinyMoEBlock(nn.Module):
    def __init__(self, dim: int, experts: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.ada = nn.Linear(dim, 3 * dim)
        self.attn = TinyAttention(dim)
        self.ff = TinyMoE(dim, experts)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(c).unsqueeze(1).chunk(3, dim=-1)
        h = h + gate * self.attn(self.norm(h))
        return h + self.ff(self.norm(h) * (1 + scale) + shift)


class TinyMoEDiT(nn.Module):
    """TinyDiT with attention + mixture-of-experts blocks. forward(x [B,T,C], t [B]).

    The keyword arguments give the eager meaning of expert caching (expert_cache):
    `mode="full"` computes and fills `cache`; `mode="reuse"` reads each block's
    attention output from it and, per batch row, recomputes the `refresh` experts
    whose routed inputs drifted most (written with plain loops, as a reference)."""

    def __init__(self, channels: int = 4, dim: int = 32, layers: int = 3, experts: int = 4):
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(channels, dim)
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([_TinyMoEBlock(dim, experts) for _ in range(layers)])
        self.out = nn.Linear(dim, channels)

    cond = TinyDiT.cond

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, mode: str | None = None, cache: dict | None = None,
                refresh: int = 0) -> torch.Tensor:
        c = self.cond(t)
        h = self.embed(x)
        b, n, d = h.shape
        for i, blk in enumerate(self.blocks):
            if mode is None:
                h = blk(h, c)
                continue
            shift, scale, gate = blk.ada(c).unsqueeze(1).chunk(3, dim=-1)
            a = blk.attn(blk.norm(h)) if mode != "reuse" else cache[("attn", i)]
            h = h + gate * a
            flat = (blk.norm(h) * (1 + scale) + shift).reshape(b * n, d)
            g, idx = blk.ff.route(flat)
            if mode == "reuse":
                y, prev, drift = cache[("y", i)], cache[("prev", i)], cache[("drift", i)]
                for row in range(b):
                    tok = slice(row * n, (row + 1) * n)
                    change = (flat[tok] - prev[tok]).abs().mean(-1)
                    base = prev[tok].abs().mean(-1)
                    for e in range(y.shape[0]):
                        routed = (idx[tok] == e).any(-1).float()
                        drift[row, e] += (routed * change).sum() / ((routed * base).sum() + 1e-8)
                    for e in drift[row].topk(refresh).indices.tolist() if refresh else []:
                        y[e, tok] = blk.ff.experts(flat[tok])[e]
                        drift[row, e] = 0.0
                cache[("prev", i)] = flat
            else:
                y = blk.ff.experts(flat)
                cache.update({("attn", i): a, ("y", i): y.clone(), ("prev", i): flat,
                              ("drift", i): torch.zeros(b, y.shape[0])})
            h = h + blk.ff.combine(flat, y, g, idx).reshape(b, n, d)
        return self.out(h)


def tiny_moe_dit(seed: int = 0, batch: int = 2, tokens: int = 8) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(seed)
    m = TinyMoEDiT().eval()
    with torch.no_grad():
        for b in m.blocks:
            b.ada.weight.mul_(0.2)
    return m, (torch.randn(batch, tokens, 4), torch.full((batch,), 900.0))


def tiny_sampler_loop(x0: torch.Tensor, steps: int = 10):
    """A calibration loop over `steps` calls: x <- x - 0.1 * model(x, t), t from 900 down.

    Returns loop(fn) -> the final x (fn: the model or a Program on torch tensors)."""
    ts = torch.linspace(900, 0, steps)

    def loop(fn):
        x = x0.clone()
        for t in ts:
            out = fn(x, torch.full((x.shape[0],), float(t)))
            out = out[0] if isinstance(out, (tuple, list)) else out
            x = x - 0.1 * torch.as_tensor(out)
        return x
    return loop
