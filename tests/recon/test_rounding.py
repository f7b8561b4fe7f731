"""Learnable rounding: FlexRound starts at RTN, its gradient follows the reciprocal rule, and what is
exported (codes + fp16 scales) is exactly what the layer computed."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantkit.config import ActivationConfig, LayerPlan
from quantkit.formats.qweight import QuantizedWeight
from quantkit.formats.spec import FormatSpec
from quantkit.layers import LayerTask, make_act
from quantkit.recon.act import LSQActQuantizer
from quantkit.recon.init import init_weight_grid
from quantkit.recon.layers import ReconLayer, make_act_module, make_rounding
from quantkit.recon.rounding import AdaRound, FlexRound

SPECS = [FormatSpec("int", 4, False, "channel"), FormatSpec("int", 4, True, "channel"),
         FormatSpec("int", 3, False, "group", 8), FormatSpec("int", 4, True, "tensor")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short)
def test_flexround_at_init_is_rtn(spec):
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    scale, zero = init_weight_grid(w, spec, "minmax")
    fr = FlexRound(w, spec, scale, zero)
    rtn = QuantizedWeight.quantize(w, spec)
    got = fr.export()
    assert torch.equal(got.codes(), rtn.codes()) and torch.equal(got.scale, rtn.scale)
    assert torch.equal(fr(hard=True), rtn.dequantize())


def test_flexround_gradient_reciprocal_rule():
    spec = FormatSpec("int", 4, False, "channel")
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    scale, zero = init_weight_grid(w, spec, "minmax")
    fr = FlexRound(w, spec, scale, zero, use_s4=False)
    fr().sum().backward()
    # At S2 = 1: dW_hat/dS2 = -W / S2^2 = -W, and d/d(log S2) = S2 * d/dS2 = -W.
    torch.testing.assert_close(fr.log_s2.grad, -w, rtol=1e-5, atol=1e-6)
    # Away from 1 (log domain): d/dS2 = -W / S2^2 wherever the code is not clipped.
    with torch.no_grad():
        fr.log_s2.copy_(torch.rand(4, 8, generator=torch.Generator().manual_seed(2)) * 0.2 - 0.1)
    fr.log_s2.grad = None
    fr().sum().backward()
    s2 = fr.log_s2.detach().exp()
    q = torch.round(w / fr.divisor().detach()) + zero.float()
    inside = (q >= 0) & (q <= 15)
    grad_s2 = fr.log_s2.grad / s2
    torch.testing.assert_close(grad_s2[inside], (-w / s2**2)[inside], rtol=1e-4, atol=1e-5)


def test_adaround_export_is_hard_forward_and_soft_start_is_fp():
    spec = FormatSpec("int", 4, False, "group", 4)
    w = torch.randn(3, 12, generator=torch.Generator().manual_seed(3))
    scale, zero = init_weight_grid(w, spec, "mse")
    ar = AdaRound(w, spec, scale, zero)
    assert torch.equal(ar.export().dequantize(), ar(hard=True))
    # on a symmetric min-max grid nothing is clipped: soft rounding starts at the FP weight
    sym = FormatSpec("int", 4, True, "group", 4)
    scale, zero = init_weight_grid(w, sym, "minmax")
    ar = AdaRound(w, sym, scale, zero)
    assert (ar(hard=False) - w).abs().max() < 1e-3 * scale.float().max()


def _task(module, wspec, act):
    return LayerTask("layer", module, "linear", LayerPlan(False, wspec, act))


@pytest.mark.parametrize("rounding", ["adaround", "flexround"])
def test_shipped_module_reproduces_recon_layer_exactly(rounding):
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    act_cfg = ActivationConfig(FormatSpec("int", 8, False, "tensor"), dynamic=False)
    task = _task(lin, FormatSpec("int", 4, False, "channel"), act_cfg)
    x = torch.randn(5, 16)
    rnd = make_rounding(task, rounding, "mse", {})
    act = make_act_module(task, (torch.tensor(0.03), torch.tensor(120, dtype=torch.uint8)), 0.5, True)
    layer = ReconLayer(task, rnd, act)
    with torch.no_grad():  # pretend training moved things
        act.step.mul_(1.1)
        for p in rnd.parameters():
            p.add_(0.05 * torch.randn_like(p))
    layer.eval()
    q = layer.to_quantized(task)
    assert isinstance(layer.act, LSQActQuantizer) and float(q.act.scale) == float(act.step.detach())
    w_shipped = q.quantized_weight.dequantize()
    assert torch.equal(w_shipped, layer.weight_hat())
    assert torch.equal(q(x), layer(x))
    assert torch.equal(q(x), F.linear(q.act(x), w_shipped, lin.bias))
    assert make_act(act_cfg, "linear") is not None
