"""Integer GEMM of quantized activations and weights: W8A8, W4A4 int, MXFP4 W4A4.

Activations come from act_quant.py as signed int8 values q [M, K] with fp32 scales [M, GA]; weights
are decoded in registers to signed integers (code - zero, or twice the E2M1 value) and fed to an
int8 x int8 -> int32 tl.dot. Scales are applied in the epilogue when both sides have one scale per
row (per-token x per-channel: the classic W8A8), otherwise once per K tile, which must then lie
inside one group of both operands. References: aq_matmul_reference, qlinear_reference.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from quantkit.formats.qweight import QuantizedWeight
from quantkit.kernels.act_quant import quantize_act_triton
from quantkit.kernels.aq_rules import max_block_k
from quantkit.kernels.configs import TileConfig, default_tile, is_interpreter, m_bucket
from quantkit.kernels.layout import weight_layout
from quantkit.kernels.triton_common import (all_configs, e2m1_twice, group_scale_zero, load_codes,
                                            prune_to_bucket, swizzle_tile)


@triton.jit
def _aq_gemm_kernel(
    a_ptr, as_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_asm, stride_wn, stride_sn, stride_sg, stride_zn, stride_zg, stride_om,
    A_GROUP: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, IS_MX: tl.constexpr,
    HAS_ZERO: tl.constexpr, SYM_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, MAX_BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    tl.static_assert(BLOCK_K <= MAX_BLOCK_K)  # a K tile must sit inside one scale group
    pid_m, pid_n = swizzle_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_m = offs_m[:, None] < M  # [BLOCK_M, 1]
    mask_n = offs_n[None, :] < N  # [1, BLOCK_N]
    w_rows = w_ptr + offs_n[None, :] * stride_wn  # [1, BLOCK_N]
    s_rows = s_ptr + offs_n[None, :] * stride_sn
    z_rows = z_ptr + offs_n[None, :] * stride_zn
    a_scale_rows = as_ptr + offs_m[:, None] * stride_asm  # [BLOCK_M, 1]
    PER_TILE: tl.constexpr = (A_GROUP != 0) or (GROUP != 0)

    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
                    mask=mask_m & (offs_k[None, :] < K), other=0)  # [BLOCK_M, BLOCK_K] int8
        if BITS == 8:
            # One code per byte: read the tile K-major as stored ([BLOCK_N, BLOCK_K], 16-byte loads
            # along each row, straight into the MMA's shared-memory operand) and transpose it there,
            # instead of one byte load per code across rows.
            codes = tl.trans(tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                                     mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0)).to(tl.int32)
        elif BITS == 4:
            # Two codes per byte: the same K-major tile of BLOCK_K/2 bytes, nibbles split and joined
            # back in k order (low nibble first) in registers.
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # [BLOCK_K/2] byte columns
            b = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_b[None, :],
                        mask=(offs_n[:, None] < N) & (offs_b[None, :] < (K + 1) // 2), other=0).to(tl.int32)
            codes = tl.trans(tl.reshape(tl.join(b & 15, b >> 4), (BLOCK_N, BLOCK_K)))
        else:
            codes = load_codes(w_rows, offs_k, K, mask_n, BITS)  # [BLOCK_K, BLOCK_N]
        g = 0 if GROUP == 0 else k0 // GROUP
        w_scale, zero = group_scale_zero(s_rows, z_rows, g, stride_sg, stride_zg, mask_n,
                                         IS_MX, HAS_ZERO, SYM_OFFSET)  # [1, BLOCK_N]
        if IS_MX:
            w_int = e2m1_twice(codes)
            w_scale = 0.5 * w_scale
        else:
            w_int = codes - zero
        w_int = tl.where(offs_k[:, None] < K, w_int, 0).to(tl.int8)  # [BLOCK_K, BLOCK_N]
        if PER_TILE:
            ga = 0 if A_GROUP == 0 else k0 // A_GROUP
            a_scale = tl.load(a_scale_rows + ga, mask=mask_m, other=0.0)  # [BLOCK_M, 1]
            acc += tl.dot(a, w_int, out_dtype=tl.int32).to(tl.float32) * a_scale * w_scale  # int32 tile, scaled once
        else:
            # out_dtype spelled out: triton <= 3.6 checks the accumulator against it (default fp32)
            acc_i = tl.dot(a, w_int, acc_i, out_dtype=tl.int32)  # exact int32 accumulation over all of K

    if not PER_TILE:
        w_scale, zero = group_scale_zero(s_rows, z_rows, 0, stride_sg, stride_zg, mask_n,
                                         IS_MX, HAS_ZERO, SYM_OFFSET)  # [1, BLOCK_N]
        a_scale = tl.load(a_scale_rows, mask=mask_m, other=0.0)  # [BLOCK_M, 1]
        acc = acc_i.to(tl.float32) * a_scale * w_scale
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n[None, :], mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m & mask_n)


@functools.cache
def _autotuned_kernel():
    return triton.autotune(all_configs(), key=["M_BUCKET", "N", "K", "A_GROUP", "BITS", "GROUP", "IS_MX"],
                           prune_configs_by={"early_config_prune": prune_to_bucket})(_aq_gemm_kernel)


def aq_matmul_triton(
    q: torch.Tensor,  # [M, K] int8
    a_scale: torch.Tensor,  # [M, GA] fp32
    qweight: QuantizedWeight,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    out_dtype: torch.dtype = torch.float16,
    *,
    config: TileConfig | None = None,
) -> torch.Tensor:  # [M, N]
    """Integer GEMM with scales; same contract as aq_matmul_reference."""
    lay = weight_layout(qweight)
    m, k = q.shape
    n = lay.n
    a_group = 0 if a_scale.shape[-1] == 1 else k // a_scale.shape[-1]
    bk_max = max_block_k(a_group, lay.group)
    out = torch.empty((m, n), dtype=out_dtype, device=q.device)
    if m == 0:
        return out
    bucket = m_bucket(m)
    if config is None and is_interpreter():
        config = default_tile(bucket)
    if config is not None and config.block_k > bk_max:
        config = TileConfig(config.block_m, config.block_n, bk_max, config.num_warps, config.num_stages,
                            config.group_m)
    args = (q, a_scale, lay.packed, lay.scale, lay.zero, out if bias is None else bias, out,
            m, n, k, bucket,
            q.stride(0), a_scale.stride(0), lay.row_bytes, lay.scale.stride(1), lay.scale.stride(2),
            lay.zero.stride(1), lay.zero.stride(2), out.stride(0))
    flags = dict(lay.constexprs(), A_GROUP=a_group, HAS_BIAS=bias is not None, MAX_BLOCK_K=bk_max)
    if config is not None:
        grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
        _aq_gemm_kernel[grid](*args, **flags, **config.meta())
    else:
        def grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _autotuned_kernel()[grid](*args, **flags)
    return out


def aq_linear_triton(
    x: torch.Tensor,  # [..., K] fp16/bf16
    qweight: QuantizedWeight,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    act=None,  # ActQuantizer (int sym dynamic per token/group or static per tensor, or mxfp4)
    rotation: torch.Tensor | None = None,  # [32, 32] or [K/32, 32, 32], mxfp4 activations only
    *,
    config: TileConfig | None = None,
) -> torch.Tensor:  # [..., N]
    """Quantize x with the fused kernel, then the integer GEMM; same contract as qlinear_reference."""
    k = qweight.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    static = None if act.dynamic else act.scale
    q, a_scale = quantize_act_triton(x2, act.spec, static, rotation)
    y = aq_matmul_triton(q, a_scale, qweight, bias, x.dtype, config=config)
    return y.reshape(*lead, qweight.shape[0])
