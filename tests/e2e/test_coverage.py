"""Third-party architectures the plain dynamo exporter stops on, one op each (issue 19): tiny
configurations with random weights, captured, lowered to `cpu` with an empty pipeline, then
run torch-free on fresh inputs and compared with eager (rel L2 <= 1e-4).

    PixArt-α (diffusers)      prims.view_of            backends/onnxruntime/translations.py
    Wan 2.1 (diffusers)       aten.empty_permuted
    Mixtral, Qwen3-MoE        transformers.grouped_mm_fallback (routing differs per input)
    LLaVA (transformers)      aten._is_all_true, and outputs that are None
"""
import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree

import pared
from pared.testing import assert_close_to_eager, run_torch_free


def _pixart():
    from diffusers import PixArtTransformer2DModel
    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                 num_layers=2, cross_attention_dim=32, sample_size=8, patch_size=2,
                                 caption_channels=24, norm_type="ada_norm_single", use_additional_conditions=False)

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(2, 4, 8, 8, generator=g),), {
            "encoder_hidden_states": torch.randn(2, 5, 24, generator=g),
            "timestep": torch.randint(0, 1000, (2,), generator=g), "return_dict": False}
    return m, inputs


def _wan():
    from diffusers import WanTransformer3DModel
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                              out_channels=4, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(1, 4, 2, 8, 8, generator=g), torch.randint(0, 1000, (1,), generator=g),
                torch.randn(1, 5, 24, generator=g)), {"return_dict": False}
    return m, inputs


def _token_inputs(vocab):
    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        return (torch.randint(0, vocab, (2, 16), generator=g),), {"use_cache": False}
    return inputs


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64)
    return MixtralForCausalLM(cfg), _token_inputs(64)


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                         num_experts_per_tok=2, head_dim=8, max_position_embeddings=64)
    return Qwen3MoeForCausalLM(cfg), _token_inputs(64)


def _llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=7)
    text = LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=79, projector_hidden_act="gelu",
                      vision_feature_layer=-1)

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 70, (1, 24), generator=g)
        ids[0, 2:18] = 79                                   # 16 image tokens: (28 / 7)^2 patches
        return (), {"input_ids": ids, "pixel_values": torch.randn(1, 3, 28, 28, generator=g), "use_cache": False,
                    "return_dict": False}
    return LlavaForConditionalGeneration(cfg), inputs


MODELS = {"pixart_alpha": _pixart, "wan21": _wan, "mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "llava": _llava}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_lowers_to_onnx_runtime_and_runs_torch_free(name, tmp_path):
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    model = model.eval()
    args, kwargs = inputs(0)
    opt = pared.optimize(model, args, kwargs=kwargs, target="cpu", bench_repeats=1)
    assert opt.report["fidelity"]["rel_l2_max"] <= 1e-4
    path = opt.save(str(tmp_path / "artifact"))
    fresh_args, fresh_kwargs = inputs(1)                  # other values: for the MoEs, another routing
    with torch.no_grad():
        expected = model(*fresh_args, **fresh_kwargs)
    flat_in = [t.numpy() for t in pytree.tree_leaves((fresh_args, fresh_kwargs)) if isinstance(t, torch.Tensor)]
    np.savez(tmp_path / "in.npz", *flat_in)
    run_torch_free(f"""
        import numpy as np, pared
        ex = pared.load({path!r})
        data = np.load({str(tmp_path / 'in.npz')!r})
        flat = ex.run_flat(*[data[f"arr_{{i}}"] for i in range(len(data.files))])
        np.savez({str(tmp_path / 'out.npz')!r}, *flat)
    """)
    got = np.load(tmp_path / "out.npz")
    flat = [got[f"arr_{i}"] for i in range(len(got.files))]
    want = [x for x in pytree.tree_leaves(expected) if x is not None]
    assert_close_to_eager(want, flat, rel_l2=1e-4, what=f"{name} (fresh inputs, torch-free)")


def _flux(dual: int, single: int):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=dual, num_single_layers=single,
                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                               pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)).eval()
    g = torch.Generator().manual_seed(0)
    kw = {"hidden_states": torch.randn(1, 16, 16, generator=g), "encoder_hidden_states": torch.randn(1, 5, 24, generator=g),
          "pooled_projections": torch.randn(1, 16, generator=g), "timestep": torch.tensor([0.5]),
          "img_ids": torch.randn(16, 3, generator=g), "txt_ids": torch.zeros(5, 3), "return_dict": False}
    return m, kw


@pytest.mark.slow
@pytest.mark.parametrize("dual,single,stack", [(2, 4, "single_transformer_blocks"), (4, 2, "transformer_blocks"),
                                               (2, 1, "transformer_blocks")])
def test_cache_passes_take_a_stack_of_a_two_stack_model_by_default(dual, single, stack):
    """Flux: dual-stream blocks, then single-stream ones. The default stack is the largest with a
    residual path; a short stack is cached whole (it once gave "block range is empty"); the
    first call computes every block, so it equals eager."""
    from pared.ir.capture import capture
    from pared.ir.transform import PassContext
    from pared.registry import get_pass
    m, kw = _flux(dual, single)
    prog = capture(m, (), kwargs=kw)
    n = dual if stack == "transformer_blocks" else single
    want = [f"{stack}.{i}" for i in (range(n) if n < 3 else range(1, n - 1))]
    for name in ("interval_cache", "taylor_cache"):
        res = get_pass(name)(steps=4)(prog, PassContext())
        (span,) = res.program.records["CachePlan"].spans
        assert list(span.blocks) == want, (name, span.blocks)
        flat = [t for t in pytree.tree_leaves(((), kw)) if isinstance(t, torch.Tensor)]
        with torch.no_grad():
            assert_close_to_eager(m(**kw), res.program.runner()(flat), rel_l2=1e-5, what=f"{name}, first call")
