"""Fused MoE: grouped GEMM over 3-D quantized expert buffers, one launch per projection.

Token/slot pairs are sorted by expert (moe_align); every program takes one BLOCK_M slice of one
expert's pairs and one BLOCK_N slice of its outputs, gathering input rows and scattering output rows
by index, so no per-expert Python loop and no copy of the routed tokens. The gate/up launch writes
[pairs, 2I] in sorted order; act_fn(gate) * up runs in torch (act_fn is any callable); the down
launch multiplies by the routing weight in its epilogue and writes fp32 [T*k, H], summed over k.
Weights: any format wo_gemm reads (int 2-8 bit W*A16, MXFP4 W4A16). Reference: qexperts_reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.formats.qweight import QuantizedWeight
from quantkit.kernels.configs import TileConfig
from quantkit.kernels.layout import WeightLayout, weight_layout
from quantkit.kernels.reference import ActFn, gate_and_up
from quantkit.kernels.triton_common import dequant_tile, load_codes


@triton.jit
def _moe_gemm_kernel(
    a_ptr, w_ptr, s_ptr, z_ptr, b_ptr, rw_ptr, out_ptr,
    a_rows_ptr, c_rows_ptr, blk_expert_ptr, blk_start_ptr, blk_end_ptr,
    N, K, E,
    stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_sg, stride_ze, stride_zn, stride_zg,
    stride_be, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, IS_MX: tl.constexpr, HAS_ZERO: tl.constexpr,
    SYM_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ROW_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(blk_expert_ptr + pid_b)
    if e >= E:
        return  # the grid is an upper bound on the blocks (no host sync); this one is empty
    start = tl.load(blk_start_ptr + pid_b)
    end = tl.load(blk_end_ptr + pid_b)
    offs_p = start + tl.arange(0, BLOCK_M)  # [BLOCK_M] sorted pair positions
    mask_p = offs_p < end
    a_rows = tl.load(a_rows_ptr + offs_p, mask=mask_p, other=0)  # [BLOCK_M] input row of each pair
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_n = offs_n[None, :] < N  # [1, BLOCK_N]
    e64 = e.to(tl.int64)  # expert buffers can exceed 2^31 bytes
    w_rows = w_ptr + e64 * stride_we + offs_n[None, :] * stride_wn  # [1, BLOCK_N]
    s_rows = s_ptr + e64 * stride_se + offs_n[None, :] * stride_sn
    z_rows = z_ptr + e64 * stride_ze + offs_n[None, :] * stride_zn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        x = tl.load(a_ptr + a_rows[:, None].to(tl.int64) * stride_am + offs_k[None, :],
                    mask=mask_p[:, None] & (offs_k[None, :] < K), other=0.0)  # [BLOCK_M, BLOCK_K]
        codes = load_codes(w_rows, offs_k, K, mask_n, BITS)  # [BLOCK_K, BLOCK_N]
        w = dequant_tile(codes, s_rows, z_rows, k0, offs_k, K, mask_n, stride_sg, stride_zg,
                         GROUP, BLOCK_K, IS_MX, HAS_ZERO, SYM_OFFSET)  # [BLOCK_K, BLOCK_N] fp32
        w = tl.where(offs_k[:, None] < K, w, 0.0).to(a_ptr.dtype.element_ty)
        acc = tl.dot(x, w, acc)

    if HAS_BIAS:
        acc += tl.load(b_ptr + e64 * stride_be + offs_n[None, :], mask=mask_n, other=0.0).to(tl.float32)
    if HAS_ROW_WEIGHT:
        acc *= tl.load(rw_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)[:, None]  # routing weight
    c_rows = tl.load(c_rows_ptr + offs_p, mask=mask_p, other=0)  # [BLOCK_M] output row of each pair
    tl.store(out_ptr + c_rows[:, None].to(tl.int64) * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_n)


def moe_align(top_k_index: torch.Tensor, n_experts: int, block_m: int) -> dict[str, torch.Tensor]:
    """Sort token/slot pairs by expert and cut each expert's run into BLOCK_M blocks, on device.

    Returns order [P] (sorted position -> pair t*k + slot), and per block: expert (E for an empty
    block), start and end sorted positions. Slots routed to an index outside [0, E) (transformers'
    mask value) sort last and belong to no block.
    """
    flat = top_k_index.reshape(-1)
    p = flat.numel()
    key = torch.where((flat >= 0) & (flat < n_experts), flat, torch.full_like(flat, n_experts))
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=n_experts + 1)[:n_experts]  # [E]
    seg_start = torch.cumsum(counts, 0) - counts
    blocks = (counts + block_m - 1) // block_m
    blk_cum = torch.cumsum(blocks, 0)
    n_blocks = -(-p // block_m) + min(n_experts, p)  # upper bound, known without a sync
    b = torch.arange(n_blocks, device=flat.device)
    expert = torch.searchsorted(blk_cum, b, right=True)  # E past the last real block
    ec = expert.clamp(max=n_experts - 1)
    start = seg_start[ec] + (b - (blk_cum - blocks)[ec]) * block_m
    end = seg_start[ec] + counts[ec]
    i32 = torch.int32
    return {"order": order.to(i32), "expert": expert.to(i32), "start": start.to(i32), "end": end.to(i32)}


def _launch(a: torch.Tensor, lay: WeightLayout, bias: torch.Tensor | None, row_weight: torch.Tensor | None,
            out: torch.Tensor, a_rows: torch.Tensor, c_rows: torch.Tensor, plan: dict[str, torch.Tensor],
            config: TileConfig) -> None:
    n_blocks = plan["expert"].numel()
    grid = (n_blocks, triton.cdiv(lay.n, config.block_n))
    bias_t = bias if bias is not None else out
    _moe_gemm_kernel[grid](
        a, lay.packed, lay.scale, lay.zero, bias_t, row_weight if row_weight is not None else out, out,
        a_rows, c_rows, plan["expert"], plan["start"], plan["end"],
        lay.n, lay.k, lay.packed.shape[0],
        a.stride(0), lay.packed.stride(0), lay.row_bytes, lay.scale.stride(0), lay.scale.stride(1),
        lay.scale.stride(2), lay.zero.stride(0), lay.zero.stride(1), lay.zero.stride(2),
        0 if bias is None else bias.stride(0), out.stride(0),
        **lay.constexprs(), HAS_BIAS=bias is not None, HAS_ROW_WEIGHT=row_weight is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)


def moe_tile(n_pairs: int, n_experts: int) -> TileConfig:
    """Tile for the grouped GEMM: 16-row blocks while experts see few tokens (decode), else 64."""
    per_expert = n_pairs / max(1, n_experts)
    if per_expert <= 16:
        return TileConfig(16, 64, 128, num_warps=4, num_stages=4)
    return TileConfig(64, 128, 64, num_warps=8, num_stages=3)


def qexperts_triton(
    hidden: torch.Tensor,  # [T, H] fp16/bf16
    top_k_index: torch.Tensor,  # [T, k]
    top_k_weights: torch.Tensor,  # [T, k]
    gate_up: QuantizedWeight,  # [E, 2I, H]
    down: QuantizedWeight,  # [E, H, I]
    act_fn: ActFn,
    act_in: ActFn | None = None,
    act_mid: ActFn | None = None,
    gate_up_bias: torch.Tensor | None = None,  # [E, 2I]
    down_bias: torch.Tensor | None = None,  # [E, H]
    *,
    config: TileConfig | None = None,
    gate_fn: ActFn | None = None,
) -> torch.Tensor:  # [T, H]
    """Routed experts in two grouped-GEMM launches; same contract as qexperts_reference (weight-only)."""
    if act_in is not None or act_mid is not None:
        raise ValueError("qexperts_triton is weight-only; quantized expert activations use the reference")
    t, h = hidden.shape
    k = top_k_index.shape[-1]
    gu, dn = weight_layout(gate_up), weight_layout(down)
    n_experts = gu.packed.shape[0]
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    config = config or moe_tile(t * k, n_experts)
    plan = moe_align(top_k_index, n_experts, config.block_m)
    order = plan["order"]
    p = order.numel()
    sorted_pos = torch.arange(p, dtype=torch.int32, device=hidden.device)
    # gate/up: gather token rows, write sorted rows [P, 2I]
    gu_out = torch.empty((p, gu.n), dtype=hidden.dtype, device=hidden.device)
    _launch(hidden, gu, gate_up_bias, None, gu_out, (order // k).to(torch.int32), sorted_pos, plan, config)
    mid = gate_and_up(gu_out, act_fn, gate_fn).contiguous()  # [P, I]
    # down: sorted rows in, routing weight in the epilogue, scatter to pair rows [T*k, H] in fp32
    pair_out = torch.zeros((t * k, h), dtype=torch.float32, device=hidden.device)
    row_weight = top_k_weights.reshape(-1).float()[order.long()]
    _launch(mid, dn, down_bias, row_weight, pair_out, sorted_pos, order, plan, config)
    return pair_out.view(t, k, h).sum(dim=1).to(hidden.dtype)
