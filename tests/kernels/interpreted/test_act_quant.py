"""Fused activation quantization (int per token / per group / static; MXFP4 with rotation): exact."""
from __future__ import annotations

import pytest
import torch

from quantkit.formats import FormatSpec
from quantkit.kernels.act_quant import quantize_act_triton
from quantkit.kernels.reference_act import quantize_act_reference, rotate_blocks
from quantkit.quantizers.activation import ActQuantizer

from .helpers import rel_err

INT_SPECS = [FormatSpec(bits=8), FormatSpec(bits=4), FormatSpec(bits=8, granularity="group", group_size=64),
             FormatSpec(bits=4, granularity="group", group_size=32), FormatSpec(bits=4, granularity="group", group_size=128)]


def _x(m: int, k: int) -> torch.Tensor:
    x = torch.randn(m, k) * torch.rand(m, 1) * 4  # rows of different ranges
    if m > 2:
        x[1] = 0.0  # an all-zero token: scale 1 (int) / smallest exponent (mxfp4)
    return x.half()


def _x_hat(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.repeat_interleave(q.shape[-1] // scale.shape[-1], dim=-1)


@pytest.mark.parametrize("spec", INT_SPECS, ids=lambda s: s.short)
@pytest.mark.parametrize("m,k", [(1, 256), (37, 384), (130, 128)])
def test_int_matches_reference_exactly(spec: FormatSpec, m: int, k: int) -> None:
    x = _x(m, k)
    q, scale = quantize_act_triton(x, spec, block_k=64)  # per token: K spans several 64-wide chunks
    q_ref, scale_ref = quantize_act_reference(x, spec)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    assert torch.equal(_x_hat(q, scale).to(x.dtype), ActQuantizer(spec)(x))


def test_per_token_k_not_a_multiple_of_the_chunk() -> None:
    x = _x(9, 200)
    q, scale = quantize_act_triton(x, FormatSpec(bits=8), block_k=64)
    assert torch.equal(_x_hat(q, scale).to(x.dtype), ActQuantizer(FormatSpec(bits=8))(x))


def test_static_per_tensor_scale() -> None:
    act = ActQuantizer(FormatSpec(bits=8, granularity="tensor"), dynamic=False)
    x = _x(21, 128)
    act.observe(x[:10])  # later rows fall outside the calibrated range: clamped
    act.finalize()
    q, scale = quantize_act_triton(x, act.spec, act.scale)
    assert torch.equal(_x_hat(q, scale).to(x.dtype), act(x))


@pytest.mark.parametrize("m", [1, 37, 130])
def test_mxfp4_matches_reference_exactly(m: int) -> None:
    x = _x(m, 256)
    q, scale = quantize_act_triton(x, FormatSpec.mxfp4())
    q_ref, scale_ref = quantize_act_reference(x, FormatSpec.mxfp4())
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    assert torch.equal(_x_hat(q, scale).to(x.dtype), ActQuantizer(FormatSpec.mxfp4())(x))


@pytest.mark.parametrize("shared", [True, False])
def test_mxfp4_with_fused_rotation(shared: bool) -> None:
    """Rotation then quantization in one pass; fp32 accumulation order may flip a rare rounding."""
    m, k = 37, 256
    x = _x(m, k)
    r = torch.linalg.qr(torch.randn(1 if shared else k // 32, 32, 32))[0]
    r = r[0] if shared else r
    q, scale = quantize_act_triton(x, FormatSpec.mxfp4(), rotation=r)
    q_ref, scale_ref = quantize_act_reference(x, FormatSpec.mxfp4(), rotation=r)
    assert (q != q_ref).float().mean() < 0.01
    assert rel_err(_x_hat(q, scale), _x_hat(q_ref, scale_ref)) < 1e-2
    expected = ActQuantizer(FormatSpec.mxfp4())(rotate_blocks(x, r))
    assert rel_err(_x_hat(q, scale), expected) < 1e-2
