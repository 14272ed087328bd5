"""The trained dit_mnist in diffusers' own DiTPipeline (examples/dit_mnist/pipeline.py): the
pipeline's loop (its DDIM scheduler, its classifier-free guidance, 50 steps) generates digits the
judge reads, and pared.integrations.diffusers.optimize_pipeline, calibrated by that loop, gives
back the same pipeline running a cached artifact that generates nearly the same digits.

Heavy: three generations of 10 digits per arm, DDIM-50 with CFG (about a minute)."""
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from pared.analysis.metrics import psnr_db  # noqa: E402
from pared.integrations import diffusers as pd  # noqa: E402
from pared.workloads import example_module  # noqa: E402

pytestmark = pytest.mark.heavy

LABELS = list(range(10))
CALL = {"class_labels": LABELS, "num_inference_steps": 50, "guidance_scale": 1.5}
SEEDS = (11, 12, 13)            # held out: calibration runs seed 0


def _generate(pipe, seed: int) -> np.ndarray:
    with torch.no_grad():
        img = pipe(**CALL, generator=torch.Generator().manual_seed(seed), output_type="np").images
    return img.transpose(0, 3, 1, 2)                          # [B, 1, 16, 16] in [0, 1]


def _score(images: list[np.ndarray]) -> float:
    judge = example_module("judge")
    return judge.score(np.concatenate(images), np.tile(LABELS, len(images)))["accuracy"]


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_the_trained_dit_in_dits_pipeline_generates_digits_and_stays_so_when_cached(one_thread):
    pl = example_module("dit_mnist", "pipeline.py")
    pipe = pl.dit_pipeline()
    eager = [_generate(pipe, s) for s in SEEDS]
    acc_eager = _score(eager)
    assert acc_eager >= 0.8, f"the judge reads {acc_eager:.2f} of the eager pipeline's digits"
    denoiser = pipe.transformer
    pd.optimize_pipeline(pipe, calibration=[{**CALL, "seed": 0}],
                         pipeline=[{"taylor_cache": {"steps": 50, "interval": 3}}], target="cpu",
                         allow_fidelity_loss=True, bench_repeats=1)
    assert pipe.transformer is not denoiser
    cached = [_generate(pipe, s) for s in SEEDS]
    trace = [g for call in pipe.transformer.executor.graph_trace for g in call]
    assert len(trace) == 50 and 0 < sum(g.endswith(".forecast") for g in trace) < 50, trace
    acc_cached = _score(cached)
    psnr = psnr_db(np.concatenate(eager), np.concatenate(cached))
    assert acc_cached >= acc_eager - 0.1, (acc_cached, acc_eager)
    assert psnr >= 20.0, psnr
    # the reuse does change the samples: not the eager pipeline under another name
    assert float(np.abs(np.concatenate(eager) - np.concatenate(cached)).max()) > 1e-3
