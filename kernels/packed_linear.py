"""Launcher of the packed weight-only GEMM (kernels/packed_gemm.py) and its dense-dequantize kernel.

packed_linear_triton(x, kw, bias): y = x @ dequant(W)^T + b on a KernelWeight (kernels/repack.py).
The tile comes from the per-GPU tuning table (kernels/tuning.py) or the default rule
(configs.packed_tile); split-K follows configs.packed_split_k for that tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.kernels.configs import TileConfig, is_interpreter, packed_split_k, packed_tile
from quantkit.kernels.packed_gemm import _packed_gemm_kernel, _packed_gemv_kernel
from quantkit.kernels.packed_gemm import RB
from quantkit.kernels.repack import KernelWeight

_WORKSPACE: dict[tuple, torch.Tensor] = {}


def _workspace(device: torch.device, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed buffer kept per device; the kernel's last K slice leaves it zeroed again."""
    key = (str(device), dtype)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < numel or is_interpreter():
        buf = torch.zeros(max(numel, 1), dtype=dtype, device=device)
        if not is_interpreter():
            _WORKSPACE[key] = buf
    return buf


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a small number exercises the split path
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_plan(m: int, kw: KernelWeight, device: torch.device, config: TileConfig | None = None,
                split_k: int | None = None) -> tuple[TileConfig, int]:
    """(tile, split_k) for an M-row call: pinned, tuned for this GPU, or the default rule."""
    if config is None:
        config = packed_tile(m, kw.bits, kw.group, kw.is_mx)
        if device.type == "cuda":
            from quantkit.kernels.tuning import tuned_tile

            config = tuned_tile(device, kw, m) or config
    if config.block_m < 16 and m > config.block_m:
        raise ValueError(f"GEMV tile of {config.block_m} rows cannot take M = {m}")
    n_blocks = kw.words.shape[1] // RB
    if split_k is None:
        split_k = packed_split_k(m, kw.n, n_blocks, num_sms(device), config)
    return config, split_k


def packed_linear_triton(
    x: torch.Tensor,  # [..., K] fp16/bf16
    kw: KernelWeight,  # [N, K] repacked
    bias: torch.Tensor | None = None,  # [N]
    *,
    config: TileConfig | None = None,
    split_k: int | None = None,
) -> torch.Tensor:  # [..., N]
    """Triton weight-only linear on the packed layout; same contract as qlinear_reference(x, qw, bias)."""
    if kw.words.shape[0] != 1:
        raise ValueError("packed_linear_triton takes one [N, K] weight, not experts")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, kw.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], kw.n
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*lead, n)
    config, split_k = launch_plan(m, kw, x.device, config, split_k)
    grid_mn = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    if split_k > 1:
        ws = _workspace(x.device, m * n, torch.float32)
        cnt = _workspace(x.device, grid_mn, torch.int32)
    else:
        ws, cnt = out, out
    args = (x2, kw.words, kw.scale, kw.zero, bias if bias is not None else out, out, ws, cnt,
            m, n, kw.k, kw.words.shape[1] // RB, x2.stride(0), out.stride(0))
    flags = dict(kw.constexprs(), HAS_BIAS=bias is not None, SPLIT_K=split_k, BLOCK_M=config.block_m,
                 BLOCK_N=config.block_n, EVEN_N=n % config.block_n == 0, num_warps=config.num_warps, num_stages=config.num_stages)
    if config.block_m < 16:  # GEMV: no MMA
        _packed_gemv_kernel[(grid_mn, split_k)](*args, (1 << kw.bits) - 1, **flags)
    else:
        _packed_gemm_kernel[(grid_mn, split_k)](*args, **flags, USE_ASM=x.is_cuda, GROUP_M=config.group_m)
    return out.reshape(*lead, n)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K,
                    BITS: tl.constexpr, GROUP: tl.constexpr, IS_MX: tl.constexpr, HAS_ZERO: tl.constexpr,
                    SYM_OFFSET: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dense W^T [K, N] in out's dtype from one pack block per program (rounded like dequantize())."""
    P: tl.constexpr = 2 * (16 // BITS)  # repack.codes_per_word
    H: tl.constexpr = 16 // BITS
    blk = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RB)
    mask_n = offs_n < N
    words = tl.load(w_ptr + (blk * RB + offs_r)[:, None].to(tl.int64) * N + offs_n[None, :],
                    mask=mask_n[None, :], other=0)  # [RB, BLOCK_N]
    for j in tl.static_range(P):
        offs_k = blk * P * RB + j * RB + offs_r  # [RB]
        c = (words >> (16 * (j // H) + BITS * (j % H))) & ((1 << BITS) - 1)  # chunk j at bit q_j
        g = 0
        if GROUP != 0:
            g = tl.minimum(blk * P * RB + j * RB, K - 1) // GROUP
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if IS_MX:
            idx = c & 7
            e = idx >> 1
            mag = tl.where(e == 0, (idx & 1).to(tl.float32) * 0.5,
                           (2 + (idx & 1)).to(tl.float32) * 0.5 * (1 << tl.maximum(e - 1, 0)).to(tl.float32))
            w = tl.where((c & 8) != 0, -mag, mag) * s
        else:
            if HAS_ZERO:
                z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
            else:
                z = SYM_OFFSET
            w = (c.to(tl.float32) - z) * s
        tl.store(out_ptr + offs_k[:, None].to(tl.int64) * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=(offs_k[:, None] < K) & mask_n[None, :])


def dequantize_packed(kw: KernelWeight, dtype: torch.dtype) -> torch.Tensor:
    """Dense W^T [K, N] in `dtype` from the packed layout, bit-identical to QuantizedWeight.dequantize().T."""
    out = torch.empty((kw.k, kw.n), dtype=dtype, device=kw.words.device)
    block_n = 128
    grid = (kw.words.shape[1] // RB, triton.cdiv(kw.n, block_n))
    _dequant_kernel[grid](kw.words, kw.scale, kw.zero, out, kw.n, kw.k, **kw.constexprs(), BLOCK_N=block_n)
    return out


def large_m_linear(x: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Above the crossover M: dequantize into a temporary fp16/bf16 W^T once and call cuBLAS.

    The dense weight lives only for this call (never cached on the GPU); at M in the thousands the
    GEMM is compute-bound and the dequantization (one read of the codes, one write) is a few percent.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, kw.k)
    w_t = dequantize_packed(kw, x.dtype)  # [K, N]
    y = torch.addmm(bias.to(x.dtype), x2, w_t) if bias is not None else x2 @ w_t
    return y.reshape(*lead, kw.n)
