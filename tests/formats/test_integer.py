import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit.errors import QuantkitError
from quantkit.formats import integer
from quantkit.formats.spec import FormatSpec


def _x(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), gran=st.sampled_from(["tensor", "channel", "group"]),
       gs=st.sampled_from([1, 2, 4, 8]), rows=st.integers(1, 5), groups=st.integers(1, 4), seed=st.integers(0, 999))
def test_codes_roundtrip_bit_exact(bits, symmetric, gran, gs, rows, groups, seed):
    spec = FormatSpec("int", bits, symmetric, gran, gs if gran == "group" else None)
    x = _x(seed, (rows, gs * groups))
    codes, scale, zero = integer.quantize_int(x, spec)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2**bits
    xhat = integer.dequantize_int(codes, scale, zero, spec)
    # Requantizing the dequantized tensor with the same parameters gives the same codes.
    assert torch.equal(integer.quantize_int_with(xhat, scale, zero, spec), codes)
    # Error is at most half a step inside the range.
    step = scale.float().unsqueeze(-1)
    err = (integer._group_view(x, spec) - integer._group_view(xhat, spec)).abs()
    assert bool((err <= step / 2 + 1e-5).all())


def test_symmetric_codes_and_scale_exact():
    spec = FormatSpec("int", 4, True, "channel")
    x = torch.tensor([[-7.0, -3.5, 0.0, 3.5, 7.0]])
    codes, scale, zero = integer.quantize_int(x, spec)
    assert zero is None
    assert scale.item() == 1.0  # amax 7 / qmax 7
    # 3.5 rounds half to even -> 4; stored with offset 8.
    assert codes.tolist() == [[1, 4, 8, 12, 15]]
    assert integer.dequantize_int(codes, scale, None, spec).tolist() == [[-7.0, -4.0, 0.0, 4.0, 7.0]]


def test_asymmetric_represents_zero_exactly():
    spec = FormatSpec("int", 3, False, "channel")
    x = torch.tensor([[0.3, 1.0, 5.0, 0.0]])  # min clamps to 0
    codes, scale, zero = integer.quantize_int(x, spec)
    xhat = integer.dequantize_int(codes, scale, zero, spec)
    assert xhat[0, 3].item() == 0.0
    assert int(zero) == 0 and int(codes.max()) == 7


def test_group_scale_shape_and_fp16_scales():
    spec = FormatSpec("int", 4, True, "group", 32)
    w = _x(0, (6, 128))
    codes, scale, _ = integer.quantize_int(w, spec, torch.float16)
    assert scale.shape == (6, 4) and scale.dtype == torch.float16
    assert integer.scale_shape((6, 128), spec) == (6, 4)


def test_all_zero_group_gives_no_nan():
    spec = FormatSpec("int", 4, False, "group", 4)
    x = torch.zeros(2, 8)
    codes, scale, zero = integer.quantize_int(x, spec)
    assert torch.isfinite(scale).all()
    assert torch.equal(integer.dequantize_int(codes, scale, zero, spec), x)


@pytest.mark.parametrize("bits", [1, 9, 16])
def test_bits_out_of_range(bits):
    with pytest.raises(QuantkitError, match="between 2 and 8"):
        FormatSpec("int", bits)


def test_group_size_must_divide():
    with pytest.raises(QuantkitError, match="does not divide the input dimension 100"):
        FormatSpec("int", 4, True, "group", 32).check_k(100)
