"""Tile configurations, shape buckets and the split-K rule of the GEMM kernels (pure python, no triton)."""
from __future__ import annotations

from dataclasses import dataclass

# M buckets: decode (1), small batches, medium, large. Autotuning is keyed by bucket, not exact M,
# so a server that sees every M from 1 to 256 tunes a handful of times, not 256.
M_BUCKETS = (1, 16, 64, 256)


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration of a GEMM kernel."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8

    def meta(self) -> dict[str, int]:
        """Keyword arguments of the kernel launch."""
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k,
                "GROUP_M": self.group_m, "num_warps": self.num_warps, "num_stages": self.num_stages}


def m_bucket(m: int) -> int:
    """Smallest bucket >= m (the largest for anything above)."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1] * 4


def candidate_tiles(bucket: int) -> list[TileConfig]:
    """Autotuning candidates for an M bucket.

    Small M is memory-bound: a 16-row tile (tl.dot's minimum) and wide N/K tiles stream weights;
    large M is compute-bound: square 128-wide tiles with deeper pipelines.
    """
    if bucket <= 16:
        return [TileConfig(16, n, k, w, s) for n, k, w, s in
                ((64, 128, 4, 4), (128, 128, 4, 4), (64, 256, 4, 3), (128, 64, 4, 4), (32, 256, 4, 3))]
    if bucket <= 64:
        return [TileConfig(m, n, k, w, s) for m, n, k, w, s in
                ((32, 64, 128, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (32, 128, 128, 4, 3))]
    return [TileConfig(m, n, k, w, s) for m, n, k, w, s in
            ((64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 32, 4, 4),
             (64, 256, 32, 4, 4))]


def default_tile(bucket: int) -> TileConfig:
    """The configuration used where autotuning is not possible (Triton's CPU interpreter)."""
    return candidate_tiles(bucket)[0]


def choose_split_k(m: int, n: int, k: int, num_sms: int, block_k: int = 128) -> int:
    """How many slices to split K into so a small-M GEMM keeps every SM busy.

    At small M there are few output tiles (N/64 for one token) and each would walk all of K alone;
    splitting K multiplies the CTAs. Each slice keeps at least 4 K tiles so the partial sums are worth
    their round trip through memory. Large M has enough tiles already.
    """
    if m > 64:
        return 1
    tiles = -(-m // 16) * -(-n // 64)
    want = max(1, (2 * num_sms) // tiles)
    most = max(1, k // (4 * block_k))
    split = 1
    while split * 2 <= min(want, most, 16):
        split *= 2
    return split


def is_interpreter() -> bool:
    """Whether Triton runs kernels on the CPU interpreter (no autotuning there: it would time Python)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Packed kernels (kernels/packed_gemm.py): GEMV rows up to GEMV_MAX_M, the tiled MMA path above.
# The GEMV path holds a [BLOCK_M, 16, BLOCK_N] fp32 accumulator: at 4+ rows it spills (bench/sass.py),
# and the 16-row MMA tile then costs fewer instructions per weight than the GEMV's fp32 FFMAs.
GEMV_MAX_M = 2


def codes_per_word(bits: int) -> int:
    """Codes of `bits` bits in one int32 word of the packed layout: 16 // bits whole codes in each half word
    (kernels/repack.py)."""
    return 2 * (16 // bits)


def heavy_decode(bits: int, group: int, is_mx: bool) -> bool:
    """Formats whose decode needs more registers: MXFP4, 2-bit (16 chunks a block) and groups that are
    not a multiple of a pack block (a scale per 16-k chunk: small groups, and 3/5/6/7-bit blocks)."""
    return is_mx or bits == 2 or (group != 0 and group % (codes_per_word(bits) * 16) != 0)


def packed_tile(m: int, bits: int = 4, group: int = 128, is_mx: bool = False) -> TileConfig:
    """Default tile of the packed weight-only GEMM for M rows (block_k is the layout's pack block).

    M <= GEMV_MAX_M: the GEMV path, 512 columns (4 warps x 32 threads x one 16-byte word vector
    each, so the sum over K stays inside a thread). Above: MMA tiles that grow with M; 16 x 256 with
    4 warps is the M <= 16 tile with the fewest SASS instructions per weight. Every tile here is
    spill-free on sm_90a for every format (bench/sass.py); 128 x 128 spills for heavy decodes.
    """
    if m <= GEMV_MAX_M and bits != 2 and not (is_mx and m > 1):
        # 2-bit blocks are 16 chunks deep: every GEMV tile of them spills, so they take the MMA tile;
        # so does a 2-row MXFP4 GEMV (its E2M1 decode holds more registers).
        return TileConfig(1 if m == 1 else 2, 512, 0, num_warps=4, num_stages=3, group_m=1)
    if m <= 16:
        return TileConfig(16, 256, 0, num_warps=4, num_stages=4)
    if m <= 32:
        return TileConfig(32, 256, 0, num_warps=8, num_stages=3)
    if m <= 64:
        return TileConfig(64, 128, 0, num_warps=8, num_stages=3)
    if heavy_decode(bits, group, is_mx):
        return TileConfig(128, 64, 0, num_warps=8, num_stages=3)
    return TileConfig(128, 128, 0, num_warps=8, num_stages=3)


def packed_candidates(m: int, bits: int = 4, group: int = 128, is_mx: bool = False) -> list[TileConfig]:
    """Tiles the GPU tuner tries for M rows (the default first)."""
    first = packed_tile(m, bits, group, is_mx)
    if m <= GEMV_MAX_M:
        more = [TileConfig(first.block_m, n, 0, w, s, 1) for n, w, s in
                ((256, 2, 3), (512, 4, 4), (1024, 8, 3), (256, 4, 4))]
    elif m <= 64:
        more = [TileConfig(first.block_m, n, 0, w, s) for n, w, s in ((128, 4, 4), (256, 8, 3), (64, 4, 4))]
    else:
        more = [TileConfig(bm, n, 0, w, s) for bm, n, w, s in ((64, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 4))]
    return [first] + [t for t in more if t != first]


def packed_split_k(m: int, n: int, n_blocks: int, num_sms: int, tile: TileConfig) -> int:
    """K slices for the packed kernel so at least ~2 CTAs per SM pull the weight stream.

    Counts the CTAs the chosen tile gives; each slice keeps at least 2 pack blocks (the atomic
    partial sums cost a round trip through L2). Large M has enough tiles already.
    """
    tiles = -(-m // tile.block_m) * -(-n // tile.block_n)
    want = -(-(2 * num_sms) // tiles)
    return max(1, min(want, n_blocks // 2, 32))
