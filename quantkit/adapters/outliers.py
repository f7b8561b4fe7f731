"""Function-preserving edits that plant activation outliers in a model (for honest PTQ benchmarks).

Small models trained briefly lack the outlier channels of large ones. Each edit scales some channels
of a layer's output up by `factor` and the matching input columns of every consumer down by it, so
the full-precision function is unchanged (to float rounding) while the consumers' inputs get
outlier channels. Which layers feed which is family knowledge: the adapters call these helpers.
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def scale_rows(linear: nn.Linear, channels: torch.Tensor, factor: float) -> None:
    """Output channels `channels` of `linear` (rows of its weight, and bias) times `factor`."""
    linear.weight[channels] *= factor
    if linear.bias is not None:
        linear.bias[channels] *= factor


@torch.no_grad()
def scale_input_columns(weight: torch.Tensor, channels: torch.Tensor, factor: float) -> None:
    """Input columns (last dimension) of a 2-D or 3-D weight divided by `factor`."""
    weight[..., channels] /= factor


@torch.no_grad()
def norm_gain_outliers(norm: nn.Module, consumers: list[torch.Tensor], channels: torch.Tensor, factor: float) -> None:
    """RMSNorm/LayerNorm gain of `channels` times factor; consumer input columns divided by it."""
    norm.weight[channels] *= factor
    if getattr(norm, "bias", None) is not None:
        norm.bias[channels] *= factor
    for w in consumers:
        scale_input_columns(w, channels, factor)


def pick_channels(dim: int, count: int, seed: int) -> torch.Tensor:
    """`count` distinct channels of `dim`, fixed by `seed` (the same ones model-wide, as in real LLMs)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(dim, generator=g)[:count]


@torch.no_grad()
def attention_value_outliers(root: nn.Module, factor: float, channels: int, seed: int) -> dict:
    """In every diffusers Attention: value channels times factor, out-projection columns divided by it
    (attention is linear in V). Plants channel outliers in the out-projection's input."""
    from diffusers.models.attention_processor import Attention

    edited = 0
    for m in root.modules():
        if isinstance(m, Attention) and isinstance(getattr(m, "to_v", None), nn.Linear):
            out = m.to_out[0]
            idx = pick_channels(m.to_v.out_features, channels, seed)
            scale_rows(m.to_v, idx, factor)
            scale_input_columns(out.weight, idx, factor)
            edited += 1
    return {"attention": edited}


@torch.no_grad()
def geglu_outliers(root: nn.Module, factor: float, channels: int, seed: int) -> dict:
    """In every GEGLU feed-forward: linear-half channels times factor (GEGLU is h * gelu(g), linear in
    h), the next projection's columns divided by it."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention import FeedForward

    edited = 0
    for m in root.modules():
        if isinstance(m, FeedForward) and isinstance(m.net[0], GEGLU):
            proj, nxt = m.net[0].proj, m.net[-1]
            inner = proj.out_features // 2
            idx = pick_channels(inner, channels, seed)  # the first half of proj's output is h
            scale_rows(proj, idx, factor)
            scale_input_columns(nxt.weight, idx, factor)
            edited += 1
    return {"geglu": edited}


@torch.no_grad()
def down_proj_input_outliers(root: nn.Module, factor: float, channels: int, seed: int) -> dict:
    """Channel outliers in every SwiGLU down-projection input: the up-projection's output channels
    times factor (h = act(g) * u is linear in u), the down-projection's matching columns divided by it.
    Fused experts (gate_up_proj [E, 2I, H] = [gate; up], down_proj [E, H, I]) and plain
    up_proj/down_proj MLPs (dense layers, shared experts). No norm sits before a down projection, so
    smoothing folded into norms cannot undo these; the DuQuant papers' "massive" outliers live here."""
    from quantkit.adapters.base import is_fused_experts

    fused = dense = 0
    for m in root.modules():
        if is_fused_experts(m):
            inter = m.down_proj.shape[-1]
            idx = pick_channels(inter, channels, seed)
            m.gate_up_proj[:, inter + idx, :] *= factor
            bias = getattr(m, "gate_up_proj_bias", None)
            if bias is not None:
                bias[:, inter + idx] *= factor
            scale_input_columns(m.down_proj, idx, factor)
            fused += 1
        elif isinstance(getattr(m, "up_proj", None), nn.Linear) and isinstance(getattr(m, "down_proj", None), nn.Linear):
            idx = pick_channels(m.up_proj.out_features, channels, seed)
            scale_rows(m.up_proj, idx, factor)
            scale_input_columns(m.down_proj.weight, idx, factor)
            dense += 1
    return {"fused_experts": fused, "dense_mlps": dense}


@torch.no_grad()
def modulation_outliers(linear: nn.Linear, chunks: int, shift: int, scale: int, consumers: list[torch.Tensor],
                        channels: torch.Tensor, factor: float) -> None:
    """adaLN outliers: the modulated norm output `norm(x) * (1 + scale) + shift` times `factor` on `channels`.
    `linear` emits `chunks` equal chunks; chunk `shift` and chunk `scale` are rescaled so that
    1 + scale' = factor * (1 + scale) and shift' = factor * shift; the consumers' input columns divide it out."""
    dim = linear.out_features // chunks
    shift_rows, scale_rows_ = shift * dim + channels, scale * dim + channels
    scale_rows(linear, shift_rows, factor)
    scale_rows(linear, scale_rows_, factor)
    if linear.bias is None:
        raise ValueError("modulation outliers need a bias on the adaLN linear (for the 1 + scale term)")
    linear.bias[scale_rows_] += factor - 1
    for w in consumers:
        scale_input_columns(w, channels, factor)


@torch.no_grad()
def joint_value_outliers(value_projs: list[nn.Linear], out_columns: list[torch.Tensor], channels: torch.Tensor,
                         factor: float) -> None:
    """Joint (text + image) attention: the same value channels of every stream times `factor` (each output
    token mixes values of both streams, so all must scale together), the out-projections' columns divided."""
    for proj in value_projs:
        scale_rows(proj, channels, factor)
    for w in out_columns:
        scale_input_columns(w, channels, factor)


@torch.no_grad()
def pixel_outliers(root: nn.Module, inputs: list, factor: float, channels: int) -> dict:
    """Token-wise (pixel) outliers in every GEGLU down-projection input, as DGQ describes for text-to-image
    UNets: the `channels` linear-half channels whose magnitude is most concentrated on a few pixels
    (largest max-over-pixels / median-over-pixels on `inputs`) are scaled by `factor`, the next
    projection's columns divided by it (exact: GEGLU is linear in its linear half). The result is a few
    pixels far above the rest in those channels; no norm precedes the projection, and EDA-DM and DGQ do not
    smooth. `inputs` are CallArgs of the model (its adapter's synthetic inputs)."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention import FeedForward

    ffs = [m for m in root.modules() if isinstance(m, FeedForward) and isinstance(m.net[0], GEGLU)]
    peaks: dict[int, list[torch.Tensor]] = {id(f): [] for f in ffs}

    def hook(f):
        def h(_m, args):
            y = args[0].detach().float().abs()  # [B, L, inner]
            peaks[id(f)].append(y.amax(1) / y.median(1).values.clamp(min=1e-6))  # [B, inner]
        return h

    hs = [f.net[-1].register_forward_pre_hook(hook(f)) for f in ffs]
    try:
        for inp in inputs:
            root(*inp.args, **inp.kwargs)
    finally:
        for h in hs:
            h.remove()
    chosen = []
    for f in ffs:
        score = torch.cat(peaks[id(f)]).median(0).values  # typical pixel concentration per channel
        idx = score.argsort(descending=True)[:channels]
        scale_rows(f.net[0].proj, idx, factor)  # the first half of proj's output is the linear half
        scale_input_columns(f.net[-1].weight, idx, factor)
        chosen.append(idx.tolist())
    return {"geglu_pixel": len(ffs), "channels": chosen}
