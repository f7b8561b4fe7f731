import torch
import torch.nn.functional as F
from torch import nn

from quantkit.formats.spec import FormatSpec
from quantkit.nn import QuantConv2d, QuantExperts, QuantLinear
from quantkit.quantizers.activation import ActQuantizer, fake_quant

W4G32 = FormatSpec("int", 4, True, "group", 32)
A8 = FormatSpec("int", 8, False, "channel")


def test_quant_linear_matches_dequantized_layer():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = QuantLinear.from_linear(lin, W4G32, ActQuantizer(A8))
    x = torch.randn(5, 7, 64)
    w = q.quantized_weight.dequantize()
    torch.testing.assert_close(q(x), F.linear(fake_quant(x, A8), w, lin.bias), rtol=0, atol=0)
    assert (w - lin.weight).norm() / lin.weight.norm() < 0.15


def test_weight_only_linear():
    lin = nn.Linear(64, 16, bias=False)
    q = QuantLinear.from_linear(lin, FormatSpec.mxfp4())
    x = torch.randn(3, 64)
    assert torch.equal(q(x), F.linear(x, q.quantized_weight.dequantize()))


def test_quant_conv_3x3_and_1x1():
    torch.manual_seed(0)
    for conv in (nn.Conv2d(32, 16, 3, padding=1), nn.Conv2d(32, 16, 1)):
        q = QuantConv2d.from_conv(conv, FormatSpec("int", 8, True, "channel"), ActQuantizer(A8, channel_dim=1))
        x = torch.randn(2, 32, 6, 6)
        w = q.quantized_weight.dequantize().reshape(conv.weight.shape)
        xq = fake_quant(x.movedim(1, -1), A8).movedim(-1, 1)  # per pixel, across channels
        want = F.conv2d(xq, w, conv.bias, conv.stride, conv.padding)
        torch.testing.assert_close(q(x), want, rtol=1e-5, atol=1e-5)


def test_static_activation_range():
    aq = ActQuantizer(FormatSpec("int", 8, False, "tensor"), dynamic=False)
    aq.observe(torch.tensor([-1.0, 3.0]))
    aq.finalize()
    y = aq(torch.tensor([10.0, -5.0, 0.0]))
    step = aq.scale.item()
    assert abs(step - 4.0 / 255) < 1e-7
    # Out-of-range inputs clip to the calibrated range (up to the zero point's rounding); 0 is exact.
    assert abs(y[0].item() - 3.0) <= step and abs(y[1].item() + 1.0) <= step and y[2].item() == 0.0


def test_quant_experts_matches_transformers_experts():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=64, intermediate_size=96, num_local_experts=4)
    torch.manual_seed(0)
    experts = MixtralExperts(cfg)
    nn.init.normal_(experts.gate_up_proj, std=0.05)
    nn.init.normal_(experts.down_proj, std=0.05)
    q = QuantExperts.from_experts(experts, W4G32)
    assert q.gate_up.shape == (4, 192, 64) and q.gate_up.scale.shape == (4, 192, 2)
    # The original module on the dequantized weights gives the same routed output.
    with torch.no_grad():
        experts.gate_up_proj.copy_(q.gate_up.dequantize())
        experts.down_proj.copy_(q.down.dequantize())
    x = torch.randn(10, 64)
    idx = torch.tensor([[0, 1], [2, 3]] * 5)
    wts = torch.rand(10, 2)
    torch.testing.assert_close(q(x, idx, wts), experts(x, idx, wts), rtol=1e-5, atol=1e-6)


def test_quant_experts_tensor_granularity_is_per_expert():
    w = torch.randn(3, 8, 32)
    w[1] *= 100
    qw = QuantExperts.quantize_3d(w, FormatSpec("int", 8, True, "tensor"))
    assert qw.scale.shape == (3, 1, 1) and qw.scale[0].item() != qw.scale[1].item()
