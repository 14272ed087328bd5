"""The two shipped caching pipelines (examples/pipelines/dit_cache.yaml and
dit_moe_cache.yaml) on the trained workloads: optimize from the pipeline file,
save, sample one DDIM-50 batch in a process where torch cannot be imported, and
match the torch-side run of the same cached program, routine for routine."""
import json
import os

import numpy as np
import pytest
import torch

import pared
from pared.pipeline import build_passes, load_pipeline
from pared.workloads.samplers import NoiseSchedule, ddim_sample
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


@pytest.mark.slow
@pytest.mark.parametrize("workload, pipeline, graphs", [
    ("dit_mnist", "dit_cache.yaml", {"full0", "full", "forecast"}),
    ("dit_moe_mnist", "dit_moe_cache.yaml", {"probe", "full", "reuse"}),
])
def test_pipeline_artifact_samples_torch_free_like_the_torch_side(tmp_path, workload, pipeline, graphs):
    torch.set_num_threads(1)
    wl = DiTWorkload(workload, batch=10, samples=10)
    spec = load_pipeline(os.path.join(EXAMPLES, "pipelines", pipeline))
    opt = pared.optimize(wl.build(), wl.example_inputs(), target=spec.target, pipeline=build_passes(spec),
                         calibration=wl.calibration(), fidelity=spec.fidelity, bench_repeats=0)
    assert set(opt.program.graphs) == graphs
    assert opt.report["fidelity"]["passed"]
    path = opt.save(str(tmp_path / "art"))

    mod = example_module(workload)
    out = str(tmp_path / "x.npy")
    args = json.dumps({"artifact": path, "out": out, "batch": 10, "size": mod.SIZE, "cfg": wl.cfg_scale,
                       "null": mod.NULL_LABEL})
    info = json.loads(run_torch_free(SAMPLE.format(args=args), timeout=600).strip().splitlines()[-1])
    assert info["torch_imported"] is False
    assert "full" in info["trace"] and len(set(info["trace"])) >= 2      # it cached, and recomputed

    runner = opt.program.runner()
    fn = lambda x, t, y: runner([torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)])[0].numpy()
    want = ddim_sample(fn, (10, 1, mod.SIZE, mod.SIZE), np.arange(10) % 10, schedule=NoiseSchedule.linear(),
                       steps=50, cfg_scale=wl.cfg_scale, null_label=mod.NULL_LABEL, seed=3)
    assert runner.trace == info["trace"]
    np.testing.assert_allclose(np.load(out), want, rtol=1e-3, atol=1e-3)
