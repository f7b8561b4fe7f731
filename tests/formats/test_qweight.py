import torch

from quantkit.formats import QuantizedWeight
from quantkit.formats.integer import dequantize_int
from quantkit.formats.spec import FormatSpec


def test_w4_g128_bytes_are_4_125_bits():
    w = torch.randn(64, 256)
    qw = QuantizedWeight.quantize(w, FormatSpec("int", 4, True, "group", 128))
    assert qw.nbytes * 8 / w.numel() == 4.125


def test_dequantize_matches_codes():
    spec = FormatSpec("int", 3, False, "group", 32)
    w = torch.randn(8, 64)
    qw = QuantizedWeight.quantize(w, spec)
    assert torch.equal(qw.dequantize(), dequantize_int(qw.codes(), qw.scale, qw.zero, spec))
    assert (qw.dequantize() - w).norm() / w.norm() < 0.25


def test_3d_select_is_one_expert():
    spec = FormatSpec("int", 4, True, "group", 32)
    w = torch.randn(3, 16, 64)
    qw = QuantizedWeight.quantize(w, spec)
    assert torch.equal(qw.select(1).dequantize(), QuantizedWeight.quantize(w[1], spec).dequantize())


def test_mxfp4_weight():
    w = torch.randn(4, 64)
    qw = QuantizedWeight.quantize(w, FormatSpec.mxfp4())
    assert qw.packed.shape == (4, 32) and qw.scale.dtype == torch.uint8 and qw.scale.shape == (4, 2)
    assert qw.nbytes * 8 / w.numel() == 4.25
