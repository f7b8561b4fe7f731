"""FP8 E4M3 (finite, max 448) with a float scale per tensor / channel / group."""
from __future__ import annotations

import torch

from quantkit.formats.integer import _group_view, scale_shape  # noqa: F401  (shared grouping rule)
from quantkit.formats.spec import FormatSpec

E4M3_MAX = 448.0


def quantize_fp8(
    x: torch.Tensor, spec: FormatSpec, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as uint8 bit patterns of float8_e4m3fn [..., K], scale)."""
    spec.check_k(x.shape[-1])
    xg = _group_view(x.float(), spec)
    scale = xg.abs().amax(dim=-1) / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(scale_dtype).tiny))
    # The cast does not saturate (overflow gives NaN), so clamp first.
    y = (xg / scale.float().unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX)
    codes = y.to(torch.float8_e4m3fn).view(torch.uint8)
    return codes.reshape(x.shape), scale


def dequantize_fp8(
    codes: torch.Tensor, scale: torch.Tensor, spec: FormatSpec, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    vals = _group_view(codes.view(torch.float8_e4m3fn).float(), spec)
    return (vals * scale.float().unsqueeze(-1)).reshape(codes.shape).to(dtype)


def fake_quant_fp8(x: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    codes, scale = quantize_fp8(x, spec)
    return dequantize_fp8(codes, scale, spec, x.dtype)
