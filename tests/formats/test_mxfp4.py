import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit.formats import mxfp4
from quantkit.formats.spec import FormatSpec


def test_e2m1_grid_and_ties_to_even():
    v = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 5.1, 6.0, 7.9, -0.75, -5.0])
    got = mxfp4.decode_e2m1(mxfp4.encode_e2m1(v))
    want = [0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.5, 2.0, 2.0, 2.0, 3.0, 4.0, 4.0, 4.0, 6.0, 6.0, 6.0, -1.0, -4.0]
    assert got.tolist() == want


def test_codes_are_e2m1_bit_patterns():
    vals = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -6.0])
    assert mxfp4.encode_e2m1(vals).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9, 15]


def test_scale_rule_is_ocp_floor():
    x = torch.zeros(1, 64)
    x[0, 0] = 5.0  # floor(log2 5) = 2 -> X = 2^0
    x[0, 32] = 0.1  # floor(log2 0.1) = -4 -> X = 2^-6
    codes, exps = mxfp4.quantize_mxfp4(x)
    assert (exps.int() - 127).tolist() == [[0, -6]]
    assert mxfp4.dequantize_mxfp4(codes, exps)[0, 0].item() == 4.0  # 5 is a tie between 4 and 6 -> even (4)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 4), blocks=st.integers(1, 3), mag=st.floats(1e-3, 1e3))
def test_roundtrip_bit_exact(seed, rows, blocks, mag):
    x = torch.randn(rows, 32 * blocks, generator=torch.Generator().manual_seed(seed)) * mag
    codes, exps = mxfp4.quantize_mxfp4(x)
    xhat = mxfp4.dequantize_mxfp4(codes, exps)
    codes2, exps2 = mxfp4.quantize_mxfp4(xhat)
    # Dequantized values are on the grid: requantizing them reproduces the codes; the exponent may
    # only drop (when clipping 6..8 x X lowered the block maximum), and values must be equal then.
    assert torch.equal(mxfp4.dequantize_mxfp4(codes2, exps2), xhat)
    amax = x.reshape(rows, blocks, 32).abs().amax(-1)
    scale = mxfp4.exponent_scale(exps)
    assert bool(((amax / scale) < 8).all()) and bool(((amax / scale) >= 4).all())


def test_zero_block():
    codes, exps = mxfp4.quantize_mxfp4(torch.zeros(2, 32))
    assert torch.equal(mxfp4.dequantize_mxfp4(codes, exps), torch.zeros(2, 32))


def test_spec_requires_group_32():
    import pytest

    from quantkit.errors import QuantkitError

    with pytest.raises(QuantkitError):
        FormatSpec(kind="mxfp4", bits=4, granularity="group", group_size=16)
