"""Integer formats, 2 to 8 bits, symmetric or asymmetric, per tensor / channel / group.

Codes are always stored unsigned: symmetric codes carry an implicit offset of 2^(bits-1),
asymmetric codes an explicit integer zero point. x_hat = (code - zero) * scale.
"""
from __future__ import annotations

import torch

from quantkit.formats.spec import FormatSpec


def num_groups(k: int, spec: FormatSpec) -> int:
    """Scales per row along the reduction dimension."""
    return k // spec.group_size if spec.granularity == "group" else 1


def scale_shape(shape: tuple[int, ...], spec: FormatSpec) -> tuple[int, ...]:
    """Shape of the scale (and zero) tensor for a tensor of `shape` ([..., K])."""
    if spec.granularity == "tensor":
        return (1,) * len(shape)
    return tuple(shape[:-1]) + (num_groups(shape[-1], spec),)


def _group_view(x: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """[..., K] -> [..., G, K/G] (tensor granularity: [1.., 1, numel])."""
    if spec.granularity == "tensor":
        return x.reshape((1,) * (x.dim() - 1) + (1, x.numel()))
    g = num_groups(x.shape[-1], spec)
    return x.reshape(*x.shape[:-1], g, x.shape[-1] // g)


def zero_offset(spec: FormatSpec) -> int:
    """Implicit zero of symmetric codes."""
    return 1 << (spec.bits - 1)


def int_qparams(
    x: torch.Tensor, spec: FormatSpec, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scale (and zero for asymmetric) of `x` [..., K]; scale is rounded to `scale_dtype`."""
    spec.check_k(x.shape[-1])
    # Min and max are exact in the input's own dtype: reduce first, convert the [.., groups] results only
    # (no fp32 copy of the weight; same values as reducing its fp32 copy).
    xg = _group_view(x, spec)
    return range_qparams(xg.amin(dim=-1), xg.amax(dim=-1), spec, scale_dtype)


def range_qparams(
    lo: torch.Tensor, hi: torch.Tensor, spec: FormatSpec, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """int_qparams from each group's min `lo` and max `hi` [..., G]."""
    if spec.symmetric:
        qmax = (1 << (spec.bits - 1)) - 1
        amax = torch.maximum(hi, lo.neg()).float()  # = |x|.amax, NaN included
        scale = amax / qmax
        zero = None
    else:
        levels = (1 << spec.bits) - 1
        lo = lo.float().clamp(max=0)
        hi = hi.float().clamp(min=0)
        scale = (hi - lo) / levels
    # An all-zero group would give scale 0 and NaN codes: any positive scale encodes it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(scale_dtype)
    # fp16 can underflow a tiny scale to 0; keep it representable.
    scale = torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(scale_dtype).tiny))
    if not spec.symmetric:
        zero = torch.round(-lo / scale.float()).clamp(0, levels).to(torch.uint8)
    return scale, zero


def quantize_int_with(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: FormatSpec
) -> torch.Tensor:
    """Codes (uint8, same shape as x) of `x` for given scale/zero."""
    xg = _group_view(x, spec)
    s = scale.float().unsqueeze(-1)
    # One fp32 buffer, updated in place (same values as the out-of-place expression, less memory traffic).
    q = xg.float().div_(s) if xg.dtype != torch.float32 else xg / s
    q.round_()
    if spec.symmetric:
        off = zero_offset(spec)
        q.clamp_(-off, off - 1).add_(off)
    else:
        q.add_(zero.float().unsqueeze(-1)).clamp_(0, (1 << spec.bits) - 1)
    return q.to(torch.uint8).reshape(x.shape)


def quantize_int(
    x: torch.Tensor, spec: FormatSpec, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest codes with min-max scales: (codes uint8 [..., K], scale, zero or None)."""
    scale, zero = int_qparams(x, spec, scale_dtype)
    return quantize_int_with(x, scale, zero, spec), scale, zero


def dequantize_int(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    spec: FormatSpec,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """x_hat = (code - zero) * scale, computed in fp32, returned in `dtype`."""
    cg = _group_view(codes, spec).float()
    z = float(zero_offset(spec)) if spec.symmetric else zero.float().unsqueeze(-1)
    out = (cg - z) * scale.float().unsqueeze(-1)
    return out.reshape(codes.shape).to(dtype)


def fake_quant_int(
    x: torch.Tensor, spec: FormatSpec, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize-dequantize in one step (dynamic min-max unless scale is given)."""
    if scale is None:
        scale, zero = int_qparams(x, spec)
    return dequantize_int(quantize_int_with(x, scale, zero, spec), scale, zero, spec, x.dtype)
