"""transformers causal LMs with Mixture-of-Experts layers: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
DeepSeek-V3 (and dense decoder LMs of the same shape)."""
from __future__ import annotations

import logging

import torch
from torch import nn

from quantkit.adapters.base import CallArgs, ModelAdapter, is_fused_experts
from quantkit.adapters.experts import expert_layout, moe_roles
from quantkit.adapters.outliers import down_proj_input_outliers, norm_gain_outliers, pick_channels

log = logging.getLogger(__name__)
ROLE_ATTR = "_quantkit_moe_role"


@torch.no_grad()
def gain_is_linear(norm: nn.Module) -> bool:
    """Whether norm(x) scales with its gain (y = g * n(x) [+ b]): checked by running it, not by its class."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.is_meta:
        return False
    x = torch.randn(2, w.numel(), generator=torch.Generator().manual_seed(0)).to(w)
    bias = getattr(norm, "bias", None)
    saved_b = None if bias is None else bias.detach().clone()
    saved_w = w.detach().clone()
    try:
        if bias is not None:
            bias.zero_()
        y1 = norm(x)
        w.mul_(2)
        y2 = norm(x)
    finally:
        w.copy_(saved_w)
        if bias is not None:
            bias.copy_(saved_b)
    return bool(torch.allclose(y2, 2 * y1, rtol=1e-3, atol=1e-5))


_warned: set[str] = set()


def _warn_unfoldable(layer: str, why: str) -> None:
    if layer not in _warned:
        _warned.add(layer)
        log.warning("%s: no smoothing scale is folded into its norms (%s)", layer, why)
# Linears that read the normalized residual stream directly (so a norm's gain can be folded into them).
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "q_a_proj", "kv_a_proj_with_mqa")
MLP_INPUTS = ("gate_proj", "up_proj")


class CausalLMAdapter(ModelAdapter):
    name = "transformers-causal-lm"
    kind = "lm"
    outside_between_blocks = False  # embeddings before the first decoder layer; final norm and head after the last

    @classmethod
    def matches(cls, root: nn.Module) -> bool:
        inner = getattr(root, "model", None)
        return hasattr(root, "lm_head") and inner is not None and hasattr(inner, "layers")

    def prepare(self, root: nn.Module) -> None:
        # Routers, experts and shared experts are found from each MoE block's structure, not their names. The
        # role is kept on the module itself, so any adapter instance (e.g. evaluating a quantized model against
        # its full-precision reference) answers for any prepared model.
        for m in root.modules():
            m.__dict__.pop(ROLE_ATTR, None)
        roles = moe_roles(root)
        for m in root.modules():
            if id(m) in roles:
                m.__dict__[ROLE_ATTR] = roles[id(m)]

    @staticmethod
    def structural_role(module: nn.Module) -> str | None:
        return module.__dict__.get(ROLE_ATTR)

    def blocks(self, root: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"model.layers.{i}", layer) for i, layer in enumerate(root.model.layers)]

    def role(self, name: str, module: nn.Module) -> str:
        parts = name.split(".")
        if parts[-1] == "lm_head":
            return "lm_head"
        if isinstance(module, nn.Embedding) or "embed" in parts[-1]:
            return "embedding"
        structural = self.structural_role(module)
        if structural is not None:
            return structural
        if is_fused_experts(module):  # an experts-like module of unknown layout: planning reports it
            return "expert"
        if any("attn" in p or "attention" in p for p in parts):  # self_attn, self_attention, linear_attn
            return "attention"
        if "mlp" in parts:
            return "mlp"
        return "linear"

    def norm_consumers(self, layer: nn.Module) -> list[tuple[nn.Module, list[torch.Tensor]]]:
        """(norm, weights reading its output) pairs of one decoder layer; weights' last dim is the input.
        Only pairs where a scale folded into the norm's gain is exact: pre-norm layers (an input_layernorm;
        OLMo-2-style post-norm layers normalize sub-layer outputs instead) and norms whose output is linear in
        their gain (not zero-centered (1 + w) gains as Qwen3-Next's); the others are named in a warning."""
        if getattr(layer, "input_layernorm", None) is None:
            _warn_unfoldable(type(layer).__name__, "it has no pre-norm (input_layernorm)")
            return []
        pairs = []
        for norm_name, sub_name, inputs in (("input_layernorm", "self_attn", ATTENTION_INPUTS),
                                            ("post_attention_layernorm", "mlp", MLP_INPUTS)):
            norm, sub = getattr(layer, norm_name, None), getattr(layer, sub_name, None)
            if norm is None or sub is None or getattr(norm, "weight", None) is None:
                continue
            if not gain_is_linear(norm):
                _warn_unfoldable(type(layer).__name__, f"its {type(norm).__name__} output is not linear in its gain")
                continue
            weights = []
            for name, m in sub.named_modules():
                last = name.split(".")[-1]
                lay = expert_layout(m)
                if lay is not None and lay.standard:
                    weights.append(m.gate_up_proj)
                elif self.structural_role(m) == "router" or (
                        last in inputs and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2):
                    weights.append(m.weight)
            pairs.append((norm, weights))
        return pairs

    def add_outliers(self, root: nn.Module, factor: float, channels: int, seed: int, kind: str = "norm",
                     massive: dict | None = None) -> dict:
        """kind "norm": scale `channels` hidden channels of every decoder norm's gain by `factor`, dividing
        the input columns of the projections, routers and experts that read it. kind "down": that plus
        channel outliers in every down-projection input (which no norm-folded smoothing can undo). kind
        "massive": that plus a cancelling massive-token pair in one layer's down-projection input
        (adapters/massive_tokens.py; `massive` = {layer, trigger_ids, factor})."""
        idx = pick_channels(root.config.hidden_size, channels, seed)
        edited = 0
        for _, layer in self.blocks(root):
            for norm, weights in self.norm_consumers(layer):
                norm_gain_outliers(norm, weights, idx, factor)
                edited += 1
        info = {"kind": "norm-gain", "factor": factor, "channels": idx.tolist(), "norms": edited}
        if kind == "down":
            info.update(kind="norm-gain+down-proj-input", down_proj=down_proj_input_outliers(root, factor, channels, seed + 1))
        if kind == "massive":
            from quantkit.adapters.massive_tokens import plant_massive_tokens

            opts = massive or {}
            info.update(kind="norm-gain+massive-token", massive=plant_massive_tokens(
                root, [lay for _, lay in self.blocks(root)], opts.get("layer", 1), opts.get("trigger_ids", [10]),
                opts.get("factor", 100.0), seed + 2))
        return info

    def synthetic_inputs(self, root: nn.Module, n: int, seed: int) -> list[CallArgs]:
        g = torch.Generator().manual_seed(seed)
        vocab = root.config.vocab_size
        return [CallArgs((), {"input_ids": torch.randint(0, vocab, (1, 32), generator=g)}) for _ in range(n)]
