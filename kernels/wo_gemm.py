"""Weight-only GEMM (W{2,3,4,8}A16 int, sym/asym, per channel/group; MXFP4 W4A16).

y = x @ dequant(W)^T + b with x fp16/bf16 [M, K] and W packed [N, K*bits/8]. Codes are unpacked and
dequantized in registers inside the main loop (the dense weight never exists in memory) and
accumulated in fp32. Small M splits K across CTAs: one token's GEMM is a weight stream, and without
the split only N/BLOCK_N CTAs would pull it. Reference: qlinear_reference(x, qweight, bias).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from quantkit.formats.qweight import QuantizedWeight
from quantkit.kernels.configs import TileConfig, choose_split_k, default_tile, is_interpreter, m_bucket
from quantkit.kernels.layout import weight_layout
from quantkit.kernels.triton_common import (all_configs, dequant_tile, load_codes, prune_to_bucket,
                                            swizzle_tile)


@triton.jit
def _wo_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_wn, stride_sn, stride_sg, stride_zn, stride_zg, stride_om, stride_split,
    BITS: tl.constexpr, GROUP: tl.constexpr, IS_MX: tl.constexpr, HAS_ZERO: tl.constexpr,
    SYM_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = swizzle_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_m = offs_m[:, None] < M  # [BLOCK_M, 1]
    mask_n = offs_n[None, :] < N  # [1, BLOCK_N]
    w_rows = w_ptr + offs_n[None, :] * stride_wn  # [1, BLOCK_N]
    s_rows = s_ptr + offs_n[None, :] * stride_sn
    z_rows = z_ptr + offs_n[None, :] * stride_zn

    # Each K slice is a whole number of K tiles, so a tile never straddles two slices.
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_begin = pid_k * tiles_per_split * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, tiles_per_split):
        k0 = k_begin + t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m & (offs_k[None, :] < K), other=0.0)  # [BLOCK_M, BLOCK_K]
        codes = load_codes(w_rows, offs_k, K, mask_n, BITS)  # [BLOCK_K, BLOCK_N]
        w = dequant_tile(codes, s_rows, z_rows, k0, offs_k, K, mask_n, stride_sg, stride_zg,
                         GROUP, BLOCK_K, IS_MX, HAS_ZERO, SYM_OFFSET)  # [BLOCK_K, BLOCK_N] fp32
        # Rounding to x's dtype first reproduces the reference's dequantize(x.dtype) exactly.
        w = tl.where(offs_k[:, None] < K, w, 0.0).to(x_ptr.dtype.element_ty)
        acc = tl.dot(x, w, acc)  # fp32 accumulate

    mask = mask_m & mask_n
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n[None, :], mask=mask_n, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # fp32 partial sums [SPLIT_K, M, N], reduced by the launcher in a fixed order (deterministic).
        tl.store(out_ptr + pid_k * stride_split + offs_m[:, None] * stride_om + offs_n[None, :], acc,
                 mask=mask)


@functools.cache
def _autotuned_kernel():
    """The autotuned kernel, built on first use (tuned per M bucket, N, K, split and format)."""
    return triton.autotune(all_configs(), key=["M_BUCKET", "N", "K", "SPLIT_K", "BITS", "GROUP", "IS_MX"],
                           prune_configs_by={"early_config_prune": prune_to_bucket})(_wo_gemm_kernel)


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number exercises the split path
    return torch.cuda.get_device_properties(device).multi_processor_count


def wo_linear_triton(
    x: torch.Tensor,  # [..., K] fp16/bf16
    qweight: QuantizedWeight,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    act: None = None,
    *,
    config: TileConfig | None = None,
    split_k: int | None = None,
) -> torch.Tensor:  # [..., N]
    """Triton weight-only linear; same contract as qlinear_reference(x, qweight, bias).

    config / split_k pin the launch (tests); by default tiles are autotuned per M bucket and split-K
    follows choose_split_k.
    """
    if act is not None:
        raise ValueError("wo_linear_triton is weight-only: quantized activations go through aq_linear_triton")
    lay = weight_layout(qweight)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, lay.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n, k = x2.shape[0], lay.n, lay.k
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*lead, n)
    bucket = m_bucket(m)
    if config is None and is_interpreter():
        config = default_tile(bucket)
    if split_k is None:
        split_k = choose_split_k(m, n, k, num_sms(x.device), (config or default_tile(bucket)).block_k)
    target = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    has_bias = bias is not None and split_k == 1
    args = (x2, lay.packed, lay.scale, lay.zero, bias if has_bias else out, target,
            m, n, k, bucket,
            x2.stride(0), lay.row_bytes, lay.scale.stride(1), lay.scale.stride(2),
            lay.zero.stride(1), lay.zero.stride(2), n, target.stride(0) if split_k > 1 else 0)
    flags = dict(lay.constexprs(), HAS_BIAS=has_bias, SPLIT_K=split_k)
    if config is not None:
        grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), split_k)
        _wo_gemm_kernel[grid](*args, **flags, **config.meta())
    else:
        def grid(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split_k)
        _autotuned_kernel()[grid](*args, **flags)
    if split_k > 1:
        acc = target.sum(dim=0)
        if bias is not None:
            acc += bias.float()
        out = acc.to(x.dtype)
    return out.reshape(*lead, n)
