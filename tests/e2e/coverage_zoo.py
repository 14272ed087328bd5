"""Tiny configurations of third-party architectures, random weights, no downloads: the
coverage suite's models (tests/e2e/test_coverage.py).

ZOO: name -> (family, build): build() returns (model in eval mode, inputs) and inputs(seed)
returns (args, kwargs) for one call. Families: "diffusion" (a denoiser: cache passes),
"language" and "vision" (quantizers).
"""
from __future__ import annotations

import torch


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dit():
    from diffusers import DiTTransformer2DModel
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                              num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                              norm_type="ada_norm_zero")

    def inputs(seed):
        g = _g(seed)
        return (torch.randn(2, 4, 8, 8, generator=g), torch.randint(0, 1000, (2,), generator=g),
                torch.randint(0, 1000, (2,), generator=g)), {"return_dict": False}
    return m, inputs


def pixart_alpha():
    from diffusers import PixArtTransformer2DModel
    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                 num_layers=4, cross_attention_dim=32, sample_size=8, patch_size=2,
                                 caption_channels=24, norm_type="ada_norm_single", use_additional_conditions=False)

    def inputs(seed):
        g = _g(seed)
        return (torch.randn(2, 4, 8, 8, generator=g),), {
            "encoder_hidden_states": torch.randn(2, 5, 24, generator=g),
            "timestep": torch.randint(0, 1000, (2,), generator=g), "return_dict": False}
    return m, inputs


def sd3():
    from diffusers import SD3Transformer2DModel
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=16,
                              pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)

    def inputs(seed):
        g = _g(seed)
        return (), {"hidden_states": torch.randn(1, 4, 8, 8, generator=g),
                    "encoder_hidden_states": torch.randn(1, 5, 24, generator=g),
                    "pooled_projections": torch.randn(1, 16, generator=g),
                    "timestep": torch.randint(0, 1000, (1,), generator=g), "return_dict": False}
    return m, inputs


def flux(dual: int = 2, single: int = 4):
    """Flux: `dual` dual-stream blocks, then `single` single-stream ones."""
    from diffusers import FluxTransformer2DModel
    m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=dual, num_single_layers=single, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16,
                               axes_dims_rope=(2, 2, 4))

    def inputs(seed):
        g = _g(seed)
        return (), {"hidden_states": torch.randn(1, 16, 16, generator=g),
                    "encoder_hidden_states": torch.randn(1, 5, 24, generator=g),
                    "pooled_projections": torch.randn(1, 16, generator=g),
                    "timestep": torch.rand(1, generator=g), "img_ids": torch.randn(16, 3, generator=_g(0)),
                    "txt_ids": torch.zeros(5, 3), "return_dict": False}
    return m, inputs


def wan21():
    from diffusers import WanTransformer3DModel
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                              out_channels=4, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=4, rope_max_seq_len=32)

    def inputs(seed):
        g = _g(seed)
        return (torch.randn(1, 4, 2, 8, 8, generator=g), torch.randint(0, 1000, (1,), generator=g),
                torch.randn(1, 5, 24, generator=g)), {"return_dict": False}
    return m, inputs


def sana():
    from diffusers import SanaTransformer2DModel
    m = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=4,
                               num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                               caption_channels=24, sample_size=8, patch_size=1)

    def inputs(seed):
        g = _g(seed)
        return (torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 24, generator=g),
                torch.randint(0, 1000, (1,), generator=g)), {"return_dict": False}
    return m, inputs


def unet():
    from diffusers import UNet2DConditionModel
    m = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                             attention_head_dim=4, norm_num_groups=8)

    def inputs(seed):
        g = _g(seed)
        return (torch.randn(1, 4, 8, 8, generator=g), torch.randint(0, 1000, (1,), generator=g),
                torch.randn(1, 5, 24, generator=g)), {"return_dict": False}
    return m, inputs


def _text_mask(seed: int, tokens: int = 5):
    """A prompt's attention mask with padding: the last one or two tokens off, by seed."""
    mask = torch.ones(1, tokens, dtype=torch.int64)
    mask[0, tokens - 1 - seed % 2:] = 0
    return mask


def cogvideox():
    """CogVideoX (2B-style: sincos positions): 2 latent frames of 8x8, patches of 2x2."""
    from diffusers import CogVideoXTransformer3DModel
    m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                    time_embed_dim=32, text_embed_dim=24, num_layers=4, sample_width=8,
                                    sample_height=8, sample_frames=5, patch_size=2, temporal_compression_ratio=4,
                                    max_text_seq_length=5)

    def inputs(seed):
        g = _g(seed)
        return (), {"hidden_states": torch.randn(1, 2, 4, 8, 8, generator=g),      # [B, frames, C, H, W]
                    "encoder_hidden_states": torch.randn(1, 5, 24, generator=g),
                    "timestep": torch.randint(0, 1000, (1,), generator=g), "return_dict": False}
    return m, inputs


def hunyuan_video(dual: int = 2, single: int = 4):
    """HunyuanVideo: a text token refiner (2 blocks, as released), `dual` dual-stream blocks,
    then `single` single-stream ones; guidance-distilled (a guidance input); a padded prompt."""
    from diffusers import HunyuanVideoTransformer3DModel
    m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                       num_layers=dual, num_single_layers=single, num_refiner_layers=2,
                                       mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=24,
                                       pooled_projection_dim=16, rope_axes_dim=(4, 6, 6))

    def inputs(seed):
        g = _g(seed)
        return (), {"hidden_states": torch.randn(1, 4, 2, 8, 8, generator=g),      # [B, C, frames, H, W]
                    "timestep": torch.randint(0, 1000, (1,), generator=g),
                    "encoder_hidden_states": torch.randn(1, 5, 24, generator=g),
                    "encoder_attention_mask": _text_mask(seed),
                    "pooled_projections": torch.randn(1, 16, generator=g),
                    "guidance": torch.tensor([6000.0]), "return_dict": False}
    return m, inputs


def ltx_video():
    """LTX-Video: latents as tokens (2 frames of 4x4, patch 1), its rotary scale as the pipeline
    passes it; a padded prompt."""
    from diffusers import LTXVideoTransformer3DModel
    m = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16,
                                   cross_attention_dim=32, num_layers=4, caption_channels=24)

    def inputs(seed):
        g = _g(seed)
        return (), {"hidden_states": torch.randn(1, 2 * 4 * 4, 8, generator=g),
                    "encoder_hidden_states": torch.randn(1, 5, 24, generator=g),
                    "timestep": torch.randint(0, 1000, (1,), generator=g),
                    "encoder_attention_mask": _text_mask(seed), "num_frames": 2, "height": 4, "width": 4,
                    "rope_interpolation_scale": (8 / 25, 32, 32), "return_dict": False}
    return m, inputs


def _tokens(vocab: int, **extra):
    def inputs(seed):
        return (torch.randint(0, vocab, (2, 16), generator=_g(seed)),), dict(extra)
    return inputs


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg), _tokens(64, use_cache=False, return_dict=False)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    # eager attention: with SDPA, torch.export itself fails here (a view of SDPA's non-contiguous output in
    # Conv1D; capture's error says so and suggests this)
    cfg = GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                     attn_implementation="eager")
    return GPT2LMHeadModel(cfg), _tokens(64, use_cache=False, return_dict=False)


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64)
    return MixtralForCausalLM(cfg), _tokens(64, use_cache=False, return_dict=False)


def qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                         num_experts_per_tok=2, head_dim=8, max_position_embeddings=64)
    return Qwen3MoeForCausalLM(cfg), _tokens(64, use_cache=False, return_dict=False)


def llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=7)
    text = LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=79, projector_hidden_act="gelu",
                      vision_feature_layer=-1)

    def inputs(seed):
        g = _g(seed)
        ids = torch.randint(0, 70, (1, 24), generator=g)
        ids[0, 2:18] = 79                                   # 16 image tokens: (28 / 7)^2 patches
        return (), {"input_ids": ids, "pixel_values": torch.randn(1, 3, 28, 28, generator=g), "use_cache": False,
                    "return_dict": False}
    return LlavaForConditionalGeneration(cfg), inputs


def vit():
    from transformers import ViTConfig, ViTModel
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=28, patch_size=4, num_channels=1)

    def inputs(seed):
        return (torch.randn(2, 1, 28, 28, generator=_g(seed)),), {"return_dict": False}
    return ViTModel(cfg), inputs


def clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=7)

    def inputs(seed):
        return (torch.randn(2, 3, 28, 28, generator=_g(seed)),), {"return_dict": False}
    return CLIPVisionModel(cfg), inputs


def whisper_encoder():
    from transformers import WhisperConfig, WhisperModel
    cfg = WhisperConfig(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                        num_mel_bins=16, encoder_layers=2, encoder_attention_heads=2,
                        decoder_layers=1, decoder_attention_heads=2, d_model=32, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_source_positions=16, max_target_positions=16)
    encoder = WhisperModel(cfg).get_encoder()

    def inputs(seed):
        return (torch.randn(2, 16, 32, generator=_g(seed)),), {"return_dict": False}
    return encoder, inputs


ZOO = {
    "dit": ("diffusion", dit), "pixart_alpha": ("diffusion", pixart_alpha), "sd3": ("diffusion", sd3),
    "flux": ("diffusion", flux), "wan21": ("diffusion", wan21), "sana": ("diffusion", sana),
    "unet": ("diffusion", unet), "cogvideox": ("diffusion", cogvideox), "hunyuan_video": ("diffusion", hunyuan_video),
    "ltx_video": ("diffusion", ltx_video),
    "llama": ("language", llama), "gpt2": ("language", gpt2), "mixtral": ("language", mixtral),
    "qwen3_moe": ("language", qwen3_moe), "llava": ("language", llava),
    "vit": ("vision", vit), "clip_vision": ("vision", clip_vision), "whisper_encoder": ("vision", whisper_encoder),
}


def build(name: str):
    """(model in eval mode, inputs) of ZOO[name], weights seeded."""
    torch.manual_seed(0)
    model, inputs = ZOO[name][1]()
    return model.eval(), inputs
