"""Integer GEMM (W8A8, W4A4 int, MXFP4 W4A4): exact integer accumulation, scales, masks."""
from __future__ import annotations

import pytest
import torch

from quantkit.formats import FormatSpec, QuantizedWeight
from quantkit.kernels.act_quant import quantize_act_triton
from quantkit.kernels.aq_gemm import aq_linear_triton, aq_matmul_triton
from quantkit.kernels.configs import TileConfig
from quantkit.kernels.reference import qlinear_reference
from quantkit.kernels.reference_act import aq_matmul_reference, quantize_act_reference
from quantkit.quantizers.activation import ActQuantizer

from .helpers import HALF_TOL, rel_err

W8A8 = (FormatSpec(bits=8), FormatSpec(bits=8))
PAIRS = [
    W8A8,
    (FormatSpec(bits=8), FormatSpec(bits=8, granularity="group", group_size=128)),
    (FormatSpec(bits=4), FormatSpec(bits=4)),
    (FormatSpec(bits=4, granularity="group", group_size=64), FormatSpec(bits=4, granularity="group", group_size=128)),
    (FormatSpec(bits=4), FormatSpec(bits=4, symmetric=False, granularity="group", group_size=32)),
    (FormatSpec.mxfp4(), FormatSpec.mxfp4()),
]
IDS = [f"a-{a.short}-w-{w.short}" for a, w in PAIRS]


@pytest.mark.parametrize("k", [256, 200])
def test_int32_accumulation_is_exact(k: int) -> None:
    """Unit scales: the fp32 output is the integer dot product itself (|sum| < 2^24)."""
    m, n = 37, 40
    codes = torch.randint(0, 256, (n, k), dtype=torch.uint8)
    qw = QuantizedWeight.from_codes(codes, torch.ones(n, 1, dtype=torch.float16), None, FormatSpec(bits=8))
    q = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    y = aq_matmul_triton(q, torch.ones(m, 1), qw, out_dtype=torch.float32, config=TileConfig(16, 32, 64))
    expected = q.long() @ (codes.long() - 128).T
    assert torch.equal(y.long(), expected)


@pytest.mark.parametrize("pair", PAIRS, ids=IDS)
@pytest.mark.parametrize("m", [1, 45, 130])
def test_matches_float64_reference(pair: tuple[FormatSpec, FormatSpec], m: int) -> None:
    a_spec, w_spec = pair
    k, n = 256, 40
    qw = QuantizedWeight.quantize(torch.randn(n, k), w_spec)
    q, scale = quantize_act_reference(torch.randn(m, k, dtype=torch.float16), a_spec)
    bias = torch.randn(n, dtype=torch.float16)
    y = aq_matmul_triton(q, scale, qw, bias, torch.float32, config=TileConfig(32, 32, 128))
    assert rel_err(y, aq_matmul_reference(q, scale, qw, bias, torch.float32)) < 1e-6


@pytest.mark.parametrize("pair", PAIRS, ids=IDS)
def test_linear_matches_fake_quant_reference(pair: tuple[FormatSpec, FormatSpec]) -> None:
    """Quantize kernel + GEMM against the ActQuantizer's fake quantization and dequantized weights."""
    a_spec, w_spec = pair
    act = ActQuantizer(a_spec)
    qw = QuantizedWeight.quantize(torch.randn(40, 256), w_spec)
    x = torch.randn(2, 9, 256, dtype=torch.float16)
    y = aq_linear_triton(x, qw, None, act)
    assert y.shape == (2, 9, 40)
    assert rel_err(y, qlinear_reference(x, qw, None, act)) < HALF_TOL


def test_mxfp4_with_rotation() -> None:
    act = ActQuantizer(FormatSpec.mxfp4())
    qw = QuantizedWeight.quantize(torch.randn(40, 128), FormatSpec.mxfp4())
    r = torch.linalg.qr(torch.randn(4, 32, 32))[0]
    x = torch.randn(7, 128, dtype=torch.float16)
    y = aq_linear_triton(x, qw, None, act, r)
    assert rel_err(y, qlinear_reference(x, qw, None, act, r)) < 1e-2  # a rare flipped code is allowed


def test_quantized_input_feeds_gemm_unchanged() -> None:
    """W8A8 end to end from the fused quantizer: integer path, so equal to the float64 reference."""
    x = torch.randn(33, 256, dtype=torch.float16)
    qw = QuantizedWeight.quantize(torch.randn(40, 256), FormatSpec(bits=8))
    q, scale = quantize_act_triton(x, FormatSpec(bits=8))
    y = aq_matmul_triton(q, scale, qw, None, torch.float32, config=TileConfig(16, 64, 64))
    assert rel_err(y, aq_matmul_reference(q, scale, qw, None, torch.float32)) < 1e-6
