"""End to end, per model and target: optimize (empty pipeline) -> save -> load in a
process where torch cannot be imported -> same numbers as eager (rel L2 <= 1e-4)."""
import os

import numpy as np
import pytest
import torch

import pared
from pared.workloads import example_module
from pared.testing import assert_close_to_eager, run_torch_free, tiny_transformer

HERE = os.path.dirname(os.path.abspath(__file__))


def _dit():
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                              num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                              norm_type="ada_norm_zero").eval()
    args = (torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 3]))
    fresh = (torch.randn(2, 4, 8, 8), torch.tensor([999, 0]), torch.tensor([7, 0]))
    return m, args, {"return_dict": False}, fresh


def _vit():
    from transformers import ViTConfig, ViTModel
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=28, patch_size=4, num_channels=1)
    m = ViTModel(cfg).eval()
    return m, (torch.randn(2, 1, 28, 28),), {}, (torch.randn(2, 1, 28, 28),)


def _tiny():
    m, (ids,) = tiny_transformer()
    return m, (ids,), {}, (torch.randint(0, 50, (2, 16)),)


def _minilm():
    # by path, under its own module name: a bare `import model` would take whichever example's
    # model.py an earlier test in this worker imported first
    mini = example_module("minilm")
    ids, mask = mini.tokenize(mini.SENTENCES)
    hid, hmask = mini.tokenize(mini.HELD_OUT)
    return mini.build_model(), (ids, mask), {}, (hid, hmask)


MODELS = {"tiny_transformer": _tiny, "dit": _dit, "vit": _vit, "minilm": _minilm}
CASES = [pytest.param(name, target, marks=[pytest.mark.slow] if (target != "cpu" or name == "minilm") else [])
         for name in MODELS for target in ("cpu", "tvm-cpu")]


@pytest.mark.parametrize("name,target", CASES)
def test_optimize_save_load_torch_free(name, target, tmp_path):
    model, args, kwargs, fresh = MODELS[name]()
    opt = pared.optimize(model, args, kwargs=kwargs, target=target, bench_repeats=2)
    assert opt.report["fidelity"]["rel_l2_max"] <= 1e-4
    path = opt.save(str(tmp_path / "artifact"))
    with torch.no_grad():
        expected = model(*fresh, **kwargs)
    np.savez(tmp_path / "in.npz", *[t.numpy() for t in fresh])
    run_torch_free(f"""
        import numpy as np, pared
        ex = pared.load({path!r})
        data = np.load({str(tmp_path / 'in.npz')!r})
        flat = ex.run_flat(*[data[f"arr_{{i}}"] for i in range(len(data.files))])
        np.savez({str(tmp_path / 'out.npz')!r}, *flat)
    """)
    got = np.load(tmp_path / "out.npz")
    flat = [got[f"arr_{i}"] for i in range(len(got.files))]
    assert_close_to_eager(expected, flat, rel_l2=1e-4, what=f"{name}/{target}")
