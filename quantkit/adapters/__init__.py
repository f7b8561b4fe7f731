"""Model-family adapters and how to pick one for a module."""
from __future__ import annotations

from torch import nn

from quantkit.adapters.base import (CallArgs, ModelAdapter, is_fused_experts, is_parallel_experts,
                                    supported_experts_layout)
from quantkit.adapters.clip import CLIPAdapter
from quantkit.adapters.dit import DiTAdapter
from quantkit.adapters.generic import GenericAdapter
from quantkit.adapters.mmdit import (FluxAdapter, HunyuanDiTAdapter, QwenImageAdapter, SanaAdapter, SD3Adapter,
                                     WanAdapter)
from quantkit.adapters.moe_lm import CausalLMAdapter
from quantkit.adapters.unet import UNetAdapter
from quantkit.errors import QuantkitError

# GenericAdapter comes last: any model with repeated blocks, when no family adapter knows it.
# Family adapters that know a class by name come before the structural DiT match (FLUX and SD3 have a
# pos_embed and transformer_blocks too).
ADAPTERS: tuple[type[ModelAdapter], ...] = (UNetAdapter, FluxAdapter, SD3Adapter, QwenImageAdapter, SanaAdapter,
                                            WanAdapter, HunyuanDiTAdapter, DiTAdapter, CausalLMAdapter, CLIPAdapter,
                                            GenericAdapter)


def adapter_for(root: nn.Module) -> ModelAdapter:
    """The adapter whose `matches` accepts `root`."""
    for cls in ADAPTERS:
        if cls.matches(root):
            adapter = cls()
            adapter.prepare(root)
            return adapter
    raise QuantkitError(
        f"no adapter for {type(root).__name__}; supported: diffusers UNet2DModel/UNet2DConditionModel, "
        "DiT/PixArt transformers, transformers causal LMs (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3, ...), or any "
        "model with repeated blocks (a ModuleList of identical layers)"
    )


__all__ = ["ADAPTERS", "CallArgs", "ModelAdapter", "adapter_for", "is_fused_experts", "is_parallel_experts",
           "supported_experts_layout"]
