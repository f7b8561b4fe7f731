"""The kernel configurations bench/sass.py compiles for sm_90a: every format x tile the kernels ship.

Shapes are 8192 x 8192 (the issue's reference GEMM); the figures per weight do not depend on them.
"""
from __future__ import annotations

from dataclasses import dataclass

from quantkit.kernels.configs import TileConfig, candidate_tiles, packed_tile
from quantkit.kernels.repack import RB, codes_per_word

N = K = 8192
# (name, bits, group, is_mx, has_zero)
PACKED_FORMATS = (("int4-g128", 4, 128, False, False), ("int4-g32-asym", 4, 32, False, True),
                  ("int4-channel", 4, 0, False, False), ("int2-g128", 2, 128, False, False),
                  ("int8-g128", 8, 128, False, False), ("mxfp4", 4, 32, True, False),
                  ("int3-g128", 3, 128, False, False))
BYTE_FORMATS = (("int2-g128", 2, 128, False), ("int3-g128", 3, 128, False), ("int4-g128", 4, 128, False),
                ("int8-g128", 8, 128, False), ("mxfp4", 4, 32, True))
PACKED_M = (1, 2, 16, 32, 64, 256)  # the default tile of each (kernels/configs.packed_tile)


@dataclass(frozen=True)
class Case:
    name: str  # "kernel fmt tile"
    kernel: str  # "packed" | "packed_gemv" | "wo_gemm" | "aq_gemm"
    args: dict
    tile: TileConfig
    weights_per_thread: int

    def compile(self):
        from quantkit.kernels.sass import compile_kernel

        if self.kernel == "packed_moe":
            from quantkit.kernels.packed_moe import _packed_moe_kernel as fn
        elif self.kernel == "moe_align":
            from quantkit.kernels.moe_align import _moe_align_kernel as fn
        elif self.kernel == "moe":
            from quantkit.kernels.moe import _moe_gemm_kernel as fn
        elif self.kernel == "packed_gemv":
            from quantkit.kernels.packed_gemm import _packed_gemv_kernel as fn
        elif self.kernel == "packed":
            from quantkit.kernels.packed_gemm import _packed_gemm_kernel as fn
        elif self.kernel == "wo_gemm":
            from quantkit.kernels.wo_gemm import _wo_gemm_kernel as fn
        else:
            from quantkit.kernels.aq_gemm import _aq_gemm_kernel as fn
        return compile_kernel(fn, self.args, self.tile.num_warps, self.tile.num_stages)


def _c(v) -> tuple:
    return ("const", v)


def packed_case(fmt: str, bits: int, group: int, is_mx: bool, has_zero: bool, m: int, dtype: str = "fp16",
                tile: TileConfig | None = None, split_k: int = 1, use_asm: bool = False) -> Case:
    tile = tile or packed_tile(m, bits, group, is_mx)
    args = dict(x_ptr=f"*{dtype}", w_ptr="*i32", s_ptr="*fp32" if is_mx else "*fp16",
                z_ptr="*u8" if has_zero else "*fp16", b_ptr=f"*{dtype}", out_ptr=f"*{dtype}", ws_ptr="*fp32",
                cnt_ptr="*i32", M=m if m > 1 else 3, N=N, K=K, n_blocks=-(-K // (codes_per_word(bits) * RB)), stride_xm=K,
                stride_om=N, BITS=_c(bits), GROUP=_c(group), IS_MX=_c(is_mx), HAS_ZERO=_c(has_zero),
                SYM_OFFSET=_c(0 if is_mx else 1 << (bits - 1)), HAS_BIAS=_c(False), SPLIT_K=_c(split_k),
                BLOCK_M=_c(tile.block_m), BLOCK_N=_c(tile.block_n), EVEN_N=_c(N % tile.block_n == 0))
    gemv = tile.block_m < 16
    if gemv:
        args.update(code_mask=(1 << bits) - 1)
    else:
        args.update(USE_ASM=_c(use_asm), GROUP_M=_c(tile.group_m))
    per_iter = tile.block_n * codes_per_word(bits) * RB  # one pack block of BLOCK_N columns
    name = f"{'gemv' if gemv else 'gemm'} {fmt} {dtype} M={m} {tile.block_m}x{tile.block_n} w{tile.num_warps}s{tile.num_stages}"
    if use_asm and not gemv:
        name += " inline-asm"
    return Case(name, "packed_gemv" if gemv else "packed", args, tile, per_iter // (32 * tile.num_warps))


def byte_case(fmt: str, bits: int, group: int, is_mx: bool, tile: TileConfig) -> Case:
    """The pre-repack kernel (wo_gemm: reads the checkpoint layout one byte per code)."""
    args = dict(x_ptr="*fp16", w_ptr="*u8", s_ptr="*u8" if is_mx else "*fp16", z_ptr="*u8", b_ptr="*fp16",
                out_ptr="*fp16", M=tile.block_m, N=N, K=K, M_BUCKET=tile.block_m, stride_xm=K,
                stride_wn=K * bits // 8, stride_sn=K // group, stride_sg=1, stride_zn=K // group, stride_zg=1,
                stride_om=N, stride_split=0, BITS=_c(bits), GROUP=_c(group), IS_MX=_c(is_mx), HAS_ZERO=_c(False),
                SYM_OFFSET=_c(0 if is_mx else 1 << (bits - 1)), HAS_BIAS=_c(False), SPLIT_K=_c(1),
                BLOCK_M=_c(tile.block_m), BLOCK_N=_c(tile.block_n), BLOCK_K=_c(tile.block_k), GROUP_M=_c(8))
    name = f"wo_gemm {fmt} fp16 {tile.block_m}x{tile.block_n}x{tile.block_k} w{tile.num_warps}s{tile.num_stages}"
    return Case(name, "wo_gemm", args, tile, tile.block_n * tile.block_k // (32 * tile.num_warps))


def aq_case(fmt: str, bits: int, group: int, a_group: int, is_mx: bool, tile: TileConfig) -> Case:
    """The integer GEMM (W8A8 / W4A4 / MXFP4 W4A4) as it stands."""
    bk = min([tile.block_k] + [g for g in (group, a_group) if g])
    tile = TileConfig(tile.block_m, tile.block_n, bk, tile.num_warps, tile.num_stages)
    args = dict(a_ptr="*i8", as_ptr="*fp32", w_ptr="*u8", s_ptr="*u8" if is_mx else "*fp16", z_ptr="*u8",
                b_ptr="*fp16", out_ptr="*fp16", M=tile.block_m, N=N, K=K, M_BUCKET=tile.block_m, stride_am=K,
                stride_asm=K // a_group if a_group else 1, stride_wn=K * bits // 8,
                stride_sn=K // group if group else 1, stride_sg=1, stride_zn=1, stride_zg=1, stride_om=N,
                A_GROUP=_c(a_group), BITS=_c(bits), GROUP=_c(group), IS_MX=_c(is_mx), HAS_ZERO=_c(False),
                SYM_OFFSET=_c(0 if is_mx else 1 << (bits - 1)), HAS_BIAS=_c(False), MAX_BLOCK_K=_c(bk),
                BLOCK_M=_c(tile.block_m), BLOCK_N=_c(tile.block_n), BLOCK_K=_c(bk), GROUP_M=_c(8))
    name = f"aq_gemm {fmt} {tile.block_m}x{tile.block_n}x{bk} w{tile.num_warps}s{tile.num_stages}"
    return Case(name, "aq_gemm", args, tile, tile.block_n * bk // (32 * tile.num_warps))


def packed_cases() -> list[Case]:
    """Every packed format at the default tile of each M with fp16 activations; bf16 at M = 1 and 16;
    the inline-asm variant of the W4A16 MMA tile for comparison."""
    out = []
    for f in PACKED_FORMATS:
        tiles = {packed_tile(m, f[1], f[2], f[3]): m for m in PACKED_M}  # one case per distinct tile
        out += [packed_case(*f, m=m, dtype="fp16") for m in tiles.values()]
    out += [packed_case(*f, m=m, dtype="bf16") for f in PACKED_FORMATS for m in (1, 16)]
    out.append(packed_case(*PACKED_FORMATS[0], m=16, use_asm=True))
    return out


def byte_cases() -> list[Case]:
    """The pre-repack weight-only kernel at each M bucket's first tile, every format."""
    tiles = [candidate_tiles(b)[0] for b in (1, 64, 256)]
    return [byte_case(*f, tile=t) for f in BYTE_FORMATS for t in tiles]


def aq_cases() -> list[Case]:
    tiles = [candidate_tiles(b)[0] for b in (1, 256)]
    return [c for t in tiles for c in (aq_case("w8a8", 8, 0, 0, False, t), aq_case("w4a4-g32", 4, 32, 32, False, t),
                                       aq_case("w4a4-mxfp4", 4, 32, 32, True, t))]


def _packed_moe_args(n: int, k: int, e: int, tile: TileConfig, split_k: int, down: bool) -> dict:
    """Arguments of one packed MoE launch, W4A16 g128: gate/up (SwiGLU epilogue, n = I of a [2I, k] weight)
    or down (routing weight, atomic fp32 scatter)."""
    wn = n if down else 2 * n
    return dict(a_ptr="*fp16", w_ptr="*i32", s_ptr="*fp16", z_ptr="*fp16", b_ptr="*fp16", rw_ptr="*fp32",
                out_ptr="*fp32" if down else "*fp16", a_rows_ptr="*i32", c_rows_ptr="*i32", blk_expert_ptr="*i32",
                blk_start_ptr="*i32", blk_end_ptr="*i32", N=n, K=k, E=e, n_blocks=k // 128, stride_am=k,
                stride_we=k // 8 * wn, stride_se=k // 128 * wn, stride_be=wn, stride_om=n, BITS=_c(4),
                GROUP=_c(128), IS_MX=_c(False), HAS_ZERO=_c(False), SYM_OFFSET=_c(8), HAS_BIAS=_c(False),
                HAS_ROW_WEIGHT=_c(down), ATOMIC_OUT=_c(down), SPLIT_K=_c(split_k), USE_ASM=_c(False),
                A_SORTED=_c(down), C_SORTED=_c(not down), SILU_GLU=_c(not down), BLOCK_M=_c(tile.block_m),
                BLOCK_N=_c(tile.block_n), EVEN_N=_c(n % tile.block_n == 0))


def moe_cases() -> list[Case]:
    """Fused MoE, W4A16 g128, Mixtral shapes (H = 4096, I = 14336): the down projection, packed vs byte layout,
    decode (16-row) and prefill (64-row) tiles, with its atomic fp32 scatter; the packed gate/up with the
    SwiGLU epilogue at decode (two K loops per program, gate then up: the figures are one loop's); the one-launch token alignment (64 experts, top-8)."""
    from quantkit.kernels.moe import moe_tile
    from quantkit.kernels.packed_moe import packed_moe_tile

    n, k, e = 4096, 14336, 8
    out = []
    for pairs in (2, 4096):
        t = packed_moe_tile(pairs, e)
        tname = f"{t.block_m}x{t.block_n} w{t.num_warps}s{t.num_stages}"
        out.append(Case(f"moe-packed down int4-g128 fp16 {tname}", "packed_moe",
                        _packed_moe_args(n, k, e, t, 4 if pairs == 2 else 1, True), t,
                        t.block_n * 128 // (32 * t.num_warps)))
        if t.block_m <= 16:  # the SwiGLU epilogue runs with the decode tile only (packed_moe.qexperts_packed)
            out.append(Case(f"moe-packed gate/up+swiglu int4-g128 fp16 {tname}", "packed_moe",
                            _packed_moe_args(k, n, e, t, 1, False), t, t.block_n * 128 // (32 * t.num_warps)))
        b = moe_tile(pairs, e)
        args = dict(a_ptr="*fp16", w_ptr="*u8", s_ptr="*fp16", z_ptr="*fp16", b_ptr="*fp16", rw_ptr="*fp32",
                    out_ptr="*fp32", a_rows_ptr="*i32", c_rows_ptr="*i32", blk_expert_ptr="*i32",
                    blk_start_ptr="*i32", blk_end_ptr="*i32", N=n, K=k, E=e, stride_am=k, stride_we=n * k // 2,
                    stride_wn=k // 2, stride_se=n * k // 128, stride_sn=k // 128, stride_sg=1, stride_ze=n * k // 128,
                    stride_zn=k // 128, stride_zg=1, stride_be=n, stride_om=n, BITS=_c(4), GROUP=_c(128),
                    IS_MX=_c(False), HAS_ZERO=_c(False), SYM_OFFSET=_c(8), HAS_BIAS=_c(False),
                    HAS_ROW_WEIGHT=_c(True), BLOCK_M=_c(b.block_m), BLOCK_N=_c(b.block_n), BLOCK_K=_c(b.block_k))
        out.append(Case(f"moe-byte int4-g128 fp16 {b.block_m}x{b.block_n}x{b.block_k} w{b.num_warps}s{b.num_stages}",
                        "moe", args, b, b.block_n * b.block_k // (32 * b.num_warps)))
    align = dict(idx_ptr="*i64", wt_ptr="*fp16", order_ptr="*i32", token_ptr="*i32", rw_ptr="*fp32",
                 blk_expert_ptr="*i32", blk_start_ptr="*i32", blk_end_ptr="*i32", P=8, E=64, NB=9, TOP_K=_c(8),
                 BLOCK_M=_c(16), E_PAD=_c(128), CHUNK=_c(128), NB_CHUNK=_c(64), HAS_WEIGHT=_c(True))
    out.append(Case("moe-align 64 experts top-8 (no weights: per_weight n/a)", "moe_align", align,
                    TileConfig(0, 0, 0, num_warps=4, num_stages=1), 0))
    return out


CASE_SETS = {"packed": packed_cases, "byte": byte_cases, "aq": aq_cases, "moe": moe_cases}
