"""torch.compile(fullgraph=True) of reloaded quantized models on CPU (slow: inductor builds C++ kernels)."""
from __future__ import annotations

import pytest
import torch

import quantkit
from quantkit.nn import QuantConv2d, QuantExperts, QuantLinear
from helpers import cli

pytestmark = pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile unavailable")


def _ckpt(tmp_path, model, recipe):
    out = tmp_path / "ck"
    r = cli("quantize", model, "--out", out, "--recipe", recipe, "--calib-size", "2")
    assert r.exit_code == 0, r.output
    return out


def test_compile_reloaded_moe_fullgraph(tmp_path):
    """W4 weights, dynamic int8 activations, fused experts: one graph (no data-pointer guards, no
    torch.unique / host syncs in the expert path)."""
    torch._dynamo.reset()
    m = quantkit.load(_ckpt(tmp_path, "zoo:tiny-mixtral", "rtn-w4a8"))
    assert any(isinstance(x, QuantExperts) for x in m.modules())
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(ids, use_cache=False).logits
        out = torch.compile(m, fullgraph=True)(ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_compile_reloaded_unet_fullgraph(tmp_path):
    torch._dynamo.reset()
    unet = quantkit.load(_ckpt(tmp_path, "zoo:tiny-sd", "rtn-w4a16-g128")).unet
    assert any(isinstance(x, QuantConv2d) for x in unet.modules())
    g = torch.Generator().manual_seed(0)
    x, enc, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 16, 128, generator=g), torch.tensor([10])
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=enc).sample
        out = torch.compile(unet, fullgraph=True)(x, t, encoder_hidden_states=enc).sample
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_compile_activation_quantized_layers(tmp_path):
    """W8A8 QuantLinear and QuantConv2d (3x3 and 1x1, dynamic int8 inputs) compile to the eager values.
    (A whole W8A8 UNet compiles too, but inductor's own ulp-level differences in convolutions and norms
    move some inputs across int8 rounding boundaries, so whole-model outputs differ by a few steps.)"""
    torch._dynamo.reset()
    unet = quantkit.load(_ckpt(tmp_path, "zoo:tiny-sd", "rtn-w8a8")).unet
    mods = [m for m in unet.modules() if isinstance(m, (QuantLinear, QuantConv2d)) and m.act is not None]
    lin = next(m for m in mods if isinstance(m, QuantLinear))
    c3 = next(m for m in mods if isinstance(m, QuantConv2d) and not m._is_pointwise())
    c1 = next(m for m in mods if isinstance(m, QuantConv2d) and m._is_pointwise())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod, x in ((lin, torch.randn(2, 16, lin.in_features, generator=g)),
                       (c3, torch.randn(1, c3.conv_args["in_channels"], 8, 8, generator=g)),
                       (c1, torch.randn(1, c1.conv_args["in_channels"], 8, 8, generator=g))):
            torch.testing.assert_close(torch.compile(mod, fullgraph=True)(x), mod(x), rtol=0, atol=1e-5)


class _Denoiser(torch.nn.Module):
    """The smallest denoiser with a timestep-aware DGQ group quantizer (3 calibrated steps)."""

    def __init__(self) -> None:
        super().__init__()
        from quantkit.quantizers.group_act import GroupActQuantizer

        self.q = GroupActQuantizer(6, 2, "last", timestep_aware=True)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.lin(self.q(x))


def test_dgq_refuses_fullgraph_with_the_reason_and_compiles_with_graph_breaks():
    from quantkit.quantizers.step_clock import install_step_clock

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    d = _Denoiser()
    d.q.observing = True
    install_step_clock(d)
    with torch.no_grad():
        for t, amp in ((999.0, 10.0), (500.0, 1.0), (1.0, 0.1)):
            d(amp * torch.randn(1, 8, 8, generator=g), torch.tensor([t]))
    d.q.finalize()
    d.q.observing = False
    install_step_clock(d)
    x = torch.randn(1, 8, 8, generator=g)
    with torch.no_grad(), pytest.raises(Exception, match="timestep-aware DGQ quantizers cannot be compiled with "
                                                         "fullgraph=True.*data-dependent"):
        torch.compile(d, fullgraph=True, backend="eager")(x, torch.tensor([500.0]))
    torch._dynamo.reset()
    compiled = torch.compile(d, backend="eager")
    with torch.no_grad():
        outs = {t: compiled(x, torch.tensor([t])) for t in (999.0, 700.0, 10.0)}
        for t, out in outs.items():  # every step still gets its own calibrated groups and scales
            assert torch.equal(out, d(x, torch.tensor([t]))), t
    assert not torch.equal(outs[999.0], outs[10.0])
