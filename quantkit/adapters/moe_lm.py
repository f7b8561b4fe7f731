"""transformers causal LMs with Mixture-of-Experts layers: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
DeepSeek-V3 (and dense decoder LMs of the same shape)."""
from __future__ import annotations

import torch
from torch import nn

from quantkit.adapters.base import CallArgs, ModelAdapter, is_fused_experts
from quantkit.adapters.outliers import down_proj_input_outliers, norm_gain_outliers, pick_channels

ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
# Linears that read the normalized residual stream directly (so a norm's gain can be folded into them).
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "q_a_proj", "kv_a_proj_with_mqa")
MLP_INPUTS = ("gate_proj", "up_proj", "gate", "router", "shared_expert_gate")


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

    def norm_consumers(self, layer: nn.Module) -> list[tuple[nn.Module, list[torch.Tensor]]]:
        """(norm, weights reading its output) pairs of one decoder layer; weights' last dim is the input."""
        pairs = []
        for norm_name, sub_name, inputs in (("input_layernorm", "self_attn", ATTENTION_INPUTS),
                                            ("post_attention_layernorm", "mlp", MLP_INPUTS)):
            norm, sub = getattr(layer, norm_name, None), getattr(layer, sub_name, None)
            if norm is None or sub is None or getattr(norm, "weight", None) is None:
                continue
            weights = []
            for name, m in sub.named_modules():
                last = name.split(".")[-1]
                if is_fused_experts(m):
                    weights.append(m.gate_up_proj)
                elif last in inputs and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2:
                    weights.append(m.weight)
            pairs.append((norm, weights))
        return pairs

    def add_outliers(self, root: nn.Module, factor: float, channels: int, seed: int, kind: str = "norm") -> dict:
        """kind "norm": scale `channels` hidden channels of every decoder norm's gain by `factor`, dividing
        the input columns of the projections, routers and experts that read it. kind "down": that plus
        channel outliers in every down-projection input (which no norm-folded smoothing can undo)."""
        idx = pick_channels(root.config.hidden_size, channels, seed)
        edited = 0
        for _, layer in self.blocks(root):
            for norm, weights in self.norm_consumers(layer):
                norm_gain_outliers(norm, weights, idx, factor)
                edited += 1
        info = {"kind": "norm-gain", "factor": factor, "channels": idx.tolist(), "norms": edited}
        if kind == "down":
            info.update(kind="norm-gain+down-proj-input", down_proj=down_proj_input_outliers(root, factor, channels, seed + 1))
        return info

    def synthetic_inputs(self, root: nn.Module, n: int, seed: int) -> list[CallArgs]:
        g = torch.Generator().manual_seed(seed)
        vocab = root.config.vocab_size
        return [CallArgs((), {"input_ids": torch.randint(0, vocab, (1, 32), generator=g)}) for _ in range(n)]
