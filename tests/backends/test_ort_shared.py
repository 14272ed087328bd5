"""ONNX Runtime sessions of one artifact share the initializers in `shared.weights`:
numerics against eager PyTorch and against per-session copies, one OrtValue per range
handed to every session, process memory ~1x (not Nx) the shared bytes, the store
released with the last graph, graphs it must not share, and a missing or short file."""
import gc
import json
import os
import re
import shutil
import sys
import weakref

import numpy as np
import pytest
import torch
from torch import nn

from pared.backends.executor import Executor
from pared.backends.onnxruntime import runtime
from pared.backends.onnxruntime.runtime import OrtGraph
from pared.backends.onnxruntime.shared import SHARED_FILE, SharedWeights, share_initializers
from pared.ir.capture import capture
from pared.ir.errors import ArtifactError
from pared.ir.plan import Call, Plan, Select, StateBuffer, Table
from pared.ir.program import Program
from pared.targets import get_target
from pared.testing import assert_close_to_eager, run_python, save_program

CPU = get_target("cpu").to_json()
ORT_CPU = {"name": "cpu", "backend": "onnxruntime", "provider": "CPUExecutionProvider", "threads": 1}
SHARE = dict(ORT_CPU, share_weights=True)      # what Executor(path, share_weights=True) hands each graph


class _Full(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.deep = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))

    def forward(self, x):
        h = self.deep(x)
        return self.head(x + h), h


class _Reuse(nn.Module):
    def __init__(self, full: _Full):
        super().__init__()
        self.head = full.head

    def forward(self, x, h):
        return self.head(x + h)


def _cached_program(d: int = 64):
    """full computes a feature and the shared head; reuse runs the head on the cached feature."""
    torch.manual_seed(0)
    full = _Full(d).eval()
    x = torch.randn(2, d)
    plan = Plan(inputs=("x",), outputs=("y",),
                body=Select(Table(("full", "reuse", "reuse"), default="full"), (
                    ("full", Call("full", ("in:x",), ("y", "state:h"))),
                    ("reuse", Call("reuse", ("in:x", "state:h"), ("y",))))),
                state=(StateBuffer("h"),))
    program = Program({"full": capture(full, (x,), name="full").main,
                       "reuse": capture(_Reuse(full), (x, torch.randn(2, d)), name="reuse").main}, plan)
    return full, program


def _prepacking_disabled(session) -> bool:
    try:
        return session.get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
    except RuntimeError:                                                      # not set
        return False


def _eager(full: _Full, xs):
    """The plan in eager PyTorch: full at calls 0 and 3+, reuse of call 0's feature at 1 and 2."""
    out, h = [], None
    for i, x in enumerate(xs):
        if i not in (1, 2):
            y, h = full(x)
        else:
            y = full.head(x + h)
        out.append(y)
    return out


def test_variants_share_weights_and_match_eager_and_per_session(tmp_path):
    full, program = _cached_program()
    art = save_program(program, tmp_path / "a", CPU)
    xs = [torch.randn(2, 64) for _ in range(6)]
    ex = Executor(art, share_weights=True)
    got = [ex(x.numpy()) for x in xs]
    with torch.no_grad():
        for want, y in zip(_eager(full, xs), got):
            assert_close_to_eager(want, y, rel_l2=1e-5)
    # the head's two weights (64x64 fp32) are in shared.weights; both sessions got the same OrtValues
    g_full, g_reuse = ex.graphs["full"], ex.graphs["reuse"]
    assert ex.manifest["graphs"]["reuse"]["shared_initializers"] == 2
    assert g_full.weights is g_reuse.weights and len(g_full.weights) == 2
    assert len(g_reuse.shared_initializers) == 2
    # (the exporter names them apart in the two files: the same bytes are one OrtValue all the same)
    assert {id(v) for v in g_reuse.shared_initializers.values()} <= {id(v) for v in g_full.shared_initializers.values()}
    for name, value in g_full.shared_initializers.items():
        assert g_full.session._pared_initializers[name] is value          # held as long as the session
    assert _prepacking_disabled(g_full.session) and _prepacking_disabled(g_reuse.session)
    # the default (each session reads and prepacks its own copy) gives the same numbers
    own = Executor(art)
    assert own.graphs["full"].shared_initializers == {} and own.graphs["full"].weights is None
    for x, y in zip(xs, got):
        np.testing.assert_allclose(own(x.numpy()), y, rtol=1e-6, atol=1e-7)


def _linear_stack_onnx(path: str, variant: int, rng_seed: int = 0, d: int = 256, nbits: bool = False):
    """x -> MatMul -> Gemm -> QuantizeLinear -> QGemm -> QuantizeLinear -> MatMulInteger -> Cast:
    the kernels ORT prepacks on the CPU provider, with weights the same in every variant and
    activation scales of its own (as timestep buckets); `nbits`: one MatMulNBits instead."""
    import onnx
    from onnx import TensorProto as T, helper, numpy_helper
    rng = np.random.default_rng(rng_seed)
    f32 = lambda *s: (rng.standard_normal(s) * 0.05).astype(np.float32)          # noqa: E731
    scale = lambda v, n: numpy_helper.from_array(np.array(v, np.float32), n)        # noqa: E731
    if nbits:
        bs = 32
        inits = [numpy_helper.from_array(rng.integers(0, 255, (d, d // bs, bs // 2)).astype(np.uint8), "B"),
                 numpy_helper.from_array(f32(d * (d // bs)), "S")]
        nodes = [helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft",
                                  K=d, N=d, bits=4, block_size=bs)]
    else:
        inits = [numpy_helper.from_array(f32(d, d), "w_mm"), numpy_helper.from_array(f32(d, d), "w_gemm"),
                 numpy_helper.from_array(np.full((d,), 0.01 * variant, np.float32), "b_gemm"),
                 scale(0.02 + 0.005 * variant, "a_s"), numpy_helper.from_array(np.array(128, np.uint8), "a_zp"),
                 numpy_helper.from_array(rng.integers(-127, 128, (d, d)).astype(np.int8), "w_q"),
                 scale(0.002, "w_s"), numpy_helper.from_array(np.array(0, np.int8), "w_zp"),
                 scale(0.05 + 0.01 * variant, "b_s"), numpy_helper.from_array(np.array(128, np.uint8), "b_zp"),
                 numpy_helper.from_array(rng.integers(-127, 128, (d, d)).astype(np.int8), "w_mi")]
        nodes = [helper.make_node("MatMul", ["x", "w_mm"], ["h1"]),
                 helper.make_node("Gemm", ["h1", "w_gemm", "b_gemm"], ["h2"], transB=1),
                 helper.make_node("QuantizeLinear", ["h2", "a_s", "a_zp"], ["q2"]),
                 helper.make_node("QGemm", ["q2", "a_s", "a_zp", "w_q", "w_s", "w_zp"], ["h3"],
                                  domain="com.microsoft", transB=1),
                 helper.make_node("QuantizeLinear", ["h3", "b_s", "b_zp"], ["q3"]),
                 helper.make_node("MatMulInteger", ["q3", "w_mi", "b_zp"], ["h4"]),
                 helper.make_node("Cast", ["h4"], ["y"], to=T.FLOAT)]
    g = helper.make_graph(nodes, f"v{variant}", [helper.make_tensor_value_info("x", T.FLOAT, [4, d])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [4, d])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    onnx.save(m, path)


def build_variants(outdir: str, n: int, d: int = 256, nbits: bool = False) -> dict:
    """`n` variant graphs of _linear_stack_onnx in `outdir`, their shared weights moved to
    shared.weights as the lowering does; returns graph name -> manifest entry."""
    os.makedirs(outdir, exist_ok=True)
    entries = {}
    for i in range(n):
        f = f"v{i}.onnx"
        _linear_stack_onnx(os.path.join(outdir, f), i, d=d, nbits=nbits)
        io = lambda n: [{"name": n, "dtype": "float32", "shape": [4, d]}]      # noqa: E731
        entries[f"v{i}"] = {"backend": "onnxruntime", "file": f, "files": [f], "inputs": io("x"), "outputs": io("y")}
    return share_initializers(entries, outdir)


def _run_all(d, entries, x, target=SHARE):
    graphs = {g: OrtGraph(d, e, target) for g, e in entries.items()}
    return graphs, {g: og([x])[0] for g, og in graphs.items()}


def test_prepacking_kernels_read_one_buffer_with_the_same_numbers(tmp_path):
    d = str(tmp_path)
    entries = build_variants(d, 3)
    assert all(e["shared_initializers"] == 4 for e in entries.values())     # w_mm, w_gemm, w_q, w_mi
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    graphs, shared = _run_all(d, entries, x)
    names = {"w_mm", "w_gemm", "w_q", "w_mi"}
    assert all(set(g.shared_initializers) == names for g in graphs.values())
    assert len({id(g.shared_initializers[n]) for g in graphs.values() for n in names}) == 4
    assert len(SharedWeights._open) >= 1 and graphs["v0"].weights is graphs["v2"].weights
    _, own = _run_all(d, entries, x, ORT_CPU)
    assert not np.array_equal(shared["v0"], shared["v1"])                   # the variants differ
    for g in entries:
        np.testing.assert_array_equal(shared[g], own[g])


_MEASURE = """
import json, os
from pared.backends.onnxruntime.runtime import OrtGraph
def anon():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024
d, entries = {d!r}, json.load(open({entries!r}))
target = {{"name": "cpu", "provider": "CPUExecutionProvider", "threads": 1, "share_weights": {share!r}}}
graphs = [OrtGraph(d, entries.pop("v0"), target)]
first = anon()
graphs += [OrtGraph(d, e, target) for e in entries.values()]
print(json.dumps({{"next": anon() - first}}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps_rollup")
def test_memory_of_n_variants_is_one_copy_of_the_shared_weights(tmp_path):
    """Four variants with 10 MB of shared weights (fp32 MatMul and Gemm, int8 QGemm and
    MatMulInteger), in a fresh process each way: once the first is loaded, shared, the
    other three add almost nothing; with per-session copies (ORT's prepacked buffers)
    each adds its own. (The first graph's growth also counts ORT's one-time allocations.)"""
    d = str(tmp_path)
    entries = build_variants(d, 4, d=1024)
    json.dump(entries, open(tmp_path / "entries.json", "w"))
    shared_bytes = os.path.getsize(os.path.join(d, SHARED_FILE))
    grown = {}
    for mode in ("share", "per_session"):
        code = _MEASURE.format(share=mode == "share", d=d, entries=str(tmp_path / "entries.json"))
        grown[mode] = json.loads(run_python(code).strip().splitlines()[-1])["next"] / shared_bytes
    # measured: the three after the first add 0.03x (share) and 3.35x (per_session) the shared bytes
    assert grown["share"] < 0.3, grown
    assert grown["per_session"] > 2.5, grown


def test_store_is_released_with_the_last_graph(tmp_path):
    d = str(tmp_path)
    entries = build_variants(d, 2, d=64)
    a, b = (OrtGraph(d, e, SHARE) for e in entries.values())
    store = weakref.ref(a.weights)
    assert a.weights is b.weights
    del a
    gc.collect()
    assert store() is b.weights
    x = np.ones((4, 64), np.float32)
    assert np.isfinite(b([x])[0]).all()
    del b
    gc.collect()
    assert store() is None
    assert not any(ident[0] == os.path.realpath(os.path.join(d, SHARED_FILE)) for ident in SharedWeights._open.keys())
    c = OrtGraph(d, entries["v0"], SHARE)                                      # read again, a new store
    assert c.weights is not None and len(c.weights) == 4


def test_graphs_not_shared_keep_their_own_copies(tmp_path):
    # one graph: no shared.weights, the session as before
    one = build_variants(str(tmp_path / "one"), 1, d=64)["v0"]
    g = OrtGraph(str(tmp_path / "one"), one, SHARE)
    assert one["files"] == ["v0.onnx"] and g.weights is None and g.shared_initializers == {}
    assert not _prepacking_disabled(g.session)
    # MatMulNBits unprepacked dequantizes its weight on every call: those sessions keep prepacking
    nb = build_variants(str(tmp_path / "nbits"), 2, d=64, nbits=True)
    assert all(e["shared_initializers"] == 1 for e in nb.values())                # B (S is under MIN_BYTES)
    graphs, out = _run_all(str(tmp_path / "nbits"), nb, np.ones((4, 64), np.float32))
    assert all(og.weights is None and og.shared_initializers == {} for og in graphs.values())
    assert not any(_prepacking_disabled(og.session) for og in graphs.values())
    np.testing.assert_array_equal(out["v0"], out["v1"])


def test_missing_or_short_shared_weights_is_refused(tmp_path):
    src = str(tmp_path / "src")
    entries = build_variants(src, 2, d=64)
    missing = shutil.copytree(src, str(tmp_path / "missing"))
    os.remove(os.path.join(missing, SHARED_FILE))
    with pytest.raises(ArtifactError, match=r"missing: v0.onnx reads its weights from shared.weights, which is missing"):
        OrtGraph(missing, entries["v0"], SHARE)
    short = shutil.copytree(src, str(tmp_path / "short"))
    path = os.path.join(short, SHARED_FILE)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(ArtifactError, match=rf"short: v0.onnx: initializer '\w+' .* of {re.escape(path)}, which "
                                            rf"has {size - 100} bytes; the artifact is damaged"):
        OrtGraph(short, entries["v0"], SHARE)


def test_integer_kernel_report_reads_a_graph_whose_weights_are_shared(tmp_path):
    # ORT's optimized copy keeps the references into shared.weights, which is not beside
    # it: the report counts ops and must not try to read the weights
    from pared.backends.onnxruntime.int8_check import integer_kernel_report
    d = str(tmp_path)
    entries = build_variants(d, 2)
    assert entries["v1"]["shared_initializers"] == 4
    rep = integer_kernel_report(os.path.join(d, entries["v1"]["file"]), CPU)
    assert rep["integer_ops"] == {"QGemm": 1, "MatMulInteger": 1}
    assert rep["dq_into_float_matmul"] == []


_ACTIVATIONS = """
import json, sys
import numpy as np
from pared.backends.onnxruntime.runtime import make_session
def anon():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024
target = {{"name": "cpu", "provider": "CPUExecutionProvider", "threads": 1, "shared_arena": {shared!r}}}
x = np.ones({shape!r}, np.float32)
sessions = [make_session(p, target) for p in {paths!r}]
ys = [float(sessions[0].run(None, {{"x": x}})[0])]
first = anon()
ys += [float(s.run(None, {{"x": x}})[0]) for s in sessions[1:]]
print(json.dumps({{"next": (anon() - first) / x.nbytes, "y": ys}}))
"""


def _elementwise_onnx(path: str, variant: int, shape: tuple) -> None:
    """x -> three elementwise ops -> a sum: intermediates the size of x, no weights to speak of."""
    import onnx
    from onnx import TensorProto as T, helper, numpy_helper
    nodes = [helper.make_node("Mul", ["x", "a"], ["h1"]), helper.make_node("Add", ["h1", "x"], ["h2"]),
             helper.make_node("Mul", ["h2", "h1"], ["h3"]), helper.make_node("ReduceSum", ["h3"], ["y"], keepdims=0)]
    g = helper.make_graph(nodes, f"v{variant}", [helper.make_tensor_value_info("x", T.FLOAT, list(shape))],
                          [helper.make_tensor_value_info("y", T.FLOAT, [])],
                          [numpy_helper.from_array(np.array(1.0 + variant, np.float32), "a")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps_rollup")
def test_sessions_take_activations_from_one_arena(tmp_path):
    """Four sessions with 8 MB intermediates, in a fresh process each way: once the first
    has run, the other three add almost nothing from the process's shared arena (default);
    with an arena each (shared_arena false) each adds its own buffers. Same numbers."""
    shape = (2048, 1024)
    paths = [str(tmp_path / f"v{i}.onnx") for i in range(4)]
    for i, p in enumerate(paths):
        _elementwise_onnx(p, i, shape)
    got = {}
    for shared in (True, False):
        code = _ACTIVATIONS.format(shared=shared, shape=shape, paths=paths)
        got[shared] = json.loads(run_python(code).strip().splitlines()[-1])
    # measured: the three after the first add 0.001x (one arena) and 9.4x (an arena each) the bytes of x
    assert got[True]["next"] < 0.5, got
    assert got[False]["next"] > 2.5, got
    assert got[True]["y"] == got[False]["y"]


def test_shared_arena_is_the_default_and_off_on_request(tmp_path):
    entries = build_variants(str(tmp_path), 1, d=64)

    def env_allocators(target) -> bool:
        opts = OrtGraph(str(tmp_path), entries["v0"], target).session.get_session_options()
        try:
            return opts.get_session_config_entry("session.use_env_allocators") == "1"
        except RuntimeError:                                                  # not set
            return False
    assert env_allocators(ORT_CPU) and env_allocators(SHARE)
    assert not env_allocators(dict(ORT_CPU, shared_arena=False))
    assert Executor.__init__.__kwdefaults__["shared_arena"] is True
