"""timestep_quant (TFMQ-DM temporal features + per-step-bucket INT8): structure
(one set of int8 weights, a float t-path fed from a table with a row per step),
the schedule, numerics against eager over a whole sampler loop (lossy: bound
stated), the fallback for timesteps outside the table, integer kernels in every
variant, the torch-free artifact, per-bucket precision, no-op and bad options."""
import os

import numpy as np
import pytest
import torch
from torch import nn

import pared
from pared.backends.onnxruntime.lower import lower_graph
from pared.bench import param_bytes
from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.plan import Bins, Table
from pared.ir.program import Program, get_attr
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.passes.quant.common import activation_qparams
from pared.passes.quant.timestep_quant import TimestepQuantPlan, _t_only_nodes
from pared.testing import op_count, run_torch_free, tiny_dit, tiny_sampler_loop

STEPS = 8
BUCKETS = 4
#: the lossy bound on the loop's final sample, relative L2 against eager fp32
#: (measured: 0.0015 with 4 buckets)
REL_L2 = 0.02
#: the same bound for a 20-step request (2.5x the steps, each adding its rounding;
#: measured 0.032 with variants chosen by t)
STEPS_20_REL_L2 = 0.06
#: linears of TinyDiT off the t-path: embed, 2 per block (mlp.0, mlp.2), out
QUANTIZED = 1 + 2 * 6 + 1
CPU = {"name": "cpu", "backend": "onnxruntime", "threads": 1}


def _quantized(**opts):
    m, (x, t) = tiny_dit()
    prog = capture(m, (x, t))
    res = get_pass("timestep_quant")(**{"buckets": BUCKETS, **opts})(
        prog, PassContext(calibration=tiny_sampler_loop(x, STEPS)))
    return m, x, prog, res


def _rel_l2(ref, got):
    return float(torch.linalg.norm(ref - got) / torch.linalg.norm(ref))


def _consts(graph, suffix):
    gm = graph.module
    return {str(n.target): get_attr(gm, str(n.target)) for n in gm.graph.nodes
            if n.op == "get_attr" and str(n.target).endswith(suffix)}


def test_structure_shared_weights_float_t_path_and_a_row_per_step():
    m, x, prog, res = _quantized()
    before = prog.main.module.code
    p = res.program
    assert res.modified and set(p.graphs) == {f"main.bucket{b}" for b in range(BUCKETS)}
    assert res.stats["quantized"] == QUANTIZED and res.stats["temporal_layers"] == 8   # t_mlp x2, ada x6
    assert res.stats["timesteps"] == STEPS and res.stats["buckets"] == BUCKETS
    # every variant: a quantizer pair per layer; the same int8 weight tensors (one copy, not one per variant)
    ptrs = []
    for name, g in p.graphs.items():
        assert op_count(p, "quantized_decomposed.quantize_per_tensor", name) == QUANTIZED
        ws = _consts(g, "_w")
        assert len(ws) == QUANTIZED and all(w.dtype == torch.int8 for w in ws.values())
        ptrs.append(sorted(w.data_ptr() for w in ws.values()))
    assert all(pt == ptrs[0] for pt in ptrs)
    # 4 variants hold one variant's constants plus, per extra variant, only its int32 biases and their
    # scales s_x * s_w (they follow the bucket's activation scale)
    one = param_bytes(Program.single(p.graphs["main.bucket0"]))
    per_variant = sum(v.numel() * v.element_size() for sfx in ("_b", "_bs")
                      for v in _consts(p.graphs["main.bucket0"], sfx).values())
    assert param_bytes(p) == one + (BUCKETS - 1) * per_variant
    # the t-path: no quantizer on any node that depends on t alone, and its linears stay float
    for g in p.graphs.values():
        t_only = _t_only_nodes(g.module, next(n for n in g.module.graph.nodes if n.name == "t"))
        nodes = {n.name: n for n in g.module.graph.nodes}
        assert not any(str(nodes[n].target).startswith("quantized_decomposed") for n in t_only)
    # the table: a row per step, its timesteps those of the loop; one table object for every variant
    rec = p.records["TimestepQuantPlan"]
    assert isinstance(rec, TimestepQuantPlan)
    np.testing.assert_allclose(rec.timesteps, torch.linspace(900, 0, STEPS).numpy(), rtol=1e-6)
    tables = [_consts(g, "_table_0")["_tsq_table_0"] for g in p.graphs.values()]
    assert tables[0].shape[0] == STEPS and all(tb is tables[0] for tb in tables)
    assert len(rec.temporal) == 3 * 6             # shift, 1 + scale and gate of each block's adaLN
    assert sorted(rec.temporal_layers) == sorted([f"blocks.{i}.ada" for i in range(6)] + ["t_mlp.0", "t_mlp.2"])
    # the input program is left alone
    assert prog.main.module.code == before and set(prog.graphs) == {"main"} and "TimestepQuantPlan" not in prog.records
    rec.to_json()


def test_schedule_runs_each_bucket_at_its_steps_with_its_own_scales():
    m, x, prog, res = _quantized()
    p = res.program
    want = tuple(f"bucket{i * BUCKETS // STEPS}" for i in range(STEPS))
    rec = p.records["TimestepQuantPlan"]
    # chosen by t: the sampler runs t = 900 .. 0, so bucket0 holds the highest timesteps
    sel = p.plan.body.selector
    assert isinstance(sel, Bins) and sel.input == "in:t" and rec.select == "timestep"
    assert sel.cases == tuple(reversed([f"bucket{b}" for b in range(BUCKETS)]))
    assert rec.schedule == want and len(rec.edges) == BUCKETS - 1
    for (lo_a, hi_a), (lo_b, hi_b), edge in zip(rec.t_ranges[1:], rec.t_ranges, reversed(rec.edges)):
        assert hi_a < edge < lo_b                  # each edge lies between two buckets' timesteps
    runner = p.runner()
    tiny_sampler_loop(x, STEPS)(lambda *a: runner(list(a))[0])
    assert runner.trace == list(want)
    # each bucket's scale for blocks.3.mlp.0 is the range of that layer's input over its own steps
    seen = []
    hook = m.blocks[3].mlp[0].register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        tiny_sampler_loop(x, STEPS)(m)
    hook.remove()
    rec = p.records["TimestepQuantPlan"]
    scales = []
    for b in rec.buckets:
        vals = seen[b.first_step:b.last_step + 1]
        lq = next(lq for lq in b.layers if lq.region == "blocks.3.mlp.0")
        s, z = activation_qparams(min(float(v.min()) for v in vals), max(float(v.max()) for v in vals))
        assert lq.activation_scale == pytest.approx(s, rel=1e-6) and lq.activation_zero_point == z
        scales.append(s)
    assert len(set(scales)) == BUCKETS            # the ranges drift across steps


def test_another_step_count_gets_the_bucket_of_its_timesteps():
    m, x, prog, res = _quantized()
    rec = res.program.records["TimestepQuantPlan"]
    runner = res.program.runner()
    steps = 20
    loop = tiny_sampler_loop(x, steps)
    got = loop(lambda *a: runner(list(a))[0])
    # each call runs the bucket whose calibrated timestep range is nearest its t
    for t, chosen in zip(torch.linspace(900, 0, steps).tolist(), runner.trace):
        dist = [0.0 if lo <= t <= hi else min(abs(t - lo), abs(t - hi)) for lo, hi in rec.t_ranges]
        assert chosen == rec.buckets[int(np.argmin(dist))].graph, t
    assert runner.trace[0] == "bucket0" and runner.trace[-1] == f"bucket{BUCKETS - 1}"
    with torch.no_grad():
        ref = loop(m)
    # by call index, the 20-step request would run bucket3 (t <= 128) from its 8th call (t = 521) on
    _, _, _, by_call = _quantized(select="call")
    assert isinstance(by_call.program.plan.body.selector, Table)
    assert by_call.program.records["TimestepQuantPlan"].select == "call"
    runner = by_call.program.runner()
    got_by_call = loop(lambda *a: runner(list(a))[0])
    assert runner.trace[7:] == ["bucket3"] * (steps - 7)
    print("rel L2 over 20 steps: by t", _rel_l2(ref, got), "by call", _rel_l2(ref, got_by_call))
    assert _rel_l2(ref, got) < STEPS_20_REL_L2


def test_select_timestep_needs_disjoint_timestep_ranges():
    m, (x, t) = tiny_dit()

    def two_requests(fn):                        # one calibration run, two samplers back to back
        tiny_sampler_loop(x, 4)(fn)
        return tiny_sampler_loop(x, 4)(fn)
    with pytest.raises(PassError, match="option 'select' is 'timestep' but the calibration steps of bucket 0 .* "
                                        "overlap.*select: call"):
        get_pass("timestep_quant")(buckets=2)(capture(m, (x, t)), PassContext(calibration=two_requests))


def test_numerics_over_the_sampler_loop_within_the_stated_bound():
    m, x, prog, res = _quantized()
    runner = res.program.runner()
    loop = tiny_sampler_loop(x, STEPS)
    got = loop(lambda *a: runner(list(a))[0])
    with torch.no_grad():
        ref = loop(m)
    err = _rel_l2(ref, got)
    assert 1e-6 < err < REL_L2                   # lossy, within the bound


def test_a_timestep_outside_the_table_takes_the_float_t_path():
    # every linear left float: what remains is the table and its fallback, exact against eager
    m, x, prog, res = _quantized(buckets=1, exclude="**")
    assert res.modified and res.stats["quantized"] == 0 and res.stats["temporal"] == 18
    assert set(res.program.graphs) == {"main"} and res.program.plan == prog.plan     # one bucket: one graph
    g = res.program.main
    with torch.no_grad():
        # 450 lies between the table's 514.3 and 385.7: row 0 is in the table, row 1 is not
        t = torch.tensor([900.0, 450.0])
        got, ref = g.run(x, t)[0], m(x, t)
        nearest = m(x, torch.tensor([900.0, 514.2857]))
        in_table = g.run(x, torch.tensor([514.2857, 0.0]))[0], m(x, torch.tensor([514.2857, 0.0]))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(*in_table, rtol=1e-5, atol=1e-6)
    assert _rel_l2(ref[1], nearest[1]) > 1e-3          # the nearest row would have been wrong


def test_every_variant_runs_integer_kernels_in_ort(tmp_path):
    m, x, prog, res = _quantized(buckets=2)
    for name, g in res.program.graphs.items():
        entry = lower_graph(g, name, CPU, str(tmp_path))
        assert entry["int8"]["integer_ops"] == {"QGemm": QUANTIZED}, name
        assert entry["int8"]["dq_into_float_matmul"] == []


def test_artifact_runs_the_schedule_torch_free_and_matches_torch(tmp_path):
    m, (x, t) = tiny_dit()
    loop = tiny_sampler_loop(x, STEPS)
    opt = pared.optimize(m, (x, t), pipeline=[{"timestep_quant": {"buckets": 2}}], calibration=loop,
                         bench_repeats=0, allow_fidelity_loss=True)
    path = opt.save(str(tmp_path / "art"))
    np.save(tmp_path / "x.npy", x.numpy())
    out = run_torch_free(f"""
        import numpy as np, pared, sys
        ex = pared.load({path!r})
        x = np.load({str(tmp_path / 'x.npy')!r})
        for t in np.linspace(900, 0, {STEPS}, dtype=np.float32):
            x = x - np.float32(0.1) * ex(x, np.full((x.shape[0],), t, np.float32))
        assert "torch" not in sys.modules
        np.save({str(tmp_path / 'y.npy')!r}, x)
        print(",".join(ex.trace))
        print(ex.manifest["records"]["TimestepQuantPlan"]["method"])
    """)
    trace, method = out.strip().splitlines()[-2:]
    assert trace.split(",") == list(opt.program.records["TimestepQuantPlan"].schedule) and method == "timestep_quant"
    # the variants' int8 weights are stored once: each file points into shared.weights at the same offset
    import onnx
    where = {}
    for name in opt.program.graphs:
        model = onnx.load(os.path.join(path, f"{name}.onnx"), load_external_data=False)
        for init in model.graph.initializer:
            if init.data_type == onnx.TensorProto.INT8 and np.prod(init.dims) >= 1024:
                assert init.data_location == onnx.TensorProto.EXTERNAL, (name, init.name)
                where.setdefault(init.name, set()).add(tuple((e.key, e.value) for e in init.external_data))
    assert len(where) == 12 and all(len(v) == 1 for v in where.values())     # mlp.0 and mlp.2 of 6 blocks
    runner = opt.program.runner()
    want = loop(lambda *a: runner(list(a))[0])
    got = torch.from_numpy(np.load(tmp_path / "y.npy"))
    # ORT's integer kernels round like the torch graph up to values on a rounding boundary
    assert _rel_l2(want, got) < 1e-2
    with torch.no_grad():
        assert _rel_l2(loop(m), got) < REL_L2


def test_float_blocks_keeps_the_most_changing_block_float_per_bucket():
    m, x, prog, res = _quantized(float_blocks=1)
    rec = res.program.records["TimestepQuantPlan"]
    for b in rec.buckets:
        change = dict(b.block_change)
        assert len(change) == 6 and b.float_blocks == (max(change, key=change.get),)
        assert len(b.layers) == QUANTIZED - 2
        assert not any(lq.region.startswith(b.float_blocks[0] + ".") for lq in b.layers)
    assert res.stats["float_layers"] == 2 * BUCKETS


def test_no_linears_and_no_t_path_is_a_no_op():
    class Plain(nn.Module):
        def forward(self, x, t):
            return x * 2 + t[:, None]
    x = torch.randn(2, 4)
    prog = capture(Plain(), (x, torch.ones(2)))
    res = get_pass("timestep_quant")()(prog, PassContext(calibration=[(x, torch.ones(2))]))
    assert res.modified is False and res.program is prog and res.stats["quantized"] == 0


def test_running_twice_finds_nothing_more():
    m, x, prog, res = _quantized(buckets=1)
    again = get_pass("timestep_quant")(buckets=1)(res.program, PassContext(calibration=tiny_sampler_loop(x, STEPS)))
    assert again.modified is False and again.program is res.program


def test_running_twice_finds_nothing_more_on_the_variants():
    m, x, prog, res = _quantized()
    again = get_pass("timestep_quant")()(res.program, PassContext(calibration=tiny_sampler_loop(x, STEPS)))
    assert again.modified is False and again.program is res.program


def test_after_a_cache_pass_is_refused_by_meaning():
    m, x, prog, res = _quantized(buckets=1)
    cached = get_pass("interval_cache")(interval=2, steps=STEPS)(res.program, PassContext()).program
    with pytest.raises(PassError, match="pass 'timestep_quant' calibrates activation ranges per step of the model's "
                                        "one graph .*'main.full'.* chosen by interval_cache. Run timestep_quant first"):
        get_pass("timestep_quant")()(cached, PassContext(calibration=tiny_sampler_loop(x, STEPS)))


@pytest.mark.parametrize("opts, message", [
    ({"buckets": 0}, "option 'buckets' must be in \\[1, inf\\]"),
    ({"float_blocks": -1}, "option 'float_blocks' must be in \\[0, inf\\]"),
    ({"tolerance": -1.0}, "option 'tolerance' must be in \\[0, inf\\]"),
    ({"bucket": 2}, "unknown option 'bucket'; did you mean 'buckets'"),
    ({"method": "entropy"}, "option 'method' expects"),
    ({"select": "step"}, "option 'select' expects"),
])
def test_bad_options(opts, message):
    with pytest.raises(OptionError, match=f"pass 'timestep_quant'.*{message}"):
        get_pass("timestep_quant")(**opts)


def test_options_checked_against_the_program():
    with pytest.raises(OptionError, match="pass 'timestep_quant': option 'timestep': the program has no input "
                                          "'tt'; did you mean 't'"):
        _quantized(timestep="tt")
    with pytest.raises(OptionError, match="pass 'timestep_quant': option 'buckets' \\(9\\) exceeds the 8 calls"):
        _quantized(buckets=9)
    m, (x, t) = tiny_dit()
    with pytest.raises(PassError, match="pass 'timestep_quant' needs a calibration run"):
        get_pass("timestep_quant")()(capture(m, (x, t)), PassContext())


def test_pipeline_files_build():
    from pared.pipeline import build_passes, load_pipeline
    from pared.workloads import EXAMPLES
    passes = build_passes(load_pipeline(os.path.join(EXAMPLES, "pipelines", "dit_int8.yaml")))
    q = next(p for p in passes if p.name == "timestep_quant")
    assert q.options.buckets == 4 and "dit.transformer_blocks.*.norm1.linear" in q.options.exclude
    # quantization + caching: one bucket keeps one graph, which taylor_cache needs
    names = [p.name for p in build_passes(load_pipeline(os.path.join(EXAMPLES, "pipelines", "dit_full.yaml")))]
    assert names.index("timestep_quant") < names.index("taylor_cache")


def test_one_bucket_then_a_cache_pass():
    m, (x, t) = tiny_dit()
    ctx = PassContext(calibration=tiny_sampler_loop(x, STEPS))
    q = get_pass("timestep_quant")(buckets=1)(capture(m, (x, t)), ctx).program
    q = get_pass("temporal_redundancy")()(q, ctx).program
    res = get_pass("interval_cache")(interval=2)(q, ctx)
    assert res.modified and set(res.program.graphs) == {"main.full", "main.reuse"}
    assert op_count(res.program, "quantized_decomposed.quantize_per_tensor", "main.full") == QUANTIZED
    runner = res.program.runner()
    got = tiny_sampler_loop(x, STEPS)(lambda *a: runner(list(a))[0])
    with torch.no_grad():
        assert _rel_l2(tiny_sampler_loop(x, STEPS)(m), got) < 0.1     # int8 and every other step reused
