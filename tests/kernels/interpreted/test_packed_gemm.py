"""Packed-layout kernels (GEMV, MMA tiles, split-K with atomics, dense dequantize) against the references."""
from __future__ import annotations

import pytest
import torch

from quantkit import kernels
from quantkit.formats import FormatSpec, QuantizedWeight
from quantkit.kernels import weight_only
from quantkit.kernels.configs import TileConfig
from quantkit.kernels.packed_linear import dequantize_packed, packed_linear_triton
from quantkit.kernels.reference import qlinear_reference
from quantkit.kernels.repack import repack

from .helpers import HALF_TOL, rel_err

SPECS = ([FormatSpec(bits=b, symmetric=s, granularity="group", group_size=g)
          for b in (2, 4, 8) for g in (32, 128) for s in (True, False)]
         + [FormatSpec(bits=4, granularity="group", group_size=64), FormatSpec(bits=4, granularity="group", group_size=48),
            FormatSpec(bits=4, granularity="channel"), FormatSpec(bits=2, symmetric=False, granularity="channel"),
            FormatSpec(bits=8, granularity="tensor"), FormatSpec.mxfp4()]
         # 3/5/6/7-bit: 10/6/4/4 codes a word, none straddling a half word; 3-bit blocks (160 k) cut groups
         + [FormatSpec(bits=3, symmetric=False, granularity="group", group_size=128),
            FormatSpec(bits=3, granularity="group", group_size=32), FormatSpec(bits=5, symmetric=False, granularity="group",
                                                                             group_size=64),
            FormatSpec(bits=6, granularity="channel"), FormatSpec(bits=7, symmetric=False, granularity="group", group_size=32)])
K, N = 384, 40  # K: 3 int4 pack blocks, not a multiple of the int2 (256) or int3 (160) block; N: not of any N tile


def _qw(spec: FormatSpec, n: int = N, k: int = K) -> QuantizedWeight:
    return QuantizedWeight.quantize(torch.randn(n, k), spec)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short)
def test_dense_dequantize_is_exact(spec: FormatSpec) -> None:
    """The large-M path's dense weight equals dequantize() bit for bit (fp16 and fp32; the interpreter
    truncates fp32 -> bf16 instead of rounding, so bf16 is left to the GPU run)."""
    qw = _qw(spec)
    kw = repack(qw)
    for dt in (torch.float16, torch.float32):
        assert torch.equal(dequantize_packed(kw, dt), qw.dequantize(dt).T)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short)
def test_mma_path_weights_are_exact(spec: FormatSpec) -> None:
    """x = I through the MMA tiles: every output is one weight, equal to dequantize() bit for bit."""
    qw = _qw(spec)
    y = packed_linear_triton(torch.eye(K, dtype=torch.float16), repack(qw), config=TileConfig(32, 32, 0))
    assert torch.equal(y, qw.dequantize(torch.float16).T)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short)
@pytest.mark.parametrize("m,tile,split_k", [(1, None, 1), (1, None, 3), (2, None, 2), (5, TileConfig(16, 32, 0), 1),
                                            (37, TileConfig(16, 32, 0), 2)])
def test_matches_reference(spec: FormatSpec, m: int, tile: TileConfig | None, split_k: int) -> None:
    qw = _qw(spec)
    x = torch.randn(m, K, dtype=torch.float16)
    bias = torch.randn(N, dtype=torch.float16)
    y = packed_linear_triton(x, repack(qw), bias, config=tile, split_k=split_k)
    assert rel_err(y, qlinear_reference(x, qw, bias)) < HALF_TOL


@pytest.mark.parametrize("m", [1, 2])
def test_gemv_bf16(m: int) -> None:
    """The GEMV path has no tl.dot, so the interpreter computes bf16 correctly there."""
    spec = FormatSpec(bits=4, symmetric=False, granularity="group", group_size=32)
    qw = _qw(spec)
    x = torch.randn(m, K, dtype=torch.bfloat16)
    y = packed_linear_triton(x, repack(qw), split_k=2)
    assert rel_err(y, qlinear_reference(x, qw)) < 1e-2  # bf16 output rounding (8 bits) is the whole error


def test_split_k_slices_past_the_end_and_workspace_left_zero() -> None:
    """More slices than pack blocks: empty slices still count in; the workspace is zero afterwards."""
    qw = _qw(FormatSpec(bits=4, granularity="group", group_size=32), k=256)
    x = torch.randn(2, 256, dtype=torch.float16)
    y = packed_linear_triton(x, repack(qw), split_k=5)
    assert rel_err(y, qlinear_reference(x, qw)) < HALF_TOL


def test_k_not_a_multiple_of_the_pack_block() -> None:
    qw = _qw(FormatSpec(bits=4, granularity="channel"), k=203)
    for m, tile in ((1, None), (20, TileConfig(16, 32, 0))):
        x = torch.randn(m, 203, dtype=torch.float16)
        for split_k in (1, 2):
            y = packed_linear_triton(x, repack(qw), config=tile, split_k=split_k)
            assert rel_err(y, qlinear_reference(x, qw)) < HALF_TOL


def test_qlinear_routes_packable_formats_to_the_packed_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """2-8-bit codes go through the packed kernel (repacked once per weight cache); groups that are not a
    multiple of 16 through the byte kernel."""
    calls = []
    real = weight_only.cached_repack
    monkeypatch.setattr(weight_only, "cached_repack", lambda qw: calls.append(qw.spec.short) or real(qw))
    x = torch.randn(3, 320, dtype=torch.float16)
    packable = [FormatSpec(bits=b, granularity="group", group_size=64) for b in (3, 4)]
    for spec in packable + [FormatSpec(bits=4, granularity="group", group_size=40)]:
        qw = _qw(spec, n=24, k=320)
        y = kernels.qlinear(x, qw, backend="triton")
        assert rel_err(y, qlinear_reference(x, qw)) < HALF_TOL
    assert calls == [s.short for s in packable]


def test_repack_is_cached_per_weight() -> None:
    qw = _qw(FormatSpec(bits=4, granularity="group", group_size=128))
    qw.kernel_cache = {}
    x = torch.randn(1, K, dtype=torch.float16)
    kernels.qlinear(x, qw, backend="triton")
    first = qw.kernel_cache["packed"][1]
    kernels.qlinear(x, qw, backend="triton")
    assert qw.kernel_cache["packed"][1] is first
    qw.packed.add_(0)  # a write to the codes (version bump) invalidates the packed copy
    kernels.qlinear(x, qw, backend="triton")
    assert qw.kernel_cache["packed"][1] is not first


@pytest.mark.parametrize("spec", [FormatSpec(bits=4, granularity="group", group_size=128), FormatSpec.mxfp4()],
                         ids=lambda s: s.short)
def test_large_m_path_matches_reference(spec: FormatSpec) -> None:
    """Above the crossover: dense W^T from the packed layout, then a plain matmul (cuBLAS on a GPU)."""
    from quantkit.kernels.packed_linear import large_m_linear

    qw = _qw(spec)
    x = torch.randn(2, 70, K, dtype=torch.float16)
    bias = torch.randn(N, dtype=torch.float16)
    y = large_m_linear(x, repack(qw), bias)
    assert y.shape == (2, 70, N)
    assert rel_err(y, qlinear_reference(x, qw, bias)) < HALF_TOL


def test_large_m_threshold_only_on_cuda() -> None:
    """Off CUDA (the interpreter) no call takes the dequantize + cuBLAS path."""
    qw = _qw(FormatSpec(bits=4, granularity="group", group_size=128))
    assert weight_only.large_m_threshold(torch.randn(5000, K, dtype=torch.float16), qw) is None
