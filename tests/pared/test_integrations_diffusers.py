"""pared.integrations.diffusers on a tiny DiTPipeline (random weights, no downloads): the
pipeline calibrates, the denoiser is replaced by the artifact, and generation matches."""
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import pared  # noqa: E402
from pared.integrations import diffusers as pd  # noqa: E402

STEPS = 4
CALL = {"class_labels": [1, 3], "num_inference_steps": STEPS, "guidance_scale": 1.5}


def _pipe():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                        num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                        norm_type="ada_norm_zero").eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        layers_per_block=1, norm_num_groups=4, sample_size=8).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, seed=5, **call):
    with torch.no_grad():
        return pipe(**{**CALL, **call}, generator=torch.Generator().manual_seed(seed), output_type="np").images


@pytest.mark.slow
def test_the_empty_pipeline_generates_what_the_eager_pipeline_does(tmp_path):
    pipe = _pipe()
    want = _images(pipe)
    denoiser = pipe.transformer
    before = {k: v.clone() for k, v in denoiser.state_dict().items()}
    opt = pd.optimize_pipeline(pipe, calibration=[CALL], target="cpu", bench_repeats=1)
    assert pipe.transformer is not denoiser and type(pipe).__name__ == "ParedDiTPipeline"
    got = _images(pipe)                            # the denoiser's 4 calls (CFG doubles the batch) from the artifact
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in denoiser.state_dict().items())   # the user's module untouched
    # saved, then loaded into a fresh pipeline
    path = opt.save(str(tmp_path / "dit"))
    fresh = pd.use_artifact(_pipe(), path)
    np.testing.assert_allclose(_images(fresh), want, atol=1e-4)
    with pytest.raises(ValueError, match="must have shape"):
        _images(fresh, class_labels=[1, 3, 5])     # another batch than the calibration's: refused by name


@pytest.mark.slow
def test_a_cache_pass_calibrated_by_the_pipeline_reuses_inside_each_generation():
    pipe = _pipe()
    want = _images(pipe)
    opt = pd.optimize_pipeline(pipe, calibration=[CALL, {**CALL, "class_labels": [2, 7]}], target="cpu",
                               pipeline=[{"interval_cache": {"interval": 2, "steps": STEPS}}],
                               allow_fidelity_loss=True, bench_repeats=1)
    assert set(opt.program.graphs) == {"main.full", "main.reuse"}
    got = _images(pipe)
    trace = pipe.transformer.executor.graph_trace
    assert [g for call in trace for g in call] == ["main.full", "main.reuse", "main.full", "main.reuse"]
    # the artifact computes what the rewritten program computes, call for call, through the same pipeline
    runner = opt.program.runner()
    ref = pd._Calling(pipe.transformer._denoiser, lambda *flat: runner(list(flat)))
    with pd._denoiser_as(pipe, "transformer", ref):
        emulated = _images(pipe)
    np.testing.assert_allclose(got, emulated, atol=1e-4)
    assert 0 < float(np.abs(got - want).max())     # reuse changed the sample, within the images' range
    again = _images(pipe)                          # a second generation starts a fresh request
    np.testing.assert_allclose(again, got, atol=1e-6)


def test_a_pipeline_without_a_denoiser_or_calibration_is_refused():
    with pytest.raises(ValueError, match="no denoiser module under transformer or unet"):
        pd.denoiser_name(object())
    with pytest.raises(ValueError, match="at least one calibration request"):
        pd.optimize_pipeline(object(), calibration=[])
