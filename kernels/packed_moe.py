"""Fused MoE on the repacked expert layout (kernels/repack.py): grouped GEMM, two launches per layer.

Pairs (token, slot) are sorted by expert on device, no host sync (moe_align.moe_align_fused: one launch
that also gives each sorted pair its token row and routing weight; moe.moe_align's torch ops above
ALIGN_MAX_PAIRS). Each program takes one BLOCK_M slice of one expert's pairs, one BLOCK_N slice of
outputs and one K slice, and runs the packed MMA loop (packed_gemm._mma_k_loop: 16-byte word loads,
magic-number dequantization, scales per group on the fp32 partials).
- gate/up: with SiLU (SwiGLU, the usual act_fn) and the decode tile, each program computes the same
  BLOCK_N columns of the gate half and the up half and writes silu(gate) * up, [pairs, I] in sorted
  order: the [pairs, 2I] intermediate and the torch activation launches are gone. Any other act_fn,
  or a layout's own gate function (gpt-oss): [pairs, 2I] out, then act_fn(gate) * up or gate_fn in torch.
- down: multiplies by the routing weight in its epilogue and adds fp32 atomically into the token's row
  of [T, H]: the k slots of a token and the K slices of a decode-sized down projection (split-K) meet
  there, no [T*k, H] partials and no torch reduction but the final cast.
Tiles: this GPU's tuning table (kernels/tuning.py, per format, experts, shapes and pairs per expert),
else packed_moe_tile. Reference: qexperts_reference (weight-only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from quantkit.kernels.configs import TileConfig
from quantkit.kernels.moe import moe_align
from quantkit.kernels.moe_align import ALIGN_MAX_PAIRS, moe_align_fused
from quantkit.kernels.packed_gemm import RB, _mma_k_loop
from quantkit.kernels.reference import ActFn, gate_and_up
from quantkit.kernels.repack import KernelWeight


@triton.jit
def _packed_moe_kernel(
    a_ptr, w_ptr, s_ptr, z_ptr, b_ptr, rw_ptr, out_ptr,
    a_rows_ptr, c_rows_ptr, blk_expert_ptr, blk_start_ptr, blk_end_ptr,
    N, K, E, n_blocks, stride_am, stride_we, stride_se, stride_be, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, IS_MX: tl.constexpr, HAS_ZERO: tl.constexpr,
    SYM_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ROW_WEIGHT: tl.constexpr,
    ATOMIC_OUT: tl.constexpr, SPLIT_K: tl.constexpr, USE_ASM: tl.constexpr,
    A_SORTED: tl.constexpr, C_SORTED: tl.constexpr, SILU_GLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
):
    """N: output columns (I for SILU_GLU, whose weight has 2N: gate columns, then up columns).
    A_SORTED / C_SORTED: input / output row of a pair is its sorted position (no index load)."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    e = tl.load(blk_expert_ptr + pid_b)
    if e >= E:
        return  # the grid is an upper bound on the blocks (no host sync); this one is empty
    start = tl.load(blk_start_ptr + pid_b)
    end = tl.load(blk_end_ptr + pid_b)
    offs_p = start + tl.arange(0, BLOCK_M)  # [BLOCK_M] sorted pair positions
    mask_p = offs_p < end
    if A_SORTED:
        a_rows = offs_p
    else:
        a_rows = tl.load(a_rows_ptr + offs_p, mask=mask_p, other=0)  # [BLOCK_M] input row of each pair
    x_rows = a_ptr + a_rows[:, None].to(tl.int64) * stride_am  # [BLOCK_M, 1]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_n1 = offs_n < N
    e64 = e.to(tl.int64)  # expert buffers can exceed 2^31 elements
    WN: tl.constexpr = 2 if SILU_GLU else 1
    w_e = w_ptr + e64 * stride_we
    s_e = s_ptr + e64 * stride_se
    z_e = z_ptr + e64 * stride_se
    per_split = tl.cdiv(n_blocks, SPLIT_K)
    b_begin = pid_k * per_split
    b_end = tl.minimum(b_begin + per_split, n_blocks)
    # (the gate half masks at the weight's 2N columns: its extra columns read the up half, never stored)
    acc = _mma_k_loop(x_rows, mask_p[:, None], w_e + offs_n[None, :], s_e, z_e, WN * N, K, b_begin, b_end,
                      offs_n, BITS, GROUP, IS_MX, HAS_ZERO, SYM_OFFSET, USE_ASM, EVEN_N, BLOCK_M, BLOCK_N)
    if HAS_BIAS:  # once per output: by the first K slice
        bias = tl.load(b_ptr + e64 * stride_be + offs_n, mask=mask_n1, other=0.0).to(tl.float32)
        acc += bias[None, :] * (pid_k == 0).to(tl.float32)
    if SILU_GLU:  # the up half: columns N + offs_n of the same expert, then silu(gate) * up
        offs_u = N + offs_n
        up = _mma_k_loop(x_rows, mask_p[:, None], w_e + offs_u[None, :], s_e, z_e, 2 * N, K, b_begin, b_end,
                         offs_u, BITS, GROUP, IS_MX, HAS_ZERO, SYM_OFFSET, USE_ASM, EVEN_N, BLOCK_M, BLOCK_N)
        if HAS_BIAS:
            up += tl.load(b_ptr + e64 * stride_be + offs_u, mask=mask_n1, other=0.0).to(tl.float32)[None, :]
        acc = acc / (1.0 + tl.exp(-acc)) * up
    if HAS_ROW_WEIGHT:
        acc *= tl.load(rw_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)[:, None]  # routing weight
    if C_SORTED:
        c_rows = offs_p
    else:
        c_rows = tl.load(c_rows_ptr + offs_p, mask=mask_p, other=0)  # [BLOCK_M] output row of each pair
    ptrs = out_ptr + c_rows[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    mask = mask_p[:, None] & mask_n1[None, :]
    if ATOMIC_OUT:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def packed_moe_tile(n_pairs: int, n_experts: int) -> TileConfig:
    """16-row blocks while experts see few tokens (decode), 64 above; both spill-free on sm_90a (bench/sass.py)."""
    if n_pairs / max(1, n_experts) <= 16:
        return TileConfig(16, 256, 0, num_warps=4, num_stages=4)
    return TileConfig(64, 128, 0, num_warps=4, num_stages=4)


def packed_moe_candidates(n_pairs: int, n_experts: int) -> list[TileConfig]:
    """Tiles the GPU tuner tries for a fused MoE layer (the default first); 16-row tiles also take the SwiGLU
    epilogue, so the tuner weighs fusing against the wider tiles."""
    first = packed_moe_tile(n_pairs, n_experts)
    more = [TileConfig(bm, bn, 0, num_warps=w, num_stages=s) for bm, bn, w, s in
            ((16, 256, 4, 4), (16, 128, 4, 4), (32, 128, 4, 3), (64, 128, 4, 4), (64, 64, 4, 4), (128, 128, 8, 3))]
    return [first] + [t for t in more if t != first]


def moe_split_k(n_pairs: int, n_experts: int, n: int, n_kblocks: int, num_sms: int, tile: TileConfig) -> int:
    """K slices of the down projection so a decode-sized layer still has ~2 CTAs per SM."""
    blocks = -(-n_pairs // tile.block_m) + min(n_experts, n_pairs)  # upper bound of busy row blocks
    tiles = blocks * -(-n // tile.block_n)
    return max(1, min(-(-(2 * num_sms) // tiles), n_kblocks // 2, 16))


def is_silu(act_fn: ActFn) -> bool:
    """Whether act_fn is SiLU (torch's function or module, or transformers' SiLUActivation, which calls it)."""
    return act_fn is F.silu or isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation"


def _launch(a: torch.Tensor, kw: KernelWeight, bias, row_weight, out: torch.Tensor, a_rows, c_rows, plan,
            config: TileConfig, split_k: int, atomic: bool, silu_glu: bool = False) -> None:
    """a_rows / c_rows: index tensors, or None where a pair's row is its sorted position."""
    if silu_glu and split_k != 1:
        raise ValueError("the SwiGLU epilogue needs whole K sums (split_k = 1)")
    n_blocks = kw.words.shape[1] // RB
    n = kw.n // 2 if silu_glu else kw.n  # output columns
    grid = (plan["expert"].numel(), triton.cdiv(n, config.block_n), split_k)
    _packed_moe_kernel[grid](
        a, kw.words, kw.scale, kw.zero, bias if bias is not None else out,
        row_weight if row_weight is not None else out, out,
        a_rows if a_rows is not None else plan["expert"], c_rows if c_rows is not None else plan["expert"],
        plan["expert"], plan["start"], plan["end"],
        n, kw.k, kw.words.shape[0], n_blocks, a.stride(0), kw.words.stride(0), kw.scale.stride(0),
        0 if bias is None else bias.stride(0), out.stride(0),
        **kw.constexprs(), HAS_BIAS=bias is not None, HAS_ROW_WEIGHT=row_weight is not None, ATOMIC_OUT=atomic,
        SPLIT_K=split_k, USE_ASM=False, A_SORTED=a_rows is None, C_SORTED=c_rows is None, SILU_GLU=silu_glu,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, EVEN_N=n % config.block_n == 0,
        num_warps=config.num_warps, num_stages=config.num_stages)


def qexperts_packed(
    hidden: torch.Tensor,  # [T, H] fp16/bf16
    top_k_index: torch.Tensor,  # [T, k]
    top_k_weights: torch.Tensor,  # [T, k]
    gate_up: KernelWeight,  # [E, 2I, H] repacked
    down: KernelWeight,  # [E, H, I] repacked
    act_fn: ActFn,
    gate_up_bias: torch.Tensor | None = None,  # [E, 2I]
    down_bias: torch.Tensor | None = None,  # [E, H]
    *,
    config: TileConfig | None = None,
    split_k: int | None = None,
    fused_align: bool | None = None,
    gate_fn: ActFn | None = None,
) -> torch.Tensor:  # [T, H]
    """Routed experts in two grouped-GEMM launches; same contract as qexperts_reference (weight-only).

    fused_align: one-launch alignment (default: up to ALIGN_MAX_PAIRS pairs)."""
    from quantkit.kernels.packed_linear import num_sms

    t, h = hidden.shape
    k = top_k_index.shape[-1]
    n_experts = gate_up.words.shape[0]
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    p = t * k
    if config is None:
        config = packed_moe_tile(p, n_experts)
        if hidden.is_cuda:
            from quantkit.kernels.tuning import tuned_moe_tile

            config = tuned_moe_tile(hidden.device, gate_up, down, p) or config
    if fused_align if fused_align is not None else p <= ALIGN_MAX_PAIRS:
        plan = moe_align_fused(top_k_index, n_experts, config.block_m, top_k_weights)
        token_of, row_weight = plan["token"], plan["weight"]
    else:
        plan = moe_align(top_k_index, n_experts, config.block_m)
        token_of = (plan["order"] // k).to(torch.int32)
        row_weight = top_k_weights.reshape(-1).float()[plan["order"].long()]
    if gate_fn is None and is_silu(act_fn) and config.block_m <= 16:  # SwiGLU in the gate/up epilogue
        # (decode-sized tiles, where launches and the [P, 2I] round trip matter; the 64-row prefill tile with
        # two K loops needs 255 registers on sm_90a, bench/sass.py, so prefill keeps the torch activation)
        mid = torch.empty((p, gate_up.n // 2), dtype=hidden.dtype, device=hidden.device)
        _launch(hidden, gate_up, gate_up_bias, None, mid, token_of, None, plan, config, 1, False, silu_glu=True)
    else:
        gu_out = torch.empty((p, gate_up.n), dtype=hidden.dtype, device=hidden.device)  # sorted pair rows
        _launch(hidden, gate_up, gate_up_bias, None, gu_out, token_of, None, plan, config, 1, False)
        mid = gate_and_up(gu_out, act_fn, gate_fn).contiguous()  # [P, I]
    if split_k is None:
        split_k = moe_split_k(p, n_experts, h, down.words.shape[1] // RB, num_sms(hidden.device), config)
    out = torch.zeros((t, h), dtype=torch.float32, device=hidden.device)
    _launch(mid, down, down_bias, row_weight, out, None, token_of, plan, config, split_k, True)
    return out.to(hidden.dtype)
