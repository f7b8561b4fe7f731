"""Triton device functions shared by quantkit's kernels: code unpacking, decoding, exact rounding.

This module imports triton at the top: only the Triton launchers import it, and only when a Triton
kernel is about to run (see kernels/dispatch.py), so `import quantkit` never pulls triton in.
"""
from __future__ import annotations

import triton
import triton.language as tl

from quantkit.kernels.configs import candidate_tiles


@triton.jit
def load_codes(row_ptr, offs_k, K, mask_n, BITS: tl.constexpr):
    """Unsigned codes [BLOCK_K, BLOCK_N] of W[n, k] from dense little-endian bit-packed rows.

    `row_ptr` [1, BLOCK_N] points at the first byte of each weight row; `offs_k` is [BLOCK_K].
    Code k sits at bit k*BITS of the row's bit stream (formats/packing.py).
    """
    bit = offs_k[:, None] * BITS  # [BLOCK_K, 1]
    byte = bit >> 3
    shift = bit & 7
    mask = (offs_k[:, None] < K) & mask_n  # [BLOCK_K, BLOCK_N]
    lo = tl.load(row_ptr + byte, mask=mask, other=0).to(tl.int32)  # [BLOCK_K, BLOCK_N]
    if BITS == 8:
        codes = lo
    elif (8 % BITS) == 0:
        # 2 and 4 bits never straddle a byte; neighbouring k re-read the same byte from L1.
        codes = (lo >> shift) & ((1 << BITS) - 1)
    else:
        # 3 (5, 6, 7) bits may straddle two bytes; only touch the second byte when it does, so the
        # last byte of a row is never read past.
        straddle = (shift + BITS) > 8
        hi = tl.load(row_ptr + byte + 1, mask=mask & straddle, other=0).to(tl.int32)
        codes = ((lo | (hi << 8)) >> shift) & ((1 << BITS) - 1)
    return codes


@triton.jit
def e2m1_twice(code):
    """Twice the value of E2M1 codes (sign<<3 | idx) as int32: {0,1,2,3,4,6,8,12} with sign.

    Doubling makes every E2M1 value an integer, so MXFP4 x MXFP4 products are exact int8 dots.
    """
    idx = code & 7
    e = idx >> 1  # exponent field
    m = idx & 1  # mantissa bit
    mag = tl.where(e == 0, m, (2 + m) << tl.maximum(e - 1, 0))
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def e8m0_scale(exps):
    """2^(E - 127) as fp32, exact for every E8M0 code (E = 0 gives the subnormal 2^-127)."""
    e = exps.to(tl.int32)
    normal = (e << 23).to(tl.float32, bitcast=True)
    sub = tl.full(e.shape, 1 << 22, tl.int32).to(tl.float32, bitcast=True)
    return tl.where(e == 0, sub, normal)


@triton.jit
def round_half_even(y):
    """Round fp32 to the nearest integer, ties to even, exactly like torch.round.

    floor(y + 0.5) would be wrong for 0.5 - 2^-25 (the addition rounds up); y - floor(y) is exact.
    """
    r = tl.floor(y)
    f = y - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    up = (f > 0.5) | ((f == 0.5) & odd)
    return r + up.to(tl.float32)


@triton.jit
def floor_log2(amax):
    """floor(log2(a)) of non-negative fp32 from its exponent bits (exact; subnormals and 0 give -127)."""
    return ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def encode_e2m1(v):
    """Nearest E2M1 code of fp32 `v` (already divided by its block scale), ties to even, saturating."""
    mag = tl.abs(v)
    # A bound equal to the magnitude rounds to the even neighbour: strict > towards odd
    # indices' lower bounds, >= towards even indices'.
    idx = ((mag > 0.25).to(tl.int32) + (mag >= 0.75).to(tl.int32) + (mag > 1.25).to(tl.int32)
           + (mag >= 1.75).to(tl.int32) + (mag > 2.5).to(tl.int32) + (mag >= 3.5).to(tl.int32)
           + (mag > 5.0).to(tl.int32))
    sign = tl.where((v < 0) & (idx != 0), 8, 0)
    return sign | idx


@triton.jit
def swizzle_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in grouped order, so GROUP_M row tiles share weight tiles in L2."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def group_scale_zero(s_row_ptr, z_row_ptr, g, stride_sg, stride_zg, mask,
                     IS_MX: tl.constexpr, HAS_ZERO: tl.constexpr, SYM_OFFSET: tl.constexpr):
    """(scale fp32, zero int32) of group index `g` for each weight row in `s_row_ptr` / `z_row_ptr`.

    MXFP4 scales are E8M0 exponents (zero unused); int scales are fp16 with an explicit uint8 zero
    (asymmetric) or the implicit 2^(bits-1) (symmetric). Shapes follow `g` and the row pointers.
    """
    s = tl.load(s_row_ptr + g * stride_sg, mask=mask, other=0)
    if IS_MX:
        scale = e8m0_scale(s)
    else:
        scale = s.to(tl.float32)
    if HAS_ZERO:
        zero = tl.load(z_row_ptr + g * stride_zg, mask=mask, other=0).to(tl.int32)
    else:
        zero = tl.full(scale.shape, SYM_OFFSET, tl.int32)
    return scale, zero


@triton.jit
def dequant_tile(codes, s_row_ptr, z_row_ptr, k0, offs_k, K, mask_n, stride_sg, stride_zg,
                 GROUP: tl.constexpr, BLOCK_K: tl.constexpr, IS_MX: tl.constexpr,
                 HAS_ZERO: tl.constexpr, SYM_OFFSET: tl.constexpr):
    """fp32 weights [BLOCK_K, BLOCK_N] from codes, bit-identical to QuantizedWeight.dequantize().

    GROUP = 0: one scale per row (channel/tensor). A tile inside one group (BLOCK_K divides GROUP)
    loads one scale per row; otherwise it gathers a scale per element (served from L1).
    """
    if GROUP == 0:
        scale, zero = group_scale_zero(s_row_ptr, z_row_ptr, 0, stride_sg, stride_zg, mask_n,
                                       IS_MX, HAS_ZERO, SYM_OFFSET)  # [1, BLOCK_N]
    elif (GROUP % BLOCK_K) == 0:
        # A split-K slice past the end (k0 >= K) re-reads the last group; its weights are masked.
        g = tl.minimum(k0, K - 1) // GROUP
        scale, zero = group_scale_zero(s_row_ptr, z_row_ptr, g, stride_sg, stride_zg,
                                       mask_n, IS_MX, HAS_ZERO, SYM_OFFSET)  # [1, BLOCK_N]
    else:
        g = offs_k[:, None] // GROUP  # [BLOCK_K, 1]
        scale, zero = group_scale_zero(s_row_ptr, z_row_ptr, g, stride_sg, stride_zg,
                                       mask_n & (offs_k[:, None] < K), IS_MX, HAS_ZERO,
                                       SYM_OFFSET)  # [BLOCK_K, BLOCK_N]
    if IS_MX:
        w = e2m1_twice(codes).to(tl.float32) * (0.5 * scale)
    else:
        w = (codes - zero).to(tl.float32) * scale
    return w


def all_configs() -> list:
    """Every candidate tile of every M bucket as triton.Config (pruned per call by prune_to_bucket)."""
    seen, configs = set(), []
    for bucket in (1, 64, 256, 1024):
        for t in candidate_tiles(bucket):
            if (t.block_m, t.block_n, t.block_k) in seen:
                continue
            seen.add((t.block_m, t.block_n, t.block_k))
            meta = t.meta()
            configs.append(triton.Config({k: meta[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")},
                                         num_warps=t.num_warps, num_stages=t.num_stages))
    return configs


def prune_to_bucket(configs: list, named_args: dict, **kwargs) -> list:
    """Autotuner hook: keep the candidates of this call's M bucket (and K tiles the kernel allows)."""
    wanted = {(t.block_m, t.block_n, t.block_k) for t in candidate_tiles(named_args["M_BUCKET"])}
    max_k = named_args.get("MAX_BLOCK_K", kwargs.get("MAX_BLOCK_K", 1 << 30))
    kept = [c for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) in wanted
            and c.kwargs["BLOCK_K"] <= max_k]
    if not kept:  # fall back to any tile the kernel allows
        kept = [c for c in configs if c.kwargs["BLOCK_K"] <= max_k] or configs[:1]
    return kept
