"""Tiny random-weight text-to-image / video pipelines of the modern diffusion families (no download):
FLUX.1, SD3, Qwen-Image, SANA, Wan 2.x and SDXL, each with its real pipeline class and scheduler (flow matching where the
family uses it), tiny text encoders and a character-level tokenizer. For tests and for trying quantkit."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch


def _tokenizer(out: Path) -> Any:
    from transformers import CLIPTokenizer

    from quantkit.tiny_models import _clip_tokenizer  # (tiny_models imports this module's registry)

    tok_dir = out.parent / (out.name + ".tokenizer")
    _clip_tokenizer(tok_dir)
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    shutil.rmtree(tok_dir, ignore_errors=True)
    return tok


def _clip(tok: Any, hidden: int, projection: int | None = None) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, projection_dim=projection or hidden)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _t5(tok: Any, d_model: int, umt5: bool = False) -> Any:
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kw = dict(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
              relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id)
    return UMT5EncoderModel(UMT5Config(**kw)) if umt5 else T5EncoderModel(T5Config(**kw))


def _vae(latent: int) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=16)


def make_tiny_flux(out: Path, seed: int = 0) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    tok = _tokenizer(out)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4), text_encoder=_clip(tok, 32),
                        tokenizer=tok, text_encoder_2=_t5(tok, 32), tokenizer_2=tok, transformer=transformer)
    pipe.save_pretrained(out)


def make_tiny_sd3(out: Path, seed: int = 0) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tok = _tokenizer(out)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64,
                                        pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4),
                                    text_encoder=_clip(tok, 16, 16), tokenizer=tok, text_encoder_2=_clip(tok, 16, 16),
                                    tokenizer_2=tok, text_encoder_3=_t5(tok, 32), tokenizer_3=tok)
    pipe.save_pretrained(out)


def make_tiny_wan(out: Path, seed: int = 0) -> None:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    tok = _tokenizer(out)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
                                        in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                        num_layers=2, rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_temporal=2,
                           scale_factor_spatial=2)
    pipe = WanPipeline(tokenizer=tok, text_encoder=_t5(tok, 32, umt5=True), vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer)
    pipe.save_pretrained(out)


def make_tiny_qwen_image(out: Path, seed: int = 0) -> None:
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tok = _tokenizer(out)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                              axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    text_cfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]})
    text = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text_cfg, vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                                                 out_hidden_size=32, fullatt_block_indexes=[0])))
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text, tokenizer=tok,
                             transformer=transformer)
    pipe.save_pretrained(out)


def make_tiny_sana(out: Path, seed: int = 0) -> None:
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    tok = _tokenizer(out)
    tok.padding_side = "right"
    transformer = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32,
                                         num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=32,
                                         cross_attention_dim=64, caption_channels=32, mlp_ratio=2.0, sample_size=8,
                                         patch_size=1)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=8,
                        encoder_block_types=("ResBlock", "ResBlock"), decoder_block_types=("ResBlock", "ResBlock"),
                        encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
                        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                        encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()),
                        decoder_norm_types="batch_norm", decoder_act_fns="silu")
    text = Gemma2Model(Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    pad_token_id=tok.pad_token_id))
    pipe = SanaPipeline(tokenizer=tok, text_encoder=text, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.save_pretrained(out)


def make_tiny_sdxl(out: Path, seed: int = 0) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tok = _tokenizer(out)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        transformer_layers_per_block=(1, 1))
    pipe = StableDiffusionXLPipeline(vae=_vae(4), text_encoder=_clip(tok, 32), text_encoder_2=_clip(tok, 32, 32),
                                     tokenizer=tok, tokenizer_2=tok, unet=unet,
                                     scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear",
                                                                      beta_start=0.00085, beta_end=0.012))
    pipe.save_pretrained(out)


TINY_PIPELINES = {
    "tiny-flux": ("random-weight FluxPipeline (2 double- + 2 single-stream blocks, CLIP + T5, flow matching)",
                  make_tiny_flux),
    "tiny-sd3": ("random-weight StableDiffusion3Pipeline (2 MMDiT blocks, 2 CLIP + T5, flow matching)", make_tiny_sd3),
    "tiny-qwen-image": ("random-weight QwenImagePipeline (2 MMDiT blocks, Qwen2.5-VL text encoder, flow matching)",
                        make_tiny_qwen_image),
    "tiny-wan": ("random-weight WanPipeline (2 video DiT blocks, UMT5, Wan VAE, flow matching)", make_tiny_wan),
    "tiny-sana": ("random-weight SanaPipeline (2 linear-attention DiT blocks, Gemma-2, DC-AE, flow matching)",
                  make_tiny_sana),
    "tiny-sdxl": ("random-weight StableDiffusionXLPipeline (UNet with text_time conditioning, 2 CLIP)",
                  make_tiny_sdxl),
}
