"""diffusers UNets: UNet2DModel and UNet2DConditionModel (and any UNet with down/mid/up blocks)."""
from __future__ import annotations

import torch
from torch import nn

from quantkit.adapters.base import CallArgs, ModelAdapter
from quantkit.adapters.outliers import attention_value_outliers, geglu_outliers, pixel_outliers


class UNetAdapter(ModelAdapter):
    name = "diffusers-unet"
    kind = "diffusion"

    @classmethod
    def matches(cls, root: nn.Module) -> bool:
        return all(hasattr(root, a) for a in ("down_blocks", "up_blocks", "conv_in", "conv_out", "time_embedding"))

    def blocks(self, root: nn.Module) -> list[tuple[str, nn.Module]]:
        # Residual and transformer blocks are the units of block reconstruction (BRECQ / EDA-DM);
        # resamplers are small and go with their own block.
        out: list[tuple[str, nn.Module]] = []
        stages = [(f"down_blocks.{i}", b) for i, b in enumerate(root.down_blocks)]
        if getattr(root, "mid_block", None) is not None:
            stages.append(("mid_block", root.mid_block))
        stages += [(f"up_blocks.{i}", b) for i, b in enumerate(root.up_blocks)]
        for prefix, stage in stages:
            resnets = list(getattr(stage, "resnets", []) or [])
            attns = list(getattr(stage, "attentions", []) or [])
            # diffusers runs resnet_i then attention_i (mid block: resnet_0, then attention_i, resnet_i+1).
            if prefix == "mid_block":
                order = [("resnets.0", resnets[0])] if resnets else []
                for i, a in enumerate(attns):
                    order.append((f"attentions.{i}", a))
                    if i + 1 < len(resnets):
                        order.append((f"resnets.{i + 1}", resnets[i + 1]))
            else:
                order = []
                for i, r in enumerate(resnets):
                    order.append((f"resnets.{i}", r))
                    if i < len(attns):
                        order.append((f"attentions.{i}", attns[i]))
            for attr in ("downsamplers", "upsamplers"):
                for i, s in enumerate(getattr(stage, attr, None) or []):
                    order.append((f"{attr}.{i}", s))
            out += [(f"{prefix}.{n}", m) for n, m in order]
        return out

    def role(self, name: str, module: nn.Module) -> str:
        head = name.split(".")[0]
        if name == "conv_in":
            return "conv_in"
        if name == "conv_out":
            return "conv_out"
        if head in ("time_embedding", "time_proj", "add_embedding", "class_embedding", "add_time_proj") or name.endswith("time_emb_proj"):
            return "time_embedding"
        if head == "encoder_hid_proj":
            return "proj_in"
        if ".attentions." in name:
            return "attention"
        return "conv" if isinstance(module, nn.Conv2d) else "linear"

    def bottleneck_name(self, root: nn.Module) -> str:
        # EDA-DM hooks the input of the middle attention (between the two middle ResBlocks).
        mid = getattr(root, "mid_block", None)
        if mid is not None and getattr(mid, "attentions", None):
            return "mid_block.attentions.0"
        if mid is not None and len(getattr(mid, "resnets", [])) > 1:
            return "mid_block.resnets.1"
        return "up_blocks.0.resnets.0"

    def add_outliers(self, root: nn.Module, factor: float, channels: int, seed: int, kind: str = "norm") -> dict:
        """Channel outliers in attention out-projections and GEGLU down-projections; kind "pixel": token-wise
        (pixel) outliers in the GEGLU down-projections instead (adapters/outliers.py pixel_outliers)."""
        if kind == "pixel":
            done = {"kind": "geglu-pixel", "factor": factor, "channels_per_layer": channels}
            done.update(pixel_outliers(root, self.synthetic_inputs(root, 8, seed), factor, channels))
            return done
        done = {"kind": "attention-value+geglu", "factor": factor, "channels_per_layer": channels}
        done.update(attention_value_outliers(root, factor, channels, seed))
        done.update(geglu_outliers(root, factor, channels, seed))
        return done

    def synthetic_inputs(self, root: nn.Module, n: int, seed: int) -> list[CallArgs]:
        cfg = root.config
        g = torch.Generator().manual_seed(seed)
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        out = []
        for i in range(n):
            sample = torch.randn(1, cfg.in_channels, size, size, generator=g)
            t = torch.randint(0, 1000, (1,), generator=g)
            kwargs = {"sample": sample, "timestep": t}
            cross = getattr(cfg, "cross_attention_dim", None)
            if cross is not None:
                cross = cross if isinstance(cross, int) else cross[0]
                kwargs["encoder_hidden_states"] = torch.randn(1, 8, cross, generator=g)
            if getattr(cfg, "addition_embed_type", None) == "text_time":  # SDXL: pooled text + size/crop ids
                n_ids = 6
                text = cfg.projection_class_embeddings_input_dim - n_ids * cfg.addition_time_embed_dim
                kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, text, generator=g),
                                               "time_ids": torch.randint(0, 1024, (1, n_ids), generator=g).float()}
            if getattr(cfg, "num_class_embeds", None):
                kwargs["class_labels"] = torch.randint(0, cfg.num_class_embeds, (1,), generator=g)
            out.append(CallArgs((), kwargs))
        return out
