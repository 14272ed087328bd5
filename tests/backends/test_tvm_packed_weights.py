"""TVM artifacts store a weight-only layer's weight as its codes (int4 two a byte, int8 one),
block scales and zero points, and dequantize them once at load exactly as the graph does: the
same outputs as the float-stored build, bit for bit, in about a fifth of the bytes (0.5 + 5 / block bytes
an element, against 4); shared by a cache
pass's variant graphs once; a record that does not fit its bytes or rebuilds another weight is
refused."""
import functools
import json
import os
import shutil

import numpy as np
import pytest
import torch

import pared
from pared.backends.tvm import lower as tvm_lower
from pared.backends.tvm import weights
from pared.ir.errors import ArtifactError
from pared.testing import tiny_dit, tiny_sampler_loop, tiny_transformer


@pytest.mark.parametrize("bits,signed,n", [(4, False, 37), (4, True, 64), (8, False, 48), (8, True, 33)])
def test_pack_and_derive_give_back_the_dequantized_weight(bits, signed, n):
    rng = np.random.default_rng(bits + n)
    lo, hi = ((-8, 7) if signed else (0, 15)) if bits == 4 else ((-128, 127) if signed else (0, 255))
    groups, block = n, 16 if n % 2 else 8
    codes = rng.integers(lo, hi + 1, (groups, block)).astype(np.int8 if signed else np.uint8)
    zps = rng.integers(lo, hi + 1, groups).astype(np.int32) * (0 if signed else 1)
    c = weights.Codes(codes, rng.random(groups).astype(np.float32) / 7, zps, bits, (block * groups // 8, 8), True)
    data, how = weights._pack(c)
    ncode = (groups * block + 1) // 2 if bits == 4 else groups * block
    assert len(data) == ncode + 4 * groups + np.dtype(how["zero_point_dtype"]).itemsize * groups
    got = weights.derive(np.frombuffer(data, np.uint8), json.loads(json.dumps(how)), "test")
    assert got.dtype == np.float32 and np.array_equal(got, c.dequantized())


def test_a_record_that_does_not_fit_its_bytes_is_refused():
    c = weights.Codes(np.zeros((4, 16), np.uint8), np.ones(4, np.float32), np.full(4, 8, np.int32), 4, None, False)
    data, how = weights._pack(c)
    with pytest.raises(ArtifactError, match="does not fit its bytes"):
        weights.derive(np.frombuffer(data, np.uint8), dict(how, groups=5), "w")
    with pytest.raises(ArtifactError, match="unknown op"):
        weights.derive(np.frombuffer(data, np.uint8), dict(how, op="lz4"), "w")


@functools.cache
def _w4(root: str, pack: bool, pipeline: str = "int4") -> str:
    old = tvm_lower.PACK_WEIGHT_ONLY
    tvm_lower.PACK_WEIGHT_ONLY = pack
    try:
        if pipeline == "int4":
            m, (x,) = tiny_transformer()
            opt = pared.optimize(m, (x,), target="tvm-cpu", bench_repeats=0, allow_fidelity_loss=True,
                                 pipeline=[{"quantize_weights_int4": {"block_size": 16}}])
        else:   # a cache pass's variants over int4 weights: full and reuse read the same weights
            m, (x, t) = tiny_dit(attention=True)
            opt = pared.optimize(m, (x, t), target="tvm-cpu", bench_repeats=0, allow_fidelity_loss=True,
                                 calibration=tiny_sampler_loop(x, 4),
                                 pipeline=[{"quantize_weights_int4": {"block_size": 16, "force": True}},
                                           {"interval_cache": {"interval": 2, "steps": 4}}])
        return opt.save(os.path.join(root, f"{pipeline}_{pack}"))
    finally:
        tvm_lower.PACK_WEIGHT_ONLY = old


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("packed"))


def _manifest(path):
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


def test_packed_int4_weights_compute_the_same_in_under_a_quarter_of_the_bytes(root):
    packed, floats = _w4(root, True), _w4(root, False)
    entry = _manifest(packed)["graphs"]["main"]
    derived = [p for p in entry["params"] if "derive" in p]
    assert derived and all(p["derive"]["bits"] == 4 for p in derived)
    assert "stored as their codes" in entry["weight_only"]["weights"]
    for p in derived:
        d, n = p["derive"], int(np.prod(p["shape"]))
        assert d["groups"] * d["block"] == n
        assert p["bytes"] == (n + 1) // 2 + 4 * d["groups"] + np.dtype(d["zero_point_dtype"]).itemsize * d["groups"]
        assert p["bytes"] < n * 4 / 4        # block 16: 0.5 + 5 / 16 bytes an element, against 4
    size = {k: os.path.getsize(os.path.join(a, "tvm.weights")) for k, a in (("packed", packed), ("float", floats))}
    saved = sum(int(np.prod(p["shape"])) * 4 - p["bytes"] for p in derived)
    assert size["float"] - size["packed"] >= saved - 64 * len(derived)      # less alignment padding
    m, (x,) = tiny_transformer()
    torch.manual_seed(5)
    ids = torch.randint(0, 50, tuple(x.shape)).numpy()
    a, b = pared.load(packed)(ids), pared.load(floats)(ids)
    for u, v in zip(*(list(o.values()) if isinstance(o, dict) else [o] for o in (a, b))):
        assert np.array_equal(u, v)


@pytest.mark.heavy
def test_variant_graphs_share_one_packed_copy(root):
    path = _w4(root, True, "cache")
    m = _manifest(path)
    graphs = [g for g, e in m["graphs"].items() if e["backend"] == "tvm"]
    assert len(graphs) >= 2
    by_key: dict = {}
    for g in graphs:
        for p in m["graphs"][g]["params"]:
            by_key.setdefault(p["key"], []).append(p)
    shared = {k: ps for k, ps in by_key.items() if len(ps) > 1}
    assert any("derive" in ps[0] for ps in shared.values())
    for ps in shared.values():        # every reader of a key reads it the same way, at one offset
        assert all(p == ps[0] for p in ps)
    floats = _w4(root, False, "cache")
    x, t = tiny_dit(attention=True)[1]
    ea, eb = pared.load(path), pared.load(floats)
    loop = tiny_sampler_loop(x, 4)
    assert np.array_equal(loop(lambda *a: torch.from_numpy(ea(*[v.numpy() for v in a]))).numpy(),
                          loop(lambda *a: torch.from_numpy(eb(*[v.numpy() for v in a]))).numpy())


def test_a_derive_record_that_rebuilds_another_weight_is_refused(root, tmp_path):
    art = shutil.copytree(_w4(root, True), str(tmp_path / "a"))
    m = _manifest(art)
    p = next(p for p in m["graphs"]["main"]["params"] if "derive" in p)
    p["derive"]["transpose"] = not p["derive"]["transpose"]    # same bytes, another layout
    p["derive"]["view"] = p["derive"]["view"][::-1] if p["derive"]["view"] else None
    with open(os.path.join(art, "manifest.json"), "w") as f:
        json.dump(m, f)
    with pytest.raises(ArtifactError, match="dequantized from its codes is not the weight"):
        pared.load(art)(np.zeros((2, 16), np.int64))


def test_weight_transposes_are_folded_into_the_stored_weights():
    """A linear layer's weight is stored transposed, as its matmul reads it: the built module has
    no transpose of a constant left, and the artifact computes what the fx graph does."""
    import torch
    from tvm.relax.expr_functor import PyExprVisitor, visitor

    from pared.backends.tvm import weights
    from pared.backends.tvm.lower import to_relax
    from pared.ir.capture import capture

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
    g = capture(m, (torch.randn(4, 32),)).main
    mod = to_relax(g, "main")
    count = {"const": 0}

    @visitor
    class _Count(PyExprVisitor):
        def visit_call_(self, op):
            if getattr(op.op, "name", "") == "relax.permute_dims" and hasattr(getattr(op.args[0], "value", None),
                                                                               "numpy"):
                count["const"] += 1
            for a in op.args:
                self.visit_expr(a)
    _Count().visit_expr(mod["main"])
    assert count["const"] == 2                        # both weights, transposed per call before
    mod, folded = weights.fold_transposes(mod)
    count["const"] = 0
    _Count().visit_expr(mod["main"])
    assert folded == 2 and count["const"] == 0
    lifted, values = weights.lift(mod)
    shapes = sorted(v.shape for _, v in values)
    assert (32, 64) in shapes and (64, 16) in shapes   # stored as [in, out]: the matmul's layout
