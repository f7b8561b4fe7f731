"""ReconLayer: a linear/conv layer being reconstructed (learnable rounding + activation quantizer),
and its conversion to the shipped QuantLinear / QuantConv2d."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.layers import LayerTask, build_quantized, make_act
from quantkit.recon.act import DynamicActSTE, LSQActQuantizer
from quantkit.recon.init import init_weight_grid
from quantkit.recon.rounding import AdaRound, FlexRound, LearnableRounding
from quantkit.errors import QuantkitError

ROUNDINGS = ("adaround", "flexround", "nearest")


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The weight in the quantized layout: [N, K], conv [O, I*kh*kw]."""
    w = module.weight.detach()
    return w.reshape(w.shape[0], -1)


def make_rounding(task: LayerTask, rounding: str, weight_init: str, opts: dict[str, Any]) -> LearnableRounding:
    if rounding not in ROUNDINGS:
        raise QuantkitError(f"unknown rounding {rounding!r}; allowed: {', '.join(ROUNDINGS)}")
    w2d = weight_2d(task.module)
    spec = task.plan.weight
    scale, zero = init_weight_grid(w2d, spec, weight_init)
    if rounding == "flexround":
        in_ch = task.module.in_channels // task.module.groups if task.kind == "conv2d" else task.module.in_features
        return FlexRound(w2d, spec, scale, zero, in_ch, bool(opts.get("flexround_s4", True)))
    rnd = AdaRound(w2d, spec, scale, zero, float(opts.get("round_reg_weight", 0.0)) if opts.get("round_reg") else 0.0,
                   tuple(opts.get("b_range", (20.0, 2.0))), float(opts.get("warmup", 0.2)))
    if rounding == "nearest":  # round-to-nearest on the searched grid: nothing to learn
        rnd.alpha.requires_grad_(False)
    return rnd


class ReconLayer(nn.Module):
    """Forward = act_quant(x) (*) W_hat, with W_hat soft while training and hard otherwise."""

    def __init__(self, task: LayerTask, rounding: LearnableRounding, act: nn.Module | None) -> None:
        super().__init__()
        self.task_name, self.kind = task.name, task.kind
        m = task.module
        self.rounding = rounding
        self.act = act
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().clone())
        self.weight_shape = tuple(m.weight.shape)
        self.conv = None
        if self.kind == "conv2d":
            self.conv = {"stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups}
        self.soft = True

    def weight_hat(self) -> torch.Tensor:
        hard = not (self.training and self.soft)
        return self.rounding(hard=hard).reshape(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        w = self.weight_hat().to(x.dtype)
        if self.conv is None:
            return F.linear(x, w, self.bias)
        return F.conv2d(x, w, self.bias, **self.conv)

    def to_quantized(self, task: LayerTask) -> nn.Module:
        """The shipped module: the learned codes and fp16 scales, the learned activation step."""
        q = build_quantized(task, self.rounding.export())
        if isinstance(self.act, LSQActQuantizer):
            self.act.export_into(q.act)
        return q


def make_act_module(task: LayerTask, static_init: tuple[torch.Tensor, torch.Tensor | None] | None,
                    drop_prob: float, learn_step: bool) -> nn.Module | None:
    """The activation quantizer used in training: LSQ for static ranges, STE-wrapped dynamic otherwise."""
    template = make_act(task.plan.activation, task.kind)
    if template is None:
        return None
    if template.dynamic:
        return DynamicActSTE(template, drop_prob)
    scale, zero = static_init
    act = LSQActQuantizer(template, scale, zero, drop_prob)
    act.step.requires_grad_(learn_step)
    return act
