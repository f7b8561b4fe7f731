"""diffusers diffusion transformers: DiTTransformer2DModel, PixArtTransformer2DModel and alike."""
from __future__ import annotations

import torch
from torch import nn

from quantkit.adapters.base import CallArgs, ModelAdapter
from quantkit.adapters.outliers import attention_value_outliers, geglu_outliers


class DiTAdapter(ModelAdapter):
    name = "diffusers-dit"
    kind = "diffusion"

    @classmethod
    def matches(cls, root: nn.Module) -> bool:
        return hasattr(root, "transformer_blocks") and hasattr(root, "pos_embed")

    def blocks(self, root: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"transformer_blocks.{i}", b) for i, b in enumerate(root.transformer_blocks)]

    def role(self, name: str, module: nn.Module) -> str:
        parts = name.split(".")
        if name.startswith("pos_embed"):
            return "conv_in"
        if parts[0] in ("proj_out", "proj_out_2"):
            return "conv_out"
        if parts[0] == "adaln_single" or ".emb." in f".{name}." or "timestep_embedder" in parts:
            return "time_embedding"
        if parts[0] == "proj_out_1" or (len(parts) >= 2 and parts[-2].startswith("norm") and parts[-1] == "linear"):
            # adaLN modulation: a linear on the conditioning vector, once per sample, not per token.
            return "norm"
        if parts[0] == "caption_projection":
            return "proj_in"
        if any(p.startswith("attn") for p in parts):
            return "attention"
        return "linear"

    def bottleneck_name(self, root: nn.Module) -> str:
        # A DiT has no bottleneck: take the input of the middle transformer block.
        return f"transformer_blocks.{len(root.transformer_blocks) // 2}"

    def add_outliers(self, root: nn.Module, factor: float, channels: int, seed: int) -> dict:
        """Channel outliers in attention out-projections and GEGLU down-projections."""
        done = {"kind": "attention-value+geglu", "factor": factor, "channels_per_layer": channels}
        done.update(attention_value_outliers(root, factor, channels, seed))
        done.update(geglu_outliers(root, factor, channels, seed))
        return done

    def synthetic_inputs(self, root: nn.Module, n: int, seed: int) -> list[CallArgs]:
        cfg = root.config
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            kwargs = {
                "hidden_states": torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
                "timestep": torch.randint(0, 1000, (1,), generator=g),
            }
            if getattr(cfg, "num_embeds_ada_norm", None) and getattr(cfg, "caption_channels", None) is None:
                kwargs["class_labels"] = torch.randint(0, cfg.num_embeds_ada_norm, (1,), generator=g)
            if getattr(cfg, "caption_channels", None) is not None:
                kwargs["encoder_hidden_states"] = torch.randn(1, 8, cfg.caption_channels, generator=g)
                kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
            out.append(CallArgs((), kwargs))
        return out
