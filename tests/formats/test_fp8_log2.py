import torch

from quantkit.formats import fp8, log2
from quantkit.formats.spec import FormatSpec


def test_fp8_roundtrip_bit_exact():
    spec = FormatSpec("fp8", 8, True, "channel")
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 10
    codes, scale = fp8.quantize_fp8(x, spec)
    xhat = fp8.dequantize_fp8(codes, scale, spec)
    codes2 = ((xhat / scale.float()).clamp(-448, 448)).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(codes2, codes)
    assert (xhat.abs().amax(-1) / scale.float().squeeze(-1)).max().item() <= 448
    rel = (x - xhat).norm() / x.norm()
    assert rel < 0.05


def test_log2_formula():
    x = torch.tensor([1.0, 0.5, 0.3, 0.0])
    codes = log2.quantize_log2(x, 1.0, 3)
    # -log2(0.3) = 1.74 -> 2; x = 0 takes the largest code 7.
    assert codes.tolist() == [0, 1, 2, 7]
    assert log2.dequantize_log2(codes, 1.0).tolist() == [1.0, 0.5, 0.25, 2.0**-7]
