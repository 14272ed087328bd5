"""The shipped caching pipelines on the trained workloads, and the ones that compose
passes: optimize from the pipeline file, save, sample one DDIM-50 batch in a process
where torch cannot be imported, and match the torch-side run of the same program,
case for case (the trace of selects).

The composed pipelines are marked `heavy`: `make test` leaves them out (its budget),
`make test-heavy` runs them (CI runs both)."""
import json
import os

import numpy as np
import pytest
import torch

import pared
from pared.pipeline import build_passes, load_pipeline
from pared.ir.transform import capture_needs
from pared.workloads.samplers import NoiseSchedule, ddim_sample
from pared.analysis.metrics import psnr_db
from pared.testing import run_torch_free
from pared.workloads import EXAMPLES, DiTWorkload, example_module

SAMPLE = """
import json, sys
import numpy as np
import pared
from pared.workloads.samplers import NoiseSchedule, ddim_sample
a = json.loads({args!r})
ex = pared.load(a["artifact"])
x = ddim_sample(ex, (a["batch"], 1, a["size"], a["size"]), np.arange(a["batch"]) % 10,
                schedule=NoiseSchedule.linear(), steps=50, cfg_scale=a["cfg"], null_label=a["null"], seed=3)
np.save(a["out"], x)
print(json.dumps({{"trace": ex.trace, "torch_imported": "torch" in sys.modules}}))
"""


def _variants(graph, *names):
    return {f"{graph}.{n}" for n in names}


BUCKETS = [f"main.bucket{b}" for b in range(4)]
#: passes after which the artifact's arithmetic differs from the torch side's: integer kernels
#: (timestep_quant, quantize_linears) or weights dequantized by ORT's own ops (expert_quant)
QUANTIZING = ("timestep_quant", "quantize_linears", "expert_quant")
#: their samples against the torch side's (measured here: dit_full 38.5 dB, dit_cache_int8 38.9 dB)
QUANT_PSNR_DB = 33.0
#: DDIM steps of the calibration request where 50 is not needed: expert_quant replays it once per
#: expert and bit width (98 replays, 500 s of this test's 590 at 50 steps); its bits and
#: expert_cache's rule do not depend on the step count (no per-step table). The sampling compared
#: below stays DDIM-50.
CALIBRATION_STEPS = {"dit_moe_full.yaml": 10}


@pytest.mark.slow
@pytest.mark.parametrize("workload, pipeline, graphs", [
    ("dit_mnist", "dit_cache.yaml", _variants("main", "full0", "full", "forecast")),
    pytest.param("dit_moe_mnist", "dit_moe_cache.yaml", _variants("main", "probe", "full", "reuse"),
                 marks=pytest.mark.heavy),
    # composed: bins by t around a step table per bucket
    pytest.param("dit_mnist", "dit_full.yaml", set().union(*(_variants(b, "full0", "full", "forecast")
                                                            for b in BUCKETS)), marks=pytest.mark.heavy),
    # composed: a latch around two rules
    pytest.param("dit_mnist", "dit_guided_cache.yaml", set().union(*(_variants(f"main.{h}", "probe", "compute", "reuse")
                                                                   for h in ("both", "cond_only"))),
                 marks=pytest.mark.heavy),
    # composed: static INT8 over every variant of a cache pass
    pytest.param("dit_mnist", "dit_cache_int8.yaml", _variants("main", "full0", "full", "forecast"),
                 marks=pytest.mark.heavy),
    # composed: capacity dispatch, then expert-level caching with frozen routing
    pytest.param("dit_moe_mnist", "dit_moe_dispatch.yaml", _variants("main", "probe", "full", "reuse"),
                 marks=pytest.mark.heavy),
    # composed: expert-level bits, then expert-level caching
    pytest.param("dit_moe_mnist", "dit_moe_full.yaml", _variants("main", "probe", "full", "reuse"),
                 marks=pytest.mark.heavy),
])
def test_pipeline_artifact_samples_torch_free_like_the_torch_side(tmp_path, workload, pipeline, graphs):
    torch.set_num_threads(1)
    wl = DiTWorkload(workload, batch=10, samples=10, steps=CALIBRATION_STEPS.get(pipeline, 50))
    spec = load_pipeline(os.path.join(EXAMPLES, "pipelines", pipeline))
    passes = build_passes(spec)
    dyn = wl.dynamic_shapes() if "dynamic_batch" in capture_needs(passes) else None
    opt = pared.optimize(wl.build(), wl.example_inputs(), target=spec.target, pipeline=passes,
                         calibration=wl.calibration(), fidelity=spec.fidelity, bench_repeats=0, dynamic_shapes=dyn)
    assert set(opt.program.graphs) == graphs
    assert opt.report["fidelity"]["passed"]
    path = opt.save(str(tmp_path / "art"))

    mod = example_module(workload)
    out = str(tmp_path / "x.npy")
    args = json.dumps({"artifact": path, "out": out, "batch": 10, "size": mod.SIZE, "cfg": wl.cfg_scale,
                       "null": mod.NULL_LABEL})
    info = json.loads(run_torch_free(SAMPLE.format(args=args), timeout=600).strip().splitlines()[-1])
    assert info["torch_imported"] is False
    assert len(set(info["trace"])) >= 2                                  # it chose between variants

    runner = opt.program.runner()
    fn = lambda x, t, y: runner([torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)])[0].numpy()
    want = ddim_sample(fn, (10, 1, mod.SIZE, mod.SIZE), np.arange(10) % 10, schedule=NoiseSchedule.linear(),
                       steps=50, cfg_scale=wl.cfg_scale, null_label=mod.NULL_LABEL, seed=3)
    assert runner.trace == info["trace"]
    got = np.load(out)
    if not any(p.name in QUANTIZING for p in passes):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
        return
    # integer kernels: ORT rounds x / s where the torch side rounds x * (1 / s), and over 50
    # DDIM steps the codes that land on the other side of a rounding boundary drift the samples
    # apart (pared's own quantized ops that round like ORT are issue 14's item 4, not built yet);
    # the bound is on the whole batch (pixels in [-1, 1])
    psnr = psnr_db(want, got, peak=2.0)
    print(f"{pipeline}: artifact vs torch side {psnr:.1f} dB")
    assert psnr >= QUANT_PSNR_DB, psnr
