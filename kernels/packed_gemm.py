"""Weight-only GEMM on the repacked layout (kernels/repack.py): a GEMV path and a tiled path.

y = x @ dequant(W)^T + b, x fp16/bf16 [M, K], W as K-packed int32 words [KW, N] (N-contiguous:
16-byte coalesced loads, streamed with evict_first). Each loop iteration takes one pack block
(RB word rows = P chunks of RB contiguous k, P = 2 * (16 // bits)): chunk j is `(words >> q_j) & mask`,
q_j = 16 * (j // H) + bits * (j % H) with H = 16 // bits codes per half word (j * bits for 2/4/8 bits).

- GEMV (BLOCK_M <= 2, no tl.dot): codes become fp32 where they sit in the word, by a magic exponent
  (_gemv_chunk: one lop3 and one fadd give exact code - zero); x times that accumulates in a
  [BLOCK_M, RB, BLOCK_N] register tile (one FFMA per weight), summed over K once per pack block.
  Scales are applied once per group to the group's partial sum.
- Tiled (BLOCK_M >= 16, tl.dot): codes become fp16 with the magic number 1024 (`code | 0x6400`),
  minus (1024 + zero) gives code - zero exactly (bf16: 128 / 0x4300, 7-bit codes at most); the MMA
  multiplies x by these small integers and the group scale multiplies the fp32 partial product.
  The weight tile is never multiplied by its scale element by element.
- Split-K: slices of K add fp32 partials with atomics into a workspace; the last slice of a tile
  (an atomic counter) reads the sum back, adds the bias and writes the output: one launch, no torch
  reduction. The workspace and counters are left zeroed for the next call.

On a GPU the code -> fp16 step of the tiled path uses one `lop3` per weight through
tl.inline_asm_elementwise; the pure-tl expression (same bits) is what the interpreter runs.
Reference: qlinear_reference(x, qweight, bias).
"""
from __future__ import annotations

import triton
import triton.language as tl

from quantkit.kernels.repack import RB as _RB

RB = tl.constexpr(_RB)  # jit code may only read constexpr globals
assert _RB == 16  # the kernels spell RB as 16 in constexpr arithmetic


@triton.jit
def _load_words(ptrs, mask, EVEN_N: tl.constexpr):
    """A word tile as uint32 (logical shifts), 16-byte loads streamed with evict_first (read once).

    EVEN_N (N % BLOCK_N == 0) drops the mask: a masked load also zero-fills its registers first.
    """
    if EVEN_N:
        w = tl.load(ptrs, eviction_policy="evict_first")
    else:
        w = tl.load(ptrs, mask=mask, other=0, eviction_policy="evict_first")
    return w.to(tl.uint32, bitcast=True)


@triton.jit
def _code_chunk(words, J: tl.constexpr, BITS: tl.constexpr):
    """Codes [RB, BLOCK_N] int32 of chunk J of a [RB, BLOCK_N] word tile (at bit q_J, repack.chunk_shifts)."""
    H: tl.constexpr = 16 // BITS  # codes per half word
    Q: tl.constexpr = 16 * (J // H) + BITS * (J % H)
    if Q == 0:
        return words & ((1 << BITS) - 1)
    return (words >> Q) & ((1 << BITS) - 1)  # words are uint32: a logical shift


@triton.jit
def _gemv_chunk(words, hi, zf, code_mask, J: tl.constexpr, BITS: tl.constexpr):
    """code - zero in fp32 for chunk J, read where the code sits (bit p of its half word) without a shift.

    (word & mask << p) | (150 - p) << 23, read as fp32, is 2^(23-p) + code exactly: the exponent makes
    mantissa bit p worth 1 (p + bits <= 16 < 23). Minus 2^(23-p) + zero it is code - zero. One lop3
    and one fadd per weight; the upper half word is shifted once per word (`hi`).
    """
    H: tl.constexpr = 16 // BITS  # codes per half word: none straddles the halves (repack.chunk_shifts)
    Q: tl.constexpr = 16 * (J // H) + BITS * (J % H)
    PP: tl.constexpr = Q if Q < 16 else Q - 16
    if Q < 16:
        src = words
    else:
        src = hi
    bits = (src & (code_mask << PP)) | ((150 - PP) << 23)
    return bits.to(tl.float32, bitcast=True) - ((1 << (23 - PP)) + zf)


@triton.jit
def _half_magic(c, MAGIC: tl.constexpr, DT: tl.constexpr, USE_ASM: tl.constexpr):
    """(c | MAGIC) as a 16-bit float of type DT (c < 2^mantissa bits, so the value is MAGIC's + c)."""
    if USE_ASM:
        # One lop3 (c & 0xffff) | MAGIC per element, its low half read as fp16/bf16 by the cvt below.
        bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x0000ffff, $2, 0xea;",
                                         "=r,r,r", [c, tl.full(c.shape, MAGIC, tl.int32)], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        bits = c | MAGIC
    return bits.to(tl.int16).to(DT, bitcast=True)


@triton.jit
def _load_zero_f(z_ptr, g, N, offs_n, mask_n, HAS_ZERO: tl.constexpr, SYM_OFFSET: tl.constexpr):
    """Zero point of group g as fp32 [1, BLOCK_N] (the implicit offset for symmetric codes)."""
    if HAS_ZERO:
        return tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
    return tl.full(offs_n.shape, SYM_OFFSET, tl.float32)


@triton.jit
def _mx_chunk_fp16(words, J: tl.constexpr):
    """MXFP4 chunk J as fp16 value * 2^-14, moved straight from its nibble at bit q = 4J: idx to bits 9..11
    and the sign to bit 15 (two shifts, one bit-select), instead of extracting the code first."""
    Q: tl.constexpr = 4 * J
    if Q <= 9:
        a = words << (9 - Q)
    else:
        a = words >> (Q - 9)
    if Q <= 12:
        b = words << (12 - Q)
    else:
        b = words >> (Q - 12)
    return ((a & 0x0E00) | (b & 0x8000)).to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def _chunk_weights(c, DT: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """Int codes [RB, BLOCK_N] as MMA operands in DT: OFF + code (OFF: 1024 fp16, 128 bf16, 0 8-bit bf16)."""
    if DT == tl.float16:
        w = _half_magic(c, 0x6400, tl.float16, USE_ASM)  # 1024 + code
    elif BITS < 8:
        w = _half_magic(c, 0x4300, tl.bfloat16, USE_ASM)  # 128 + code
    else:
        w = c.to(tl.float32).to(tl.bfloat16)  # 8-bit codes exceed bf16's 7-bit mantissa: code itself (exact)
    return w


@triton.jit
def _epilogue(acc, out_ptr, b_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_om, tile,
              HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write the fp32 tile acc [BLOCK_M, BLOCK_N]: directly, or through the split-K workspace."""
    mask_n1 = offs_n < N
    mask = (offs_m[:, None] < M) & mask_n1[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n1, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial is issued before the tile's counter moves
        done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if done == SPLIT_K - 1:  # the last slice of this tile: read the sum (and zero it for the next call)
            zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            total = tl.atomic_add(ws_ptrs, zeros, mask=mask, sem="relaxed")  # read at L2, where the adds went
            tl.store(ws_ptrs, zeros, mask=mask)
            if HAS_BIAS:
                total += tl.load(b_ptr + offs_n, mask=mask_n1, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit
def _mma_k_loop(x_rows, mask_m, w_cols, s_ptr, z_ptr, N, K, b_begin, b_end, offs_n,
                BITS: tl.constexpr, GROUP: tl.constexpr, IS_MX: tl.constexpr, HAS_ZERO: tl.constexpr,
                SYM_OFFSET: tl.constexpr, USE_ASM: tl.constexpr, EVEN_N: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] = rows x_rows [BLOCK_M, 1] (pointers) times pack blocks [b_begin, b_end) of
    the word columns w_cols [1, BLOCK_N], scales s_ptr / zeros z_ptr of one [G, N] weight."""
    P: tl.constexpr = 2 * (16 // BITS)  # chunks per pack block (repack.codes_per_word)
    KB: tl.constexpr = P * 16  # k per pack block (P * RB)
    MX_FIX: tl.constexpr = 16384.0 if IS_MX else 1.0  # MXFP4 values come out of _mx_chunk_fp16 scaled by 2^-14
    offs_r = tl.arange(0, RB)  # [RB]
    mask_n1 = offs_n < N  # [BLOCK_N]
    mask_n = mask_n1[None, :]  # [1, BLOCK_N]
    # The MMA multiplies x by code - zero (exact small integers: OFF + code minus OFF + zero, in
    # packed half2 math), and the scale multiplies the fp32 partial once per group: the weight tile
    # is never scaled element by element.
    DT: tl.constexpr = x_rows.dtype.element_ty
    OFF: tl.constexpr = 1024.0 if DT == tl.float16 else (128.0 if BITS < 8 else 0.0)  # _chunk_weights' magic
    HOIST: tl.constexpr = (GROUP == 0) or (GROUP % KB) == 0  # one zero/scale for the whole block
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GROUP == 0:
        zw = (_load_zero_f(z_ptr, 0, N, offs_n, mask_n1, HAS_ZERO, SYM_OFFSET) + OFF).to(DT)[None, :]
    for blk in range(b_begin, b_end):
        k0 = blk * KB
        words = _load_words(w_cols + (offs_r + blk * RB)[:, None].to(tl.int64) * N, mask_n, EVEN_N)  # [RB, BLOCK_N]
        if HOIST and GROUP != 0:
            g = k0 // GROUP
            zw = (_load_zero_f(z_ptr, g, N, offs_n, mask_n1, HAS_ZERO, SYM_OFFSET) + OFF).to(DT)[None, :]
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(P):
            offs_k = k0 + j * RB + offs_r  # [RB] contiguous k of chunk j
            x_j = tl.load(x_rows + offs_k[None, :], mask=mask_m & (offs_k[None, :] < K), other=0.0)
            if not HOIST:  # a chunk lies inside one group (GROUP % RB == 0)
                g = tl.minimum(k0 + j * RB, K - 1) // GROUP
                zw = (_load_zero_f(z_ptr, g, N, offs_n, mask_n1, HAS_ZERO, SYM_OFFSET) + OFF).to(DT)[None, :]
            if IS_MX:
                w = _mx_chunk_fp16(words, j).to(DT)
            else:
                w = _chunk_weights(_code_chunk(words, j, BITS), DT, BITS, USE_ASM)
            if not IS_MX:
                w = w - zw  # exact: code - zero
            if HOIST:
                part = tl.dot(x_j, w, part)
            else:
                s = tl.load(s_ptr + g * N + offs_n, mask=mask_n1, other=0.0).to(tl.float32) * MX_FIX
                acc += tl.dot(x_j, w) * s[None, :]
        if HOIST and GROUP != 0:
            acc += part * (tl.load(s_ptr + g * N + offs_n, mask=mask_n1, other=0.0).to(tl.float32) * MX_FIX)[None, :]
        elif GROUP == 0:
            acc += part
    if GROUP == 0:
        acc *= tl.load(s_ptr + offs_n, mask=mask_n1, other=0.0).to(tl.float32)[None, :] * MX_FIX
    return acc


@triton.jit
def _packed_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, n_blocks, stride_xm, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, IS_MX: tl.constexpr, HAS_ZERO: tl.constexpr,
    SYM_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_ASM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n  # grouped order: GROUP_M row tiles share weight tiles in L2
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    pid_k = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_m = offs_m[:, None] < M  # [BLOCK_M, 1]
    x_rows = x_ptr + offs_m[:, None] * stride_xm  # [BLOCK_M, 1]
    w_cols = w_ptr + offs_n[None, :]  # [1, BLOCK_N]

    per_split = tl.cdiv(n_blocks, SPLIT_K)
    b_begin = pid_k * per_split
    b_end = tl.minimum(b_begin + per_split, n_blocks)
    acc = _mma_k_loop(x_rows, mask_m, w_cols, s_ptr, z_ptr, N, K, b_begin, b_end, offs_n, BITS, GROUP, IS_MX,
                      HAS_ZERO, SYM_OFFSET, USE_ASM, EVEN_N, BLOCK_M, BLOCK_N)
    _epilogue(acc, out_ptr, b_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_om, pid_m * grid_n + pid_n,
              HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N)


@triton.jit
def _packed_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, n_blocks, stride_xm, stride_om, code_mask,
    BITS: tl.constexpr, GROUP: tl.constexpr, IS_MX: tl.constexpr, HAS_ZERO: tl.constexpr,
    SYM_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
):
    """M <= BLOCK_M <= 8 rows without tl.dot; everything is 3-D [BLOCK_M, RB, BLOCK_N] so that the
    sum over K runs inside each thread (no layout conversion, no shared memory).

    code_mask = 2^BITS - 1 arrives at run time on purpose: as a register it stays live across the
    loop; as an immediate, ptxas re-materialises it (a MOV) before every lop3.
    """
    P: tl.constexpr = 2 * (16 // BITS)  # repack.codes_per_word
    KB: tl.constexpr = P * 16  # P * RB (a literal: constexpr arithmetic)
    MX_FIX: tl.constexpr = 16384.0 if IS_MX else 1.0
    HOIST: tl.constexpr = (GROUP == 0) or (GROUP % KB) == 0  # one zero/scale for the whole block
    ACC3: tl.constexpr = BLOCK_M <= 2  # registers for a [BLOCK_M, RB, BLOCK_N] accumulator
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RB)
    m3 = offs_m[:, None, None]  # [BLOCK_M, 1, 1]
    r3 = offs_r[None, :, None]  # [1, RB, 1]
    n3 = offs_n[None, None, :]  # [1, 1, BLOCK_N]
    mask_n3 = n3 < N
    w_cols = w_ptr + n3  # [1, 1, BLOCK_N]
    x_rows = x_ptr + m3 * stride_xm  # [BLOCK_M, 1, 1]

    per_split = tl.cdiv(n_blocks, SPLIT_K)
    b_begin = pid_k * per_split
    b_end = tl.minimum(b_begin + per_split, n_blocks)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GROUP == 0:
        zf = _load_zero_f(z_ptr, 0, N, n3, mask_n3, HAS_ZERO, SYM_OFFSET)  # [1, 1, BLOCK_N]
    for blk in range(b_begin, b_end):
        k0 = blk * KB
        words = _load_words(w_cols + (r3 + blk * RB).to(tl.int64) * N, mask_n3, EVEN_N)  # [1, RB, BLOCK_N]
        if GROUP != 0 and (GROUP % KB) == 0:
            g = k0 // GROUP
            zf = _load_zero_f(z_ptr, g, N, n3, mask_n3, HAS_ZERO, SYM_OFFSET)
        hi = words >> 16  # chunks in the upper half word come from here: one shift per word
        if ACC3:
            part3 = tl.zeros((BLOCK_M, RB, BLOCK_N), dtype=tl.float32)
        else:
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(P):
            k3 = k0 + j * RB + r3  # [1, RB, 1]
            x_j = tl.load(x_rows + k3, mask=(m3 < M) & (k3 < K), other=0.0).to(tl.float32)  # [BLOCK_M, RB, 1]
            if not HOIST:
                g = tl.minimum(k0 + j * RB, K - 1) // GROUP
                zf = _load_zero_f(z_ptr, g, N, n3, mask_n3, HAS_ZERO, SYM_OFFSET)
            if IS_MX:
                w = _mx_chunk_fp16(words, j).to(tl.float32)
            else:
                w = _gemv_chunk(words, hi, zf, code_mask, j, BITS)
            if HOIST and ACC3:
                part3 += x_j * w  # one FFMA per weight; summed over K once per block
            elif HOIST:
                part += tl.sum(x_j * w, axis=1)  # [BLOCK_M, BLOCK_N]
            else:
                s = tl.load(s_ptr + g * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
                acc += tl.sum(x_j * w, axis=1) * (s * MX_FIX)[None, :]
        if HOIST:
            if ACC3:
                part = tl.sum(part3, axis=1)
            if GROUP == 0:
                acc += part
            else:
                s = tl.load(s_ptr + g * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
                acc += part * (s * MX_FIX)[None, :]
    if GROUP == 0:
        acc *= tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :] * MX_FIX
    _epilogue(acc, out_ptr, b_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_om, pid_n,
              HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N)
