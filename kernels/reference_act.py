"""Pure-torch references of the activation-quantized kernels (act_quant.py, aq_gemm.py)."""
from __future__ import annotations

import torch

from quantkit.formats import integer, mxfp4
from quantkit.formats.qweight import QuantizedWeight
from quantkit.formats.spec import MX_BLOCK, FormatSpec


def rotate_blocks(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x [..., K] times a block-diagonal matrix of 32x32 blocks: R [32, 32] (shared) or [K/32, 32, 32].

    Computed as the fused kernel does: R rounded to x's dtype, fp32 accumulation, result in x's dtype.
    """
    k = x.shape[-1]
    xb = x.reshape(*x.shape[:-1], k // MX_BLOCK, 1, MX_BLOCK).float()  # [..., K/32, 1, 32]
    r = rotation.to(x.dtype).float().reshape(-1, MX_BLOCK, MX_BLOCK)  # [1 or K/32, 32, 32]
    return (xb @ r).reshape(x.shape).to(x.dtype)


def quantize_act_reference(
    x: torch.Tensor,  # [M, K]
    spec: FormatSpec,
    static_scale: torch.Tensor | None = None,
    rotation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (q int8 [M, K], scale fp32 [M, G])
    """Signed integer values and fp32 scales with x_hat = q * scale (see kernels/act_quant.py)."""
    if rotation is not None:
        x = rotate_blocks(x, rotation)
    m, k = x.shape
    if spec.kind == "mxfp4":
        codes, exps = mxfp4.quantize_mxfp4(x, spec)
        q = (2 * mxfp4.decode_e2m1(codes)).to(torch.int8)  # twice the E2M1 value: an integer
        return q, 0.5 * mxfp4.exponent_scale(exps)
    off = integer.zero_offset(spec)
    if static_scale is not None:
        codes = integer.quantize_int_with(x, static_scale.float().reshape(1, 1), None, spec)
        scale = static_scale.float().reshape(1, 1).expand(m, 1)
    else:
        codes, scale, _ = integer.quantize_int(x, spec)
    return (codes.to(torch.int16) - off).to(torch.int8), scale.float().reshape(m, -1).contiguous()


def weight_int_values(qweight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(signed integer weights [N, K] as int32, fp32 scale [N, G]) with W_hat = w_int * scale per group."""
    codes = qweight.codes().to(torch.int32)
    spec = qweight.spec
    if spec.kind == "mxfp4":
        return (2 * mxfp4.decode_e2m1(codes)).to(torch.int32), 0.5 * mxfp4.exponent_scale(qweight.scale)
    zero = integer.zero_offset(spec) if qweight.zero is None else qweight.zero.to(torch.int32)
    if torch.is_tensor(zero):
        g = zero.shape[-1]
        zero = zero.repeat_interleave(codes.shape[-1] // g, dim=-1)
    return codes - zero, qweight.scale.float()


def aq_matmul_reference(
    q: torch.Tensor,  # [M, K] int8
    a_scale: torch.Tensor,  # [M, GA] fp32
    qweight: QuantizedWeight,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:  # [M, N]
    """sum_k (q * s_a)[m, k] * (w_int * s_w)[n, k] + b, in float64 (exact for the kernel's test sizes)."""
    n, k = qweight.shape
    w_int, w_scale = weight_int_values(qweight)
    a = q.double() * a_scale.double().repeat_interleave(k // a_scale.shape[-1], dim=-1)
    w_scale = w_scale.double().expand(n, -1)
    w = w_int.double() * w_scale.repeat_interleave(k // w_scale.shape[-1], dim=-1)
    y = a @ w.T
    if bias is not None:
        y = y + bias.double()
    return y.to(out_dtype)
