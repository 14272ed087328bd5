"""pared's default TVM schedules (backends/tvm/schedule.py): which PrimFuncs the matmul rule
takes, what it does to their loops, and that every scheduled build computes exactly what
TVM's unscheduled default pipeline computes."""
import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from pared.backends.tvm import schedule  # noqa: E402

TARGET = tvm.target.Target({"kind": "llvm"})          # tvm-cpu's target: the x86-64 baseline (SSE2)
AVX512 = tvm.target.Target({"kind": "llvm", "mattr": ["+avx512f"]})


def _module(shapes, body, dtypes=None):
    """A Relax module main(*params) -> body(*vars)."""
    dtypes = dtypes or ["float32"] * len(shapes)
    bb = relax.BlockBuilder()
    params = [relax.Var(f"p{i}", relax.TensorType(s, d)) for i, (s, d) in enumerate(zip(shapes, dtypes))]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(body(*params)))
        bb.emit_func_output(out)
    return bb.get()


def _fused(mod, target=TARGET):
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    with target:
        return tvm.transform.Sequential(cpu.legalize_passes(target))(mod)


def _primfuncs(mod):
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def _scheduled(mod, target=TARGET):
    with target:
        return _primfuncs(schedule.default_schedule()(_fused(mod, target)))


def _run_both(mod, shapes, dtypes=None):
    """Outputs of TVM's default build and of pared's scheduled build on the same inputs."""
    dtypes = dtypes or ["float32"] * len(shapes)
    rng = np.random.default_rng(0)
    dev = tvm.cpu()
    vals = [rng.standard_normal(s).astype(d) if d.startswith("float") else
            rng.integers(-128, 128, s).astype(d) for s, d in zip(shapes, dtypes)]
    args = [tvm.runtime.tensor(v, dev) for v in vals]
    outs = []
    for ex in (tvm.compile(mod, target=TARGET),
               tvm.compile(mod, target=TARGET, relax_pipeline=schedule.pipeline(TARGET))):
        outs.append(relax.VirtualMachine(ex, dev)["main"](*args).numpy())
    return outs


def _matmul_bias_gelu(x, w, b):
    return relax.op.nn.gelu(relax.op.add(relax.op.matmul(x, w), b))


def test_matmul_is_tiled_vectorized_parallel():
    mod = _module([(64, 96), (96, 128), (128,)], _matmul_bias_gelu)
    (name, f), = [(n, f) for n, f in _scheduled(mod).items() if "matmul" in n]
    text = f.script()
    assert f.attrs["tirx.is_scheduled"]
    assert "T.parallel(" in text and "T.unroll(" in text
    assert "matmul_intermediate_local" in text               # the accumulator tile
    assert "matmul_init" in text and "matmul_update" in text  # reduction decomposed
    # SSE2: 4 float lanes, tiles of 2 vectors; the gelu epilogue runs on the tile, vectorized
    assert "T.vectorized(T.int64(8))" in text and "T.vectorized(T.int64(4))" in text
    body = text[text.index("T.parallel("):]
    assert "T.erf(" in body


def test_vector_width_follows_the_target():
    assert schedule.simd_bits(TARGET) == 128
    assert schedule.simd_bits(AVX512) == 512
    assert schedule.simd_bits(tvm.target.Target({"kind": "llvm", "mattr": ["+avx2"]})) == 256
    mod = _module([(64, 96), (96, 128)], relax.op.matmul)
    text = _scheduled(mod, AVX512)["matmul"].script()
    assert "T.vectorized(T.int64(32))" in text              # 2 x 16 floats


@pytest.mark.parametrize("m,k,n", [(64, 96, 128), (7, 13, 19), (1, 5, 3), (33, 70, 9), (128, 256, 36)])
def test_matmul_bias_gelu_equals_unscheduled(m, k, n):
    mod = _module([(m, k), (k, n), (n,)], _matmul_bias_gelu)
    assert all(f.attrs.get("tirx.is_scheduled") for f in _scheduled(mod).values())
    ref, got = _run_both(mod, [(m, k), (k, n), (n,)])
    np.testing.assert_array_equal(got, ref)


def test_a_large_weight_runs_column_panel_by_column_panel_with_the_same_sums():
    # [K, N] over COLUMN_ORDER_BYTES: the column tiles (i1) outer, rows streamed; below, rows outer
    big, small = [(64, 512), (512, 640), (640,)], [(64, 96), (96, 128), (128,)]
    assert 512 * 640 * 4 > schedule.COLUMN_ORDER_BYTES > 96 * 128 * 4
    for shapes, fused in ((big, "i1_0_i0_0_fused"), (small, "i0_0_i1_0_fused")):
        mod = _module(shapes, _matmul_bias_gelu)
        (f,) = [f for n, f in _scheduled(mod).items() if "matmul" in n]
        assert f"for {fused} in T.parallel(" in f.script()
        ref, got = _run_both(mod, shapes)
        np.testing.assert_array_equal(got, ref)             # k ascending in every tile: bit for bit


@pytest.mark.parametrize("b,m,k,n", [(3, 16, 8, 24), (5, 7, 9, 11), (4, 6, 8, 13)])
def test_batched_matmul_equals_unscheduled(b, m, k, n):
    mod = _module([(b, m, k), (b, k, n)], relax.op.matmul)
    assert _scheduled(mod)["matmul"].attrs["tirx.is_scheduled"]
    ref, got = _run_both(mod, [(b, m, k), (b, k, n)])
    np.testing.assert_array_equal(got, ref)


def test_int8_matmul_equals_unscheduled():
    # the integer layers of backends/tvm/quant.py: int8 x int8 -> int32
    mod = _module([(24, 40), (40, 17)], lambda x, w: relax.op.matmul(x, w, out_dtype="int32"), ["int8", "int8"])
    text = _scheduled(mod)["matmul"].script()
    assert "T.parallel(" in text and "T.vectorized(" in text
    ref, got = _run_both(mod, [(24, 40), (40, 17)], ["int8", "int8"])
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, ref)


VNNI = tvm.target.Target({"kind": "llvm", "mattr": ["+avx512f", "+avx512bw", "+avx512vnni", "+avx2", "+fma"]})


def _host_has_vnni():
    try:
        return "avx512_vnni" in open("/proc/cpuinfo").read()
    except OSError:
        return False


def _quantized_layer(x, w, b):
    """quant.py's static layer: activations quantized to uint8 in the graph, int8 weights, an
    int32 bias and the float rescale fused after the matmul."""
    q = relax.op.quantize(x, relax.const(0.05, "float32"), relax.const(7, "int32"), axis=-1, out_dtype="uint8")
    acc = relax.op.add(relax.op.matmul(q, w, out_dtype="int32"), b)
    return relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(0.01, "float32"))


def _layer_operands_on_a_vnni_host(shapes, seed):
    """(rng, device, [x, w, b] device tensors) for _quantized_layer; skips the test where the CPU
    lacks VNNI (the structure it checked before this call stands)."""
    if not _host_has_vnni():
        pytest.skip("this CPU lacks AVX-512 VNNI: the tensorized build cannot run here (its structure is checked)")
    rng = np.random.default_rng(seed)
    vals = [rng.standard_normal(shapes[0]).astype("float32") * 3, rng.integers(-128, 128, shapes[1]).astype("int8"),
            rng.integers(-1000, 1000, shapes[2]).astype("int32")]
    dev = tvm.cpu()
    return rng, dev, [tvm.runtime.tensor(v, dev) for v in vals]


def test_uint8_int8_matmul_is_tensorized_with_vnni_where_the_target_has_it():
    shapes, dtypes = [(2, 100, 128), (128, 96), (96,)], ["float32", "int8", "int32"]
    mod = _module(shapes, _quantized_layer, dtypes)
    (name, f), = [(n, f) for n, f in _scheduled(mod, VNNI).items() if "matmul" in n]
    text = f.script()
    assert "llvm.x86.avx512.vpdpbusd.512" in text                  # one vpdpbusd per 16 columns x 4 k
    assert "T.Buffer((T.int64(6), T.int64(32), T.int64(16), T.int64(4)), \"int8\")" in text or \
        "(T.int64(6), T.int64(32), T.int64(16), T.int64(4))" in text   # the weight packed [N/16, K/4, 16, 4]
    assert "T.parallel(" in text
    # the same function on a target without VNNI: the float-style tiles, no vpdpbusd
    assert "vpdpbusd" not in _scheduled(mod, AVX512)[name].script()
    # int8 activations (not the intrinsic's operand types) and N not a multiple of 16 are not tensorized
    i8 = _module([(24, 40), (40, 32)], lambda x, w: relax.op.matmul(x, w, out_dtype="int32"), ["int8", "int8"])
    u8_17 = _module([(24, 40), (40, 17)], lambda x, w: relax.op.matmul(x, w, out_dtype="int32"), ["uint8", "int8"])
    for m in (i8, u8_17):
        got = _scheduled(m, VNNI)["matmul"]
        assert got.attrs["tirx.is_scheduled"] and "vpdpbusd" not in got.script()
    # the tensorized build computes exactly what TVM's unscheduled build computes
    rng, dev, args = _layer_operands_on_a_vnni_host(shapes, seed=0)
    outs = [relax.VirtualMachine(ex, dev)["main"](*args).numpy()
            for ex in (tvm.compile(mod, target=VNNI), tvm.compile(mod, target=VNNI, relax_pipeline=schedule.pipeline(VNNI)))]
    np.testing.assert_array_equal(outs[1], outs[0])
    # and a bare uint8 x int8 matmul, over the whole uint8 range, equals numpy's int64 product
    mm = _module([(64, 256), (256, 48)], lambda x, w: relax.op.matmul(x, w, out_dtype="int32"), ["uint8", "int8"])
    a = np.full((64, 256), 255, np.uint8)
    a[1:] = rng.integers(0, 256, (63, 256))
    w = np.full((256, 48), -128, np.int8)
    w[:, 1:] = rng.integers(-128, 128, (256, 47))
    ex = tvm.compile(mm, target=VNNI, relax_pipeline=schedule.pipeline(VNNI))
    got = relax.VirtualMachine(ex, dev)["main"](tvm.runtime.tensor(a, dev), tvm.runtime.tensor(w, dev)).numpy()
    np.testing.assert_array_equal(got, a.astype(np.int64) @ w.astype(np.int64))


def _calls(func):
    """Names of the functions a Relax function calls with call_tir."""
    names = []
    tvm.relax.analysis.post_order_visit(func.body, lambda e: names.append(e.args[0].name_hint) if isinstance(
        e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir" else None)
    return names


def test_vnni_weight_repack_moves_out_of_main_when_the_weight_is_a_parameter():
    shapes, dtypes = [(2, 100, 128), (128, 96), (96,)], ["float32", "int8", "int32"]
    plain = _module(shapes, _quantized_layer, dtypes)
    weights = tvm.IRModule({"main": plain["main"].with_attr("num_input", 1)})   # what weights.lift marks
    made, none = {}, {}
    with VNNI:
        lifted = schedule.prepack_weights(VNNI, made)(schedule.default_schedule()(_fused(weights, VNNI)))
        kept = schedule.prepack_weights(VNNI, none)(schedule.default_schedule()(_fused(plain, VNNI)))
    assert made == {"transform_params": schedule.TRANSFORM_PARAMS} and none == {}   # what lower_graph writes in the manifest
    # the weight is a parameter: main calls only the prepacked matmul and takes the packed weight;
    # the repack is the one thing main_transform_params does
    main, load = lifted["main"], lifted["main_transform_params"]
    assert not any(n.endswith("_weight_prepack") for n in _calls(main))
    assert any(n.endswith("_prepacked") for n in _calls(main))
    assert [n for n in _calls(load)] == [n for n in _calls(load) if n.endswith("_weight_prepack")] != []
    assert [tuple(int(d) for d in p.ty.shape) for p in main.params[:1]] == [(2, 100, 128)]
    assert sorted(tuple(int(d) for d in p.ty.shape) for p in main.params[1:]) == [(6, 32, 16, 4), (96,)]
    # the same matmul on a run-time tensor (no num_input): split, but the repack stays in main
    names = [gv.name_hint for gv in kept.get_global_vars()]
    assert "main_transform_params" not in names
    assert any(n.endswith("_weight_prepack") for n in _calls(kept["main"]))
    # a module without tensorized matmuls is left as it was
    floats = _module([(64, 96), (96, 128)], relax.op.matmul)
    floats = tvm.IRModule({"main": floats["main"].with_attr("num_input", 1)})
    with VNNI:
        fused = schedule.default_schedule()(_fused(floats, VNNI))
        assert schedule.prepack_weights(VNNI)(fused).same_as(fused)
    # beside a function TVM's split cannot read (cumsum's opaque loop, no root block), the repack
    # still moves and that function is kept as it was
    def with_cumsum(x, c, w, b):
        return relax.Tuple([_quantized_layer(x, w, b), relax.op.cumsum(c, axis=0)])
    mixed = _module([(2, 100, 128), (100, 96), (128, 96), (96,)], with_cumsum, ["float32", "float32", "int8", "int32"])
    mixed = tvm.IRModule({"main": mixed["main"].with_attr("num_input", 2)})
    with VNNI:
        before = schedule.default_schedule()(schedule.fuse(VNNI)(mixed))    # pared's fusion dispatches cumsum
        after = schedule.prepack_weights(VNNI)(before)
    cumsum = [gv for gv in before.get_global_vars() if gv.name_hint.startswith("cumsum")]
    assert cumsum and after[cumsum[0].name_hint].same_as(before[cumsum[0]])
    assert "main_transform_params" in [gv.name_hint for gv in after.get_global_vars()]
    # run: the weights through main_transform_params once, then main, equals TVM's unscheduled build
    _, dev, (x, w, b) = _layer_operands_on_a_vnni_host(shapes, seed=1)
    ref = relax.VirtualMachine(tvm.compile(plain, target=VNNI), dev)["main"](x, w, b).numpy()
    vm = relax.VirtualMachine(tvm.compile(weights, target=VNNI, relax_pipeline=schedule.pipeline(VNNI)), dev)
    packed = list(vm["main_transform_params"]([w, b]))
    assert sorted(tuple(p.shape) for p in packed) == [(6, 32, 16, 4), (96,)]
    for _ in range(2):                                     # the packed weight is reused, not consumed
        np.testing.assert_array_equal(vm["main"](x, *packed).numpy(), ref)


def test_non_matmul_functions_are_not_taken_by_the_matmul_rule():
    from tvm import s_tir
    mod = _module([(8, 16)], lambda x: relax.op.nn.softmax(relax.op.exp(x)))
    funcs = _primfuncs(_fused(mod))
    rule = schedule.Matmul()
    assert funcs and all(rule.apply(f, TARGET, False) is None for f in funcs.values())
    # a matmul-shaped reduction that is not a matmul (a sum of a product over a spatial axis) is left alone too
    mod = _module([(8, 16)], lambda x: relax.op.sum(relax.op.multiply(x, x), axis=[1]))
    funcs = _primfuncs(_fused(mod))
    assert all(rule.apply(f, TARGET, False) is None for f in funcs.values())
    assert isinstance(s_tir.Schedule(next(iter(funcs.values()))), s_tir.Schedule)
    ref, got = _run_both(mod, [(8, 16)])
    np.testing.assert_array_equal(got, ref)


def test_weight_broadcast_of_a_batched_matmul_is_dropped():
    # torch's bmm(expand(x), expand(W.T)) (nn.MultiheadAttention's in_proj) copies W per batch
    def body(x, w):
        return relax.op.matmul(relax.op.broadcast_to(x, relax.ShapeExpr([6, 5, 8])),
                               relax.op.broadcast_to(w, relax.ShapeExpr([6, 8, 12])))
    mod = _module([(6, 5, 8), (8, 12)], body)
    rewritten = relax.transform.DeadCodeElimination()(schedule.unbroadcast_matmul_weights()(mod))
    text = rewritten["main"].script()
    assert "broadcast_to" not in text and "R.matmul(p0, p1" in text
    funcs = _scheduled(rewritten)
    assert [n for n in funcs if "broadcast" in n] == [] and funcs["matmul"].attrs["tirx.is_scheduled"]
    ref, got = _run_both(mod, [(6, 5, 8), (8, 12)])
    np.testing.assert_array_equal(got, ref)
    # a broadcast that grows the batch of the output stays
    grow = _module([(1, 5, 8), (8, 12)], lambda x, w: relax.op.matmul(
        x, relax.op.broadcast_to(w, relax.ShapeExpr([3, 8, 12]))))
    assert "broadcast_to" in schedule.unbroadcast_matmul_weights()(grow)["main"].script()


def test_fast_math_legalizes_transcendentals_as_arithmetic_and_stays_within_the_check():
    """fast_math: GELU (erf and tanh forms), exp and softmax become polynomial arithmetic (no
    erf / tanh / exp call left in any PrimFunc), the default schedules still apply, and the
    build stays within float error of TVM's exact build."""
    import re

    def body(x, w):
        h = relax.op.matmul(x, w)
        return relax.op.add(relax.op.add(relax.op.nn.gelu(h), relax.op.nn.gelu_tanh(h)),
                            relax.op.add(relax.op.nn.softmax(h, axis=-1), relax.op.tanh(relax.op.exp(
                                relax.op.multiply(h, relax.const(-0.1, "float32"))))))

    mod = _module([(16, 32), (32, 48)], body)
    with TARGET:
        fast = schedule.fuse(TARGET, fast_math=True)(mod)
        exact = schedule.fuse(TARGET)(mod)
    calls = lambda m: set(re.findall(r"T\.(erf|tanh|exp)\(", m.script()))   # noqa: E731
    assert calls(exact) == {"erf", "tanh", "exp"} and calls(fast) == set()
    rng = np.random.default_rng(0)
    args = [rng.standard_normal((16, 32)).astype("float32"), rng.standard_normal((32, 48)).astype("float32")]
    outs = []
    for fm in (False, True):
        ex = tvm.compile(mod, target=TARGET, relax_pipeline=schedule.pipeline(TARGET, fast_math=fm))
        vm = relax.VirtualMachine(ex, tvm.cpu())
        outs.append(vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy())
    err = np.linalg.norm(outs[1] - outs[0]) / np.linalg.norm(outs[0])
    assert 0 < err < 1e-5, err


def test_a_patchifying_conv_becomes_a_scheduled_matmul_and_other_convs_stay():
    """patch_convs_as_matmuls: conv2d with stride = kernel and no padding (a patch embedding) is
    rewritten to reshape / transpose / matmul, which the matmul rule schedules, within float error
    of TVM's conv; a padded 3x3 conv and a strided conv that overlaps its patches stay convs."""
    conv = lambda **kw: (lambda x, w: relax.op.nn.conv2d(x, w, **kw))      # noqa: E731
    patch = _module([(2, 3, 32, 48), (16, 3, 8, 8)], conv(strides=8))
    rewritten = schedule.patch_convs_as_matmuls()(patch)
    assert "conv2d" not in rewritten["main"].script() and "R.matmul" in rewritten["main"].script()
    with TARGET:
        funcs = _primfuncs(schedule.default_schedule()(schedule.fuse(TARGET)(patch)))
    assert not [n for n in funcs if "conv" in n]
    assert any("matmul" in n and f.attrs["tirx.is_scheduled"] for n, f in funcs.items())
    ref, got = _run_both(patch, [(2, 3, 32, 48), (16, 3, 8, 8)])
    assert got.shape == ref.shape == (2, 16, 4, 6)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    for keep in (_module([(1, 3, 16, 16), (4, 3, 3, 3)], conv(padding=1)),
                 _module([(1, 3, 16, 16), (4, 3, 4, 4)], conv(strides=2))):
        assert "conv2d" in schedule.patch_convs_as_matmuls()(keep)["main"].script()


def _through_memory_planning(mod, target=TARGET):
    """`mod` as pared's pipeline leaves it right after TVM's StaticPlanBlockMemory."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    with target:
        mod = schedule.default_schedule()(schedule.fuse(target)(mod))
        return tvm.transform.Sequential(cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target)[:1])(mod)


def _memory_calls(func):
    names = []
    tvm.relax.analysis.post_order_visit(func.body, lambda e: names.append(e.op.name) if isinstance(
        e, relax.Call) and getattr(e.op, "name", "").startswith("relax.memory.alloc") else None)
    return names


def _chain(x, w1, w2, w3):
    """Intermediates for the memory planner, and an output that is a reshape of a computed tensor."""
    h = relax.op.nn.gelu(relax.op.matmul(x, w1))
    h = relax.op.add(relax.op.multiply(h, h), relax.op.matmul(h, w2))
    y = relax.op.matmul(h, w3)
    return relax.Tuple([relax.op.reshape(y, (8, 2, 8)), relax.op.sum(h)])


def test_hoisted_workspace_is_allocated_once_and_reused_by_every_call():
    shapes = [(8, 16), (16, 32), (32, 32), (32, 16)]
    mod = _module(shapes, _chain)
    planned = _through_memory_planning(mod)
    views = _memory_calls(planned["main"]).count("relax.memory.alloc_tensor")
    assert views >= 2
    load = {}
    hoisted = schedule.hoist_workspace(load)(planned)
    assert load == {"workspace": schedule.WORKSPACE}
    main, ws = hoisted["main"], hoisted[schedule.WORKSPACE]
    # main allocates no planned intermediate any more; each became a trailing parameter, and the
    # workspace function allocates the same views
    assert _memory_calls(main) == []
    assert len(main.params) == len(shapes) + views
    assert _memory_calls(ws).count("relax.memory.alloc_tensor") == views and not ws.params
    assert [str(p.ty) for p in main.params[len(shapes):]] == [str(f) for f in ws.ret_ty.fields]
    # without `load` (callers that run main themselves) main keeps its signature
    with TARGET:
        plain_build = tvm.compile(mod, target=TARGET, relax_pipeline=schedule.pipeline(TARGET))
        load = {}
        build = tvm.compile(mod, target=TARGET, relax_pipeline=tvm.transform.Sequential(
            [schedule.fuse(TARGET), schedule.finish(TARGET, load=load)]))
    assert load == {"workspace": schedule.WORKSPACE}
    dev = tvm.cpu(0)
    rng = np.random.default_rng(0)
    ref_vm, vm = relax.VirtualMachine(plain_build, dev), relax.VirtualMachine(build, dev)
    workspace = list(vm[schedule.WORKSPACE]())
    assert len(workspace) == views
    w = [tvm.runtime.tensor(rng.standard_normal(s).astype("float32")) for s in shapes[1:]]
    first = None
    for _ in range(3):
        x = tvm.runtime.tensor(rng.standard_normal(shapes[0]).astype("float32"))
        want = [o.numpy() for o in ref_vm["main"](x, *w)]
        got = vm["main"](x, *w, *workspace)
        for g, r in zip(got, want):
            np.testing.assert_array_equal(g.numpy(), r)       # same kernels, same order: bit for bit
        if first is None:
            first, first_values = got, [o.numpy() for o in got]
    # what a call returned is its own memory: the later calls through the same workspace left it alone
    for g, r in zip(first, first_values):
        np.testing.assert_array_equal(g.numpy(), r)


def test_workspace_leaves_symbolic_intermediates_per_call():
    n = tvm.tirx.Var("n", "int64")
    mod = _module([(n, 16), (16, 32), (32, 16)], lambda x, w1, w2: relax.op.matmul(
        relax.op.nn.gelu(relax.op.matmul(x, w1)), w2))
    hoisted = schedule.hoist_workspace({})(_through_memory_planning(mod))
    assert schedule.WORKSPACE not in [gv.name_hint for gv in hoisted.get_global_vars()]
    load = {}
    with TARGET:
        build = tvm.compile(mod, target=TARGET, relax_pipeline=tvm.transform.Sequential(
            [schedule.fuse(TARGET), schedule.finish(TARGET, load=load)]))
    assert load == {}
    vm = relax.VirtualMachine(build, tvm.cpu(0))
    rng = np.random.default_rng(1)
    w1, w2 = rng.standard_normal((16, 32)).astype("float32"), rng.standard_normal((32, 16)).astype("float32")
    for rows in (3, 5):
        x = rng.standard_normal((rows, 16)).astype("float32")
        got = vm["main"](*(tvm.runtime.tensor(a) for a in (x, w1, w2))).numpy()
        h = x @ w1
        want = (0.5 * h * (1 + np.vectorize(__import__("math").erf)(h / np.sqrt(2)))) @ w2
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
