"""transformers CLIPModel (text and vision towers): the judge of the zoo's digit models.

Known here so that its encoder layers can be quantized like any transformer and so that the zoo can
plant function-preserving outliers in it (pre-LayerNorm blocks: gain and bias of a norm channel times
f, the consumers' input columns divided by f)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantkit.adapters.base import CallArgs, ModelAdapter
from quantkit.adapters.outliers import norm_gain_outliers, pick_channels

TOWERS = ("text_model", "vision_model")


class CLIPAdapter(ModelAdapter):
    name = "transformers-clip"
    kind = "clip"

    @classmethod
    def matches(cls, root: nn.Module) -> bool:
        return all(hasattr(root, a) for a in (*TOWERS, "logit_scale"))

    def blocks(self, root: nn.Module) -> list[tuple[str, nn.Module]]:
        # Execution order of CLIPModel.forward (vision tower first): calibration walks blocks in one pass.
        return [(f"{t}.encoder.layers.{i}", layer) for t in ("vision_model", "text_model")
                for i, layer in enumerate(getattr(root, t).encoder.layers)]

    def role(self, name: str, module: nn.Module) -> str:
        parts = name.split(".")
        if isinstance(module, nn.Embedding) or "embeddings" in parts:
            return "conv_in" if isinstance(module, nn.Conv2d) else "embedding"
        if parts[-1] in ("text_projection", "visual_projection"):
            return "proj_out"
        if "self_attn" in parts:
            return "attention"
        return "mlp" if "mlp" in parts else "linear"

    def add_outliers(self, root: nn.Module, factor: float, channels: int, seed: int) -> dict:
        edited = 0
        for tower in TOWERS:
            layers = getattr(root, tower).encoder.layers
            idx = pick_channels(layers[0].layer_norm1.weight.numel(), channels, seed)
            for layer in layers:
                attn = layer.self_attn
                norm_gain_outliers(layer.layer_norm1, [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight],
                                   idx, factor)
                norm_gain_outliers(layer.layer_norm2, [layer.mlp.fc1.weight], idx, factor)
                edited += 2
        return {"kind": "layernorm-gain", "factor": factor, "channels": channels, "norms": edited}

    def synthetic_inputs(self, root: nn.Module, n: int, seed: int) -> list[CallArgs]:
        g = torch.Generator().manual_seed(seed)
        tc, vc = root.config.text_config, root.config.vision_config
        return [CallArgs((), {"input_ids": torch.randint(0, tc.vocab_size, (1, 8), generator=g),
                              "pixel_values": torch.randn(1, 3, vc.image_size, vc.image_size, generator=g)})
                for _ in range(n)]

    def output_tensor(self, out: Any) -> torch.Tensor:
        return out.logits_per_image
