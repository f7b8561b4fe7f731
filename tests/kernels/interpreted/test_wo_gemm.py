"""Weight-only GEMM (W{2,3,4,8}A16 int, MXFP4 W4A16) against qlinear_reference."""
from __future__ import annotations

import pytest
import torch

from quantkit.formats import FormatSpec, QuantizedWeight
from quantkit.kernels.configs import TileConfig
from quantkit.kernels.reference import qlinear_reference
from quantkit.kernels.wo_gemm import wo_linear_triton

from .helpers import HALF_TOL, rel_err

GROUPED = [FormatSpec(bits=b, symmetric=s, granularity="group", group_size=g)
           for b in (2, 3, 4, 8) for g in (32, 64, 128) for s in (True, False)]
OTHER = [FormatSpec(bits=4, granularity="channel"), FormatSpec(bits=3, symmetric=False, granularity="channel"),
         FormatSpec(bits=8, granularity="tensor"), FormatSpec(bits=4, granularity="group", group_size=48),
         FormatSpec.mxfp4()]
SPECS = GROUPED + OTHER


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short)
def test_dequantization_in_registers_is_exact(spec: FormatSpec) -> None:
    """x = I makes every output one weight times 1: the kernel's weights must equal dequantize() bit for bit."""
    k, n = 384, 24  # K not a multiple of the 256-wide K tile; N not of the 32-wide N tile
    qw = QuantizedWeight.quantize(torch.randn(n, k), spec)
    eye = torch.eye(k, dtype=torch.float16)
    y = wo_linear_triton(eye, qw, config=TileConfig(128, 32, 256))
    assert torch.equal(y, qw.dequantize(torch.float16).T)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short)
@pytest.mark.parametrize("m,split_k", [(1, 4), (37, 1)])
def test_matches_reference(spec: FormatSpec, m: int, split_k: int) -> None:
    k, n = 384, 40
    qw = QuantizedWeight.quantize(torch.randn(n, k), spec)
    x = torch.randn(m, k, dtype=torch.float16)
    bias = torch.randn(n, dtype=torch.float16)
    y = wo_linear_triton(x, qw, bias, config=TileConfig(16, 32, 64), split_k=split_k)
    assert rel_err(y, qlinear_reference(x, qw, bias)) < HALF_TOL


@pytest.mark.parametrize("m", [200, 257])
def test_large_m_and_leading_dims(m: int) -> None:
    """A few hundred rows, 3-D input, the interpreter's default (untuned) tile and split rule."""
    spec = FormatSpec(bits=4, granularity="group", group_size=128)
    qw = QuantizedWeight.quantize(torch.randn(48, 256), spec)
    x = torch.randn(1, m, 256, dtype=torch.float16)
    y = wo_linear_triton(x, qw)
    assert y.shape == (1, m, 48)
    assert rel_err(y, qlinear_reference(x, qw)) < HALF_TOL


@pytest.mark.parametrize("bits", [3, 4])
def test_k_not_a_multiple_of_the_tile(bits: int) -> None:
    """Per-channel scales allow any K: the last K tile is partly masked (and a 3-bit row ends mid-byte)."""
    qw = QuantizedWeight.quantize(torch.randn(40, 203), FormatSpec(bits=bits, granularity="channel"))
    x = torch.randn(5, 203, dtype=torch.float16)
    for split_k in (1, 2):
        y = wo_linear_triton(x, qw, config=TileConfig(16, 32, 64), split_k=split_k)
        assert rel_err(y, qlinear_reference(x, qw)) < HALF_TOL


def test_split_k_slices_past_the_end() -> None:
    """More slices than K tiles: trailing slices own no K tile and must add exactly zero."""
    spec = FormatSpec(bits=4, granularity="group", group_size=32)
    qw = QuantizedWeight.quantize(torch.randn(40, 96), spec)
    x = torch.randn(3, 96, dtype=torch.float16)
    y = wo_linear_triton(x, qw, config=TileConfig(16, 64, 32), split_k=5)
    assert rel_err(y, qlinear_reference(x, qw)) < HALF_TOL


def test_empty_input() -> None:
    qw = QuantizedWeight.quantize(torch.randn(16, 64), FormatSpec(bits=4, granularity="group", group_size=32))
    assert wo_linear_triton(torch.randn(0, 64, dtype=torch.float16), qw).shape == (0, 16)
