"""Modern diffusion transformers: FLUX.1 (double- then single-stream blocks), SD3/SD3.5 (MMDiT), Qwen-Image,
SANA (linear attention), Wan 2.x (video) and HunyuanDiT.

Each adapter knows its family's blocks (in execution order), the roles of the layers outside them and of
the conditioning layers inside them, its forward signature (synthetic inputs of the right shapes) and the
sampling size its pipeline is calibrated at. Kept in full precision by default (their roles are in every
built-in recipe's skip_roles): the input projections of each stream ("conv_in": the image patch embedding
and the context/caption embedder), the time/guidance/pooled-text embedders ("time_embedding"), every adaLN
modulation linear ("norm": it runs once per sample on the conditioning vector) and the final projection.
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from quantkit.adapters.base import CallArgs, ModelAdapter

# Most image tokens a calibration sample gets: a 256x256 FLUX image (32x32 latents, 2x2 patches). Calibration
# on CPU-sized budgets; activation ranges of DiTs depend little on resolution (the warning says when it applies).
MAX_CALIB_TOKENS = 256


def _match(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


class DiffusionTransformerAdapter(ModelAdapter):
    """Shared logic; subclasses set the class names they match, their block lists and role patterns."""

    kind = "diffusion"
    classes: tuple[str, ...] = ()
    block_lists: tuple[str, ...] = ("transformer_blocks",)
    conv_in: tuple[str, ...] = ()  # stream input projections (regex on the full layer name)
    time: tuple[str, ...] = ()  # time / guidance / pooled-text embedders
    modulation: tuple[str, ...] = (r"norm_out\.linear",)  # adaLN modulation linears
    conv_out: tuple[str, ...] = (r"proj_out",)

    @classmethod
    def matches(cls, root: nn.Module) -> bool:
        return type(root).__name__ in cls.classes

    def blocks(self, root: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"{lst}.{i}", b) for lst in self.block_lists for i, b in enumerate(getattr(root, lst, None) or [])]

    def role(self, name: str, module: nn.Module) -> str:
        if _match(name, self.conv_in):
            return "conv_in"
        if _match(name, self.time):
            return "time_embedding"
        if _match(name, self.modulation):
            return "norm"
        if _match(name, self.conv_out):
            return "conv_out"
        parts = name.split(".")
        if any(p.startswith("attn") for p in parts):
            return "attention"
        if isinstance(module, nn.Conv2d):
            return "conv"
        return "mlp" if any(p.startswith(("ff", "mlp", "img_mlp", "txt_mlp", "proj_mlp")) for p in parts) else "linear"

    def bottleneck_name(self, root: nn.Module) -> str:
        # No bottleneck in a transformer: EDA-DM's TDAC scores the input of the middle block.
        blocks = self.blocks(root)
        return blocks[len(blocks) // 2][0]

    def output_tensor(self, out: Any) -> torch.Tensor:
        from quantkit.adapters.base import first_tensor

        return first_tensor(out, ("sample",))

    def latent_grid(self, root: nn.Module) -> int:
        """Side of the (square) latent grid used for synthetic inputs: small, patch-divisible."""
        patch = getattr(root.config, "patch_size", 1) or 1
        patch = patch[-1] if isinstance(patch, (tuple, list)) else patch
        return 4 * max(int(patch), 1) if patch > 1 else 8

    def sampling_kwargs(self, pipe: Any) -> dict[str, Any]:
        """Pipeline call arguments for calibration: the pipeline's default size, capped at MAX_CALIB_TOKENS
        image tokens (the sampler's own defaults otherwise, scheduler included)."""
        import logging

        import inspect

        extra: dict[str, Any] = {}
        # Prompts are padded to max_sequence_length: never beyond what the text encoder's tokenizer takes.
        tok = getattr(pipe, "tokenizer_3", None) or getattr(pipe, "tokenizer_2", None) or getattr(pipe, "tokenizer", None)
        default_len = inspect.signature(pipe.__call__).parameters.get("max_sequence_length")
        if tok is not None and default_len is not None and isinstance(default_len.default, int):
            if tok.model_max_length < default_len.default:
                extra["max_sequence_length"] = int(tok.model_max_length)
        # The folder's own sampling arguments (quantkit_eval.json) come before the pipeline class's defaults.
        extra.update(super().sampling_kwargs(pipe))
        vae_scale = getattr(pipe, "vae_scale_factor", None)
        px = extra.get("height") or self.default_pixels(pipe)
        if not px or not vae_scale:
            return extra
        patch = getattr(pipe.transformer.config, "patch_size", 1) or 1
        patch = patch[-1] if isinstance(patch, (tuple, list)) else patch
        tokens = (px // (vae_scale * patch * self.packing)) ** 2
        if tokens <= MAX_CALIB_TOKENS:
            return extra
        side = int(math.isqrt(MAX_CALIB_TOKENS)) * vae_scale * patch * self.packing
        logging.getLogger(__name__).warning(
            "calibrating %s at %dx%d (%dx%d would give %d image tokens per sample)",
            type(pipe.transformer).__name__, side, side, px, px, tokens)
        return {**extra, "height": side, "width": side}

    packing = 1  # latent pixels per token side beyond the config's patch size (FLUX packs 2x2 latents)

    @staticmethod
    def default_pixels(pipe: Any) -> int | None:
        """The side the pipeline samples at when given no size."""
        import inspect

        if getattr(pipe, "default_sample_size", None) and getattr(pipe, "vae_scale_factor", None):
            return int(pipe.default_sample_size * pipe.vae_scale_factor)
        h = inspect.signature(pipe.__call__).parameters.get("height")
        return h.default if h is not None and isinstance(h.default, int) else None


class FluxAdapter(DiffusionTransformerAdapter):
    name = "diffusers-flux"
    classes = ("FluxTransformer2DModel",)
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    conv_in = (r"x_embedder", r"context_embedder")
    time = (r"time_text_embed\..*",)
    modulation = (r"norm_out\.linear", r"transformer_blocks\.\d+\.norm1(_context)?\.linear",
                  r"single_transformer_blocks\.\d+\.norm\.linear")
    packing = 2
    unbatched_inputs = ("img_ids", "txt_ids")  # [tokens, 3] positions, one table for the whole batch

    def add_outliers(self, root: nn.Module, factor: float, channels: int, seed: int) -> dict:
        """Channel outliers where FLUX's quantized linears read them: the adaLN-modulated MLP inputs of the
        double-stream blocks (both streams) and the shared attention/MLP input of the single-stream blocks
        (the modulation linears stay full precision), and the attention values of both block kinds."""
        from quantkit.adapters.outliers import joint_value_outliers, modulation_outliers, pick_channels

        idx = pick_channels(root.inner_dim, channels, seed)
        for block in root.transformer_blocks:
            # AdaLayerNormZero chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
            modulation_outliers(block.norm1.linear, 6, 3, 4, [block.ff.net[0].proj.weight], idx, factor)
            modulation_outliers(block.norm1_context.linear, 6, 3, 4, [block.ff_context.net[0].proj.weight], idx,
                                factor)
            a = block.attn
            joint_value_outliers([a.to_v, a.add_v_proj], [a.to_out[0].weight, a.to_add_out.weight], idx, factor)
        for block in root.single_transformer_blocks:
            # AdaLayerNormZeroSingle chunks: shift_msa, scale_msa, gate_msa; attention and MLP read its output.
            a = block.attn
            modulation_outliers(block.norm.linear, 3, 0, 1,
                                [a.to_q.weight, a.to_k.weight, a.to_v.weight, block.proj_mlp.weight], idx, factor)
            # proj_out reads [attention output (inner_dim), MLP]: idx < inner_dim are attention channels.
            joint_value_outliers([a.to_v], [block.proj_out.weight], idx, factor)
        return {"kind": "adaln-modulation+attention-value", "factor": factor, "channels_per_layer": channels,
                "double_blocks": len(root.transformer_blocks), "single_blocks": len(root.single_transformer_blocks)}

    def synthetic_inputs(self, root: nn.Module, n: int, seed: int) -> list[CallArgs]:
        cfg, g = root.config, torch.Generator().manual_seed(seed)
        side, txt = 4, 6
        axis = torch.arange(side, dtype=torch.float32)
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), axis, axis, indexing="ij"), -1).reshape(-1, 3)
        out = []
        for _ in range(n):
            kw = {"hidden_states": torch.randn(1, side * side, cfg.in_channels, generator=g),
                  "encoder_hidden_states": torch.randn(1, txt, cfg.joint_attention_dim, generator=g),
                  "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g),
                  "timestep": torch.rand(1, generator=g), "img_ids": img_ids, "txt_ids": torch.zeros(txt, 3)}
            if cfg.guidance_embeds:
                kw["guidance"] = torch.full((1,), 3.5)
            out.append(CallArgs((), kw))
        return out


class SD3Adapter(DiffusionTransformerAdapter):
    name = "diffusers-sd3"
    classes = ("SD3Transformer2DModel",)
    conv_in = (r"pos_embed\..*", r"context_embedder")
    time = (r"time_text_embed\..*",)
    modulation = (r"norm_out\.linear", r"transformer_blocks\.\d+\.norm1(_context)?\.linear")

    def synthetic_inputs(self, root: nn.Module, n: int, seed: int) -> list[CallArgs]:
        cfg, g = root.config, torch.Generator().manual_seed(seed)
        side = cfg.sample_size
        return [CallArgs((), {"hidden_states": torch.randn(1, cfg.in_channels, side, side, generator=g),
                              "encoder_hidden_states": torch.randn(1, 6, cfg.joint_attention_dim, generator=g),
                              "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g),
                              "timestep": torch.randint(1, 1000, (1,), generator=g).float()}) for _ in range(n)]


class QwenImageAdapter(DiffusionTransformerAdapter):
    name = "diffusers-qwen-image"
    classes = ("QwenImageTransformer2DModel",)
    conv_in = (r"img_in", r"txt_in")
    time = (r"time_text_embed\..*",)
    modulation = (r"norm_out\.linear", r"transformer_blocks\.\d+\.(img|txt)_mod\.\d+")

    def synthetic_inputs(self, root: nn.Module, n: int, seed: int) -> list[CallArgs]:
        cfg, g = root.config, torch.Generator().manual_seed(seed)
        side, txt = 4, 6
        return [CallArgs((), {"hidden_states": torch.randn(1, side * side, cfg.in_channels, generator=g),
                              "encoder_hidden_states": torch.randn(1, txt, cfg.joint_attention_dim, generator=g),
                              "encoder_hidden_states_mask": torch.ones(1, txt, dtype=torch.long),
                              "timestep": torch.rand(1, generator=g), "img_shapes": [[(1, side, side)]]})
                for _ in range(n)]


class SanaAdapter(DiffusionTransformerAdapter):
    name = "diffusers-sana"
    classes = ("SanaTransformer2DModel",)
    conv_in = (r"patch_embed\..*", r"caption_projection\..*")
    time = (r"time_embed\..*",)

    def sampling_kwargs(self, pipe: Any) -> dict[str, Any]:
        # SANA's pipeline snaps the size to its aspect-ratio bins (512 px and up): calibration samples at the
        # (capped) default size as given, without binning.
        kw = super().sampling_kwargs(pipe)
        px = self.default_pixels(pipe)
        return {"height": px, "width": px, **kw, "use_resolution_binning": False}

    def synthetic_inputs(self, root: nn.Module, n: int, seed: int) -> list[CallArgs]:
        cfg, g = root.config, torch.Generator().manual_seed(seed)
        side = self.latent_grid(root)
        out = []
        for _ in range(n):
            kw = {"hidden_states": torch.randn(1, cfg.in_channels, side, side, generator=g),
                  "encoder_hidden_states": torch.randn(1, 6, cfg.caption_channels, generator=g),
                  "timestep": torch.randint(1, 1000, (1,), generator=g).float()}
            if getattr(cfg, "guidance_embeds", False):
                kw["guidance"] = torch.full((1,), 4.5)
            out.append(CallArgs((), kw))
        return out


class WanAdapter(DiffusionTransformerAdapter):
    name = "diffusers-wan"
    classes = ("WanTransformer3DModel",)
    block_lists = ("blocks",)
    conv_in = (r"patch_embedding", r"condition_embedder\.text_embedder\..*", r"condition_embedder\.image_embedder\..*")
    time = (r"condition_embedder\.(time_embedder\..*|time_proj)",)
    modulation = ()

    def keep_full_precision(self, name: str) -> str | None:
        if name.startswith("condition_embedder.time_embedder."):
            return "WanTransformer3DModel's forward reads the time embedder's parameter dtype"
        return None

    def synthetic_inputs(self, root: nn.Module, n: int, seed: int) -> list[CallArgs]:
        cfg, g = root.config, torch.Generator().manual_seed(seed)
        pt, ph, pw = cfg.patch_size
        return [CallArgs((), {"hidden_states": torch.randn(1, cfg.in_channels, 2 * pt, 4 * ph, 4 * pw, generator=g),
                              "encoder_hidden_states": torch.randn(1, 6, cfg.text_dim, generator=g),
                              "timestep": torch.randint(1, 1000, (1,), generator=g).float()}) for _ in range(n)]

    def sampling_kwargs(self, pipe: Any) -> dict[str, Any]:
        # Video: the default 81 frames at 480x832 is far beyond a calibration sample's budget.
        import logging

        ts, s = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        _, ph, pw = pipe.transformer.config.patch_size
        size = {"num_frames": 1 + ts, "height": 8 * s * ph, "width": 8 * s * pw}
        logging.getLogger(__name__).warning("calibrating %s on %d-frame %dx%d clips (2 latent frames of 8x8 tokens)",
                                            type(pipe.transformer).__name__, size["num_frames"], size["height"],
                                            size["width"])
        return size



class HunyuanDiTAdapter(DiffusionTransformerAdapter):
    name = "diffusers-hunyuan-dit"
    classes = ("HunyuanDiT2DModel",)
    block_lists = ("blocks",)  # later blocks also take an earlier block's output (long skips): captured as kwargs
    conv_in = (r"pos_embed\..*", r"text_embedder\..*")
    time = (r"time_extra_emb\..*",)
    modulation = (r"norm_out\.linear", r"blocks\.\d+\.norm1\.linear")

    def synthetic_inputs(self, root: nn.Module, n: int, seed: int) -> list[CallArgs]:
        from diffusers.models.embeddings import get_2d_rotary_pos_embed

        cfg, g = root.config, torch.Generator().manual_seed(seed)
        side = self.latent_grid(root)
        grid = side // cfg.patch_size
        # The rotary table HunyuanDiTPipeline builds for a square image (its crop region is the whole grid).
        rotary = get_2d_rotary_pos_embed(root.inner_dim // root.num_heads, ((0, 0), (grid, grid)), (grid, grid),
                                         output_type="pt")
        out = []
        for _ in range(n):
            kw = {"hidden_states": torch.randn(1, cfg.in_channels, side, side, generator=g),
                  "timestep": torch.randint(1, 1000, (1,), generator=g).float(),
                  "encoder_hidden_states": torch.randn(1, cfg.text_len, cfg.cross_attention_dim, generator=g),
                  "text_embedding_mask": torch.ones(1, cfg.text_len, dtype=torch.long),
                  "encoder_hidden_states_t5": torch.randn(1, cfg.text_len_t5, cfg.cross_attention_dim_t5, generator=g),
                  "text_embedding_mask_t5": torch.ones(1, cfg.text_len_t5, dtype=torch.long),
                  "image_rotary_emb": rotary}
            if cfg.use_style_cond_and_image_meta_size:
                kw["image_meta_size"] = torch.tensor([[8 * side, 8 * side, 8 * side, 8 * side, 0, 0]]).float()
                kw["style"] = torch.zeros(1, dtype=torch.long)
            out.append(CallArgs((), kw))
        return out
