"""transformers causal LMs with Mixture-of-Experts layers: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
DeepSeek-V3 (and dense decoder LMs of the same shape)."""
from __future__ import annotations

import torch
from torch import nn

from quantkit.adapters.base import CallArgs, ModelAdapter, is_fused_experts

ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


class CausalLMAdapter(ModelAdapter):
    name = "transformers-causal-lm"
    kind = "lm"

    @classmethod
    def matches(cls, root: nn.Module) -> bool:
        inner = getattr(root, "model", None)
        return hasattr(root, "lm_head") and inner is not None and hasattr(inner, "layers")

    def blocks(self, root: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"model.layers.{i}", layer) for i, layer in enumerate(root.model.layers)]

    def role(self, name: str, module: nn.Module) -> str:
        parts = name.split(".")
        if parts[-1] == "lm_head":
            return "lm_head"
        if isinstance(module, nn.Embedding) or "embed" in parts[-1]:
            return "embedding"
        if is_fused_experts(module) or "experts" in parts:
            return "expert"
        if parts[-1] in ROUTER_NAMES:
            return "router"
        if any(p in ("shared_expert", "shared_experts") for p in parts):
            return "shared_expert"
        if "self_attn" in parts or "attention" in parts:
            return "attention"
        if "mlp" in parts:
            return "mlp"
        return "linear"

    def synthetic_inputs(self, root: nn.Module, n: int, seed: int) -> list[CallArgs]:
        g = torch.Generator().manual_seed(seed)
        vocab = root.config.vocab_size
        return [CallArgs((), {"input_ids": torch.randint(0, vocab, (1, 32), generator=g)}) for _ in range(n)]
