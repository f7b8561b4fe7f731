"""Tiny random-weight configs of the transformers MoE families quantkit supports (2 layers, hidden 64,
4 experts, top-2): built from the installed transformers classes, so a test sees the real module layout."""
from __future__ import annotations

from typing import Any, Callable

COMMON: dict[str, Any] = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def _cfg(cls_name: str, **kw: Any) -> Any:
    import transformers

    args = dict(COMMON)
    args.update(kw)
    return getattr(transformers, cls_name)(**args)


# family -> (config class, causal-LM class, config overrides)
MOE_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=64, num_local_experts=4,
                                                            num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(intermediate_size=64, moe_intermediate_size=32,
                                                                shared_expert_intermediate_size=64, num_experts=4,
                                                                num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(intermediate_size=64, moe_intermediate_size=32,
                                                                num_experts=4, num_experts_per_tok=2, head_dim=16)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=32, num_experts=4, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        intermediate_size=64, moe_intermediate_size=32, first_k_dense_replace=1, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, kv_lora_rank=32, q_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        intermediate_size=64, moe_intermediate_size=32, first_k_dense_replace=1, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4)),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        intermediate_size=64, moe_intermediate_size=32, first_k_dense_replace=1, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, head_dim=16)),
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM", dict(intermediate_size=32, num_local_experts=4,
                                                            num_experts_per_tok=2, head_dim=16,
                                                            layer_types=["linear_attention", "full_attention"])),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(intermediate_size=32, num_local_experts=4,
                                                         num_experts_per_tok=2)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(intermediate_size=32, num_local_experts=4,
                                                                     num_experts_per_tok=2)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", dict(
        intermediate_size=64, moe_intermediate_size=32, moe_num_experts=4, moe_k=2, moe_num_shared_experts=1,
        moe_layer_start_index=0)),
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM", dict(intermediate_size=32, num_experts=4, pad_token_id=0,
                                                                num_experts_per_tok=2)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(intermediate_size=32, num_local_experts=4,
                                                          num_experts_per_tok=2, head_dim=16,
                                                          layer_types=["sliding_attention", "full_attention"],
                                                          sliding_window=8)),
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", dict(intermediate_size=32, intermediate_size_mlp=64,
                                                             num_local_experts=4, num_experts_per_tok=1, head_dim=16,
                                                             interleave_moe_layer_step=1, no_rope_layers=[1, 1])),
    "jetmoe": ("JetMoeConfig", "JetMoeForCausalLM", dict(intermediate_size=32, num_local_experts=4,
                                                         num_experts_per_tok=2, kv_channels=16,
                                                         num_key_value_heads=4)),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"])),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", dict(
        intermediate_size=32, num_experts=4, moe_topk=2, num_shared_expert=1, head_dim=16)),
}


def build(family: str, seed: int = 0) -> Any:
    import torch
    import transformers

    cfg_cls, model_cls, kw = MOE_FAMILIES[family]
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(_cfg(cfg_cls, **kw)).eval()


def builder(family: str) -> Callable[..., Any]:
    return lambda seed=0: build(family, seed)
