"""The public dispatch (qlinear / qexperts) with backend='triton' runs the kernels and agrees with the reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantkit import kernels
from quantkit.formats import FormatSpec, QuantizedWeight
from quantkit.quantizers.activation import ActQuantizer

from .helpers import HALF_TOL, rel_err


def test_quantized_mlp_triton_equals_reference() -> None:
    """A small quantized MLP, each layer its own format: layer by layer, Triton agrees with the reference.

    Each layer gets the reference's input, so one layer's rounding differences cannot flip the next
    layer's activation codes and compound (the end-to-end error is checked loosely below).
    """
    specs = [(None, FormatSpec(bits=4, granularity="group", group_size=128)),
             (FormatSpec(bits=8), FormatSpec(bits=8)),
             (FormatSpec.mxfp4(), FormatSpec.mxfp4()),
             (FormatSpec(bits=4, granularity="group", group_size=64), FormatSpec(bits=4, granularity="group", group_size=64)),
             (None, FormatSpec(bits=3, symmetric=False, granularity="group", group_size=32))]
    gen = torch.Generator().manual_seed(1)
    h = h_triton = torch.randn(3, 5, 256, dtype=torch.float16)
    for i, (a_spec, w_spec) in enumerate(specs):
        k = h.shape[-1]
        qw = QuantizedWeight.quantize(torch.randn(128, k, generator=gen) / k ** 0.5, w_spec)
        bias = torch.randn(128, generator=gen).half()
        act = None if a_spec is None else ActQuantizer(a_spec)
        assert kernels.resolve_backend(h, qw, act, "triton") == "triton"
        y_ref = kernels.qlinear(h, qw, bias, act, backend="reference")
        y = kernels.qlinear(h, qw, bias, act, backend="triton")
        assert rel_err(y, y_ref) < HALF_TOL, f"layer {i}: {w_spec.short}"
        h_triton = kernels.qlinear(h_triton, qw, bias, act, backend="triton")
        h = y_ref
        if i < len(specs) - 1:
            h, h_triton = F.gelu(h), F.gelu(h_triton)
    assert rel_err(h_triton, h) < 3e-2  # end to end, with requantized 4-bit activations in between


def test_resolve_backend_under_interpreter() -> None:
    qw = QuantizedWeight.quantize(torch.randn(32, 64), FormatSpec(bits=4, granularity="group", group_size=32))
    x = torch.randn(4, 64, dtype=torch.float16)
    assert kernels.resolve_backend(x, qw, None, "triton") == "triton"
    assert kernels.resolve_backend(x, qw, None) == "reference"  # auto: CPU tensors stay on the reference
    with pytest.raises(ValueError, match="no Triton kernel"):
        kernels.qlinear(x, qw, act=torch.tanh, backend="triton")


def test_qexperts_triton_equals_reference() -> None:
    spec = FormatSpec(bits=4, granularity="group", group_size=64)
    gate_up = QuantizedWeight.quantize(torch.randn(4, 128, 64), spec)
    down = QuantizedWeight.quantize(torch.randn(4, 64, 64), spec)
    x = torch.randn(9, 64, dtype=torch.float16)
    idx, w = torch.randint(0, 4, (9, 2)), torch.rand(9, 2)
    assert kernels.resolve_experts_backend(x, gate_up, down, backend="triton") == "triton"
    y = kernels.qexperts(x, idx, w, gate_up, down, F.silu, backend="triton")
    y_ref = kernels.qexperts(x, idx, w, gate_up, down, F.silu, backend="reference")
    assert rel_err(y, y_ref) < HALF_TOL


@pytest.mark.parametrize("act_spec", [None, FormatSpec(bits=8)], ids=["w4a16", "w4a8"])
def test_quant_linear_module_uses_the_dispatch(act_spec: FormatSpec | None) -> None:
    """quantkit.nn.QuantLinear with kernel_backend='triton' gives the reference module's output."""
    from quantkit.nn import QuantLinear

    wspec = FormatSpec(bits=4, granularity="group", group_size=64) if act_spec is None else FormatSpec(bits=8)
    linear = torch.nn.Linear(128, 48).half()
    q = QuantLinear.from_linear(linear, wspec, None if act_spec is None else ActQuantizer(act_spec))
    x = torch.randn(2, 7, 128, dtype=torch.float16)
    y_ref = q(x)
    q.kernel_backend = "triton"
    assert rel_err(q(x), y_ref) < HALF_TOL
