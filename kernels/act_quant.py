"""Fused activation quantization kernels feeding the integer GEMM (aq_gemm.py).

Both produce the GEMM's input layout: signed int8 values q [M, K] and fp32 scales [M, G] with
x_hat = q * scale, bit-identical (in fp32) to the ActQuantizer's fake quantization:
  int:   q = clamp(round(x / s), -2^(b-1), 2^(b-1)-1), s = amax/(2^(b-1)-1) per token or group
         (dynamic) or the calibrated per-tensor scale (static); q is the code minus its offset.
  mxfp4: q = 2 * E2M1 value (an integer in [-12, 12]), scale = 2^(E-127) / 2 per 32 along K,
         optionally after a block-diagonal 32x32 rotation of x (DuQuant++), fused in the same pass.
Reference: quantize_act_reference (kernels/reference_act.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.formats.spec import MX_BLOCK, FormatSpec
from quantkit.kernels.triton_common import e2m1_twice, e8m0_scale, encode_e2m1, floor_log2, round_half_even


SINGLE_MAX = 8192  # elements of one scale group kept in registers by one program (fp32: 64 per thread)
GRID_CTAS = 512  # programs to aim for (about 4 per SM on an H100)


@triton.jit
def _int_act_quant_kernel(
    x_ptr, q_ptr, s_ptr, static_s_ptr,
    M, K, GS, stride_xm, stride_qm, stride_sm,
    QMAX: tl.constexpr, STATIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    SINGLE: tl.constexpr,
):
    # One program: BLOCK_M rows x one scale group [k_lo, k_lo + GS) (GS = K for per-token scales).
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    mask_m = offs_m[:, None] < M  # [BLOCK_M, 1]
    k_lo = pid_g * GS
    k_hi = k_lo + GS
    if SINGLE:  # the group fits one tile (BLOCK_K >= GS): read x once, keep it in registers
        offs_k = k_lo + tl.arange(0, BLOCK_K)
        mask = mask_m & (offs_k[None, :] < k_hi)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        if STATIC:
            scale = tl.zeros((BLOCK_M,), tl.float32) + tl.load(static_s_ptr).to(tl.float32)
        else:
            scale = tl.div_rn(tl.max(tl.abs(x), axis=1), tl.full((BLOCK_M,), QMAX, tl.float32))
            scale = tl.where(scale > 0, scale, 1.0)
        y = tl.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
        q = tl.minimum(tl.maximum(round_half_even(y), -QMAX - 1.0), QMAX * 1.0)
        tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], q.to(tl.int8), mask=mask)
        tl.store(s_ptr + offs_m * stride_sm + pid_g, scale, mask=offs_m < M)
        return
    if STATIC:
        scale = tl.zeros((BLOCK_M,), tl.float32) + tl.load(static_s_ptr).to(tl.float32)
    else:
        amax = tl.zeros((BLOCK_M,), tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m & (offs_k[None, :] < k_hi), other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        # IEEE division, as torch does: the default `/` may be approximate on GPU.
        scale = tl.div_rn(amax, tl.full((BLOCK_M,), QMAX, tl.float32))
        scale = tl.where(scale > 0, scale, 1.0)  # an all-zero row: any scale encodes it
    # Second pass re-reads the row from L2; rows are too long (up to ~16K) to keep in registers.
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_m & (offs_k[None, :] < k_hi)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
        q = tl.minimum(tl.maximum(round_half_even(y), -QMAX - 1.0), QMAX * 1.0)
        tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], q.to(tl.int8), mask=mask)
    tl.store(s_ptr + offs_m * stride_sm + pid_g, scale, mask=offs_m < M)


@triton.jit
def _mx_act_quant_kernel(
    x_ptr, r_ptr, q_ptr, s_ptr,
    M, stride_xm, stride_qm, stride_sm, stride_rb,
    ROTATE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # One program: BLOCK_M rows x one 32-element MX block.
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_k = pid_b * 32 + tl.arange(0, 32)  # [32]
    mask = offs_m[:, None] < M  # [BLOCK_M, 1]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)  # [BLOCK_M, 32]
    if ROTATE:
        offs_r = tl.arange(0, 32)
        r = tl.load(r_ptr + pid_b * stride_rb + offs_r[:, None] * 32 + offs_r[None, :])  # [32, 32]
        # Rounded back to x's dtype: the quantizer sees what an unfused rotate-then-quantize would.
        x = tl.dot(x, r).to(x_ptr.dtype.element_ty)  # [BLOCK_M, 32]
    x = x.to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)  # [BLOCK_M]
    # OCP rule: X = 2^(floor(log2 amax) - 2); amax = 0 gives the smallest exponent like the reference.
    e = tl.minimum(tl.maximum(floor_log2(amax) - 2, -127), 127) + 127  # E8M0 code
    scale = e8m0_scale(e)  # [BLOCK_M]
    v = tl.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
    q = e2m1_twice(encode_e2m1(v))  # [BLOCK_M, 32] in [-12, 12]
    tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], q.to(tl.int8), mask=mask)
    tl.store(s_ptr + offs_m * stride_sm + pid_b, 0.5 * scale, mask=offs_m < M)


def quantize_act_triton(
    x: torch.Tensor,  # [M, K] fp16/bf16
    spec: FormatSpec,
    static_scale: torch.Tensor | None = None,  # [] fp32: static per-tensor int scale
    rotation: torch.Tensor | None = None,  # [32, 32] or [K/32, 32, 32]: mxfp4 only
    *,
    block_m: int | None = None,
    block_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (q int8 [M, K], scale fp32 [M, G])
    """Quantize activations for the integer GEMM; same contract as quantize_act_reference.

    Int formats: a scale group of up to SINGLE_MAX elements is read once and kept in registers
    (block_k pins the two-pass loop instead, for tests); rows per program shrink until the grid has
    about GRID_CTAS programs, so M = 1024 is no longer 64 programs.
    """
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    if spec.kind == "mxfp4":
        nb = k // MX_BLOCK
        scale = torch.empty((m, nb), dtype=torch.float32, device=x.device)
        r = x if rotation is None else rotation.to(x.dtype).reshape(-1, 32, 32).contiguous()
        if m:
            block_m = block_m or 16
            _mx_act_quant_kernel[(triton.cdiv(m, block_m), nb)](
                x, r, q, scale, m, x.stride(0), q.stride(0), scale.stride(0),
                0 if rotation is None or r.shape[0] == 1 else r.stride(0),
                ROTATE=rotation is not None, BLOCK_M=block_m)
        return q, scale
    if rotation is not None:
        raise ValueError("the fused rotation is implemented for mxfp4 activations only")
    if spec.granularity == "tensor" and static_scale is None:
        raise ValueError("dynamic per-tensor activation scales need a global reduction: use the reference")
    gs = k if spec.granularity in ("channel", "tensor") else int(spec.group_size)
    scale = torch.empty((m, k // gs), dtype=torch.float32, device=x.device)
    if m:
        gs_p2 = triton.next_power_of_2(gs)
        single = block_k is None and gs_p2 <= SINGLE_MAX
        bk = gs_p2 if single else min(block_k or 128, gs_p2)
        if block_m is None:
            per_cta = max(1, SINGLE_MAX // gs_p2) if single else 16  # rows whose groups fit the registers
            want = max(1, (m * (k // gs)) // GRID_CTAS)  # rows per program for ~GRID_CTAS programs
            block_m = min(16, per_cta, 1 << (want.bit_length() - 1))
        _int_act_quant_kernel[(triton.cdiv(m, block_m), k // gs)](
            x, q, scale, scale if static_scale is None else static_scale.float().reshape(1),
            m, k, gs, x.stride(0), q.stride(0), scale.stride(0),
            QMAX=(1 << (spec.bits - 1)) - 1, STATIC=static_scale is not None,
            BLOCK_M=block_m, BLOCK_K=bk, SINGLE=single)
    return q, scale
