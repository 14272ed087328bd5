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
