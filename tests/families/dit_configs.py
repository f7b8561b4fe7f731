"""Tiny random-weight diffusion transformers of the families quantkit knows (2 blocks of each kind, width 64),
built from the installed diffusers classes."""
from __future__ import annotations

from typing import Any

DIT_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "flux": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                            attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                            pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))),
    "sd3": ("SD3Transformer2DModel", dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                          attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                          caption_projection_dim=64, pooled_projection_dim=32, out_channels=4,
                                          pos_embed_max_size=16)),
    "qwen_image": ("QwenImageTransformer2DModel", dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                                       attention_head_dim=16, num_attention_heads=4,
                                                       joint_attention_dim=32, axes_dims_rope=(4, 6, 6))),
    "sana": ("SanaTransformer2DModel", dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32,
                                            num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=32,
                                            cross_attention_dim=64, caption_channels=32, mlp_ratio=2.0, sample_size=8,
                                            patch_size=1)),
    "wan": ("WanTransformer3DModel", dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
                                          in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                          num_layers=2, rope_max_seq_len=32)),
    "hunyuan_dit": ("HunyuanDiT2DModel", dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, patch_size=2,
                                              sample_size=8, hidden_size=64, num_layers=4, cross_attention_dim=32,
                                              cross_attention_dim_t5=32, pooled_projection_dim=32, text_len=6,
                                              text_len_t5=6)),
}


def build_dit(family: str, seed: int = 0) -> Any:
    import diffusers
    import torch

    cls, kw = DIT_FAMILIES[family]
    torch.manual_seed(seed)
    return getattr(diffusers, cls)(**kw).eval()
