"""Token alignment of the fused MoE in one launch: the same plan as moe.moe_align (torch, ~15 launches).

One program walks the (token, slot) pairs twice in chunks of CHUNK: pass 1 counts pairs per expert
(tl.histogram), pass 2 places each pair at its expert's segment start + the pairs of that expert before
it (a running count per expert plus the rank inside the chunk), which is exactly torch's stable argsort
by expert. Slots routed outside [0, E) (transformers' mask value) sort last, as there. The same pass
writes what the grouped GEMMs read per sorted pair: its token row and its routing weight. Then the
block table: each expert's run cut into BLOCK_M blocks, expert E marking the unused tail of the grid.

One program is serial in the pairs, so it serves decode-sized calls (where ~15 tiny launches cost more
than the GEMMs); qexperts_packed keeps the torch plan above ALIGN_MAX_PAIRS pairs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ALIGN_MAX_PAIRS = 8192  # above this the serial chunk walk, not the launches, would dominate
CHUNK = 128


@triton.jit
def _moe_align_kernel(
    idx_ptr, wt_ptr,  # [P] expert of each pair (int), [P] routing weight (any float)
    order_ptr, token_ptr, rw_ptr,  # [P] out: pair, token row, fp32 routing weight of each sorted position
    blk_expert_ptr, blk_start_ptr, blk_end_ptr,  # [NB] out: the block table
    P, E, NB,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
    NB_CHUNK: tl.constexpr, HAS_WEIGHT: tl.constexpr,
):
    bins = tl.arange(0, E_PAD)  # [E_PAD]; bin E holds the masked slots, bins above E stay empty
    counts = tl.zeros((E_PAD,), dtype=tl.int32)
    for c0 in range(0, P, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)  # [CHUNK]
        key = tl.load(idx_ptr + offs, mask=offs < P, other=E).to(tl.int32)
        key = tl.where((key >= 0) & (key < E), key, E)
        counts += tl.histogram(key, E_PAD, mask=offs < P)
    seg_start = tl.cumsum(counts, 0) - counts  # [E_PAD] first sorted position of each expert

    lane = tl.arange(0, CHUNK)
    before = lane[None, :] < lane[:, None]  # [CHUNK, CHUNK]: j is an earlier lane than i
    seen = tl.zeros((E_PAD,), dtype=tl.int32)  # pairs of each expert placed so far
    for c0 in range(0, P, CHUNK):
        offs = c0 + lane
        valid = offs < P
        key = tl.load(idx_ptr + offs, mask=valid, other=E).to(tl.int32)
        key = tl.where((key >= 0) & (key < E), key, E)
        same = (key[None, :] == key[:, None]) & before & valid[None, :]  # [CHUNK, CHUNK]
        rank = tl.sum(same.to(tl.int32), axis=1)  # [CHUNK] earlier pairs of the same expert in the chunk
        pos = tl.gather(seg_start + seen, key, 0) + rank  # [CHUNK] sorted position
        tl.store(order_ptr + pos, offs, mask=valid)
        tl.store(token_ptr + pos, offs // TOP_K, mask=valid)
        if HAS_WEIGHT:
            w = tl.load(wt_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            tl.store(rw_ptr + pos, w, mask=valid)
        seen += tl.histogram(key, E_PAD, mask=valid)

    real = bins < E
    blocks = tl.where(real, (counts + BLOCK_M - 1) // BLOCK_M, 0)  # [E_PAD]
    blk_end_cum = tl.cumsum(blocks, 0)  # blocks of experts 0..e
    blk_first = blk_end_cum - blocks
    for b0 in range(0, NB, NB_CHUNK):
        b = b0 + tl.arange(0, NB_CHUNK)  # [NB_CHUNK]
        expert = tl.sum((blk_end_cum[None, :] <= b[:, None]).to(tl.int32), axis=1)  # first e whose blocks pass b
        expert = tl.minimum(expert, E)  # E: past the last real block
        ec = tl.minimum(expert, E - 1)
        start = tl.gather(seg_start, ec, 0) + (b - tl.gather(blk_first, ec, 0)) * BLOCK_M
        end = tl.gather(seg_start + counts, ec, 0)
        tl.store(blk_expert_ptr + b, expert, mask=b < NB)
        tl.store(blk_start_ptr + b, start, mask=b < NB)
        tl.store(blk_end_ptr + b, end, mask=b < NB)


def moe_align_fused(top_k_index: torch.Tensor, n_experts: int, block_m: int,
                    top_k_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """moe.moe_align's plan (order, expert, start, end) in one launch, plus per sorted pair its token row
    (`token`) and, given top_k_weights, its routing weight in fp32 (`weight`)."""
    t, k = top_k_index.shape
    p = t * k
    flat = top_k_index.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    dev = flat.device
    n_blocks = -(-p // block_m) + min(n_experts, p)  # the same upper bound as moe_align
    i32 = torch.int32
    order, token = torch.empty(p, dtype=i32, device=dev), torch.empty(p, dtype=i32, device=dev)
    weight = torch.empty(p, dtype=torch.float32, device=dev) if top_k_weights is not None else order
    wt = top_k_weights.reshape(-1).contiguous() if top_k_weights is not None else order
    table = torch.empty((3, n_blocks), dtype=i32, device=dev)
    _moe_align_kernel[(1,)](
        flat, wt, order, token, weight, table[0], table[1], table[2], p, n_experts, n_blocks,
        TOP_K=k, BLOCK_M=block_m, E_PAD=triton.next_power_of_2(n_experts + 1), CHUNK=CHUNK, NB_CHUNK=64,
        HAS_WEIGHT=top_k_weights is not None, num_warps=4)
    plan = {"order": order, "token": token, "expert": table[0], "start": table[1], "end": table[2]}
    if top_k_weights is not None:
        plan["weight"] = weight
    return plan
