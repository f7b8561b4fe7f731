"""Activation quantizers used while reconstructing.

LSQActQuantizer learns the step size of a static per-tensor range through the straight-through
estimator (Esser et al., LSQ; as Q-Diffusion / EDA-DM, without LSQ's gradient scaling); at the end
the step goes into the shipped ActQuantizer's `scale` buffer. DynamicActSTE wraps a dynamic
quantizer so gradients reach the weights. Both can keep FP values with probability `drop_prob`
while training (QDrop).
"""
from __future__ import annotations

import torch
from torch import nn

from quantkit.formats import integer
from quantkit.quantizers.activation import ActQuantizer
from quantkit.recon.ste import pass_through, round_ste


def _qdrop(x: torch.Tensor, xq: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    if not training or drop_prob <= 0:
        return xq
    return torch.where(torch.rand_like(x) < drop_prob, x, xq)


class LSQActQuantizer(nn.Module):
    """Static per-tensor int quantizer with a learnable step; zero point fixed at initialization."""

    def __init__(self, template: ActQuantizer, scale: torch.Tensor, zero: torch.Tensor | None,
                 drop_prob: float = 0.0) -> None:
        super().__init__()
        self.spec, self.channel_dim = template.spec, template.channel_dim
        self.step = nn.Parameter(scale.detach().float().reshape(()).clone())
        self.register_buffer("zero", None if zero is None else zero.detach().reshape(()).clone())
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Per-tensor: the channel axis does not matter, same values as ActQuantizer's static path.
        step = self.step.clamp(min=1e-8)
        if self.spec.symmetric:
            off = integer.zero_offset(self.spec)
            xq = torch.clamp(round_ste(x / step), -off, off - 1) * step
        else:
            z = self.zero.float()
            xq = (torch.clamp(round_ste(x / step) + z, 0, (1 << self.spec.bits) - 1) - z) * step
        return _qdrop(x, xq, self.drop_prob, self.training)

    def export_into(self, target: ActQuantizer) -> None:
        """Write the learned step (and the zero point) into the shipped quantizer's buffers."""
        target.scale = self.step.detach().clamp(min=1e-8).reshape(()).clone().to(target.scale.device)
        if self.zero is not None:
            target.zero = self.zero.clone()


class DynamicActSTE(nn.Module):
    """A dynamic ActQuantizer's forward value with an identity gradient."""

    def __init__(self, quantizer: ActQuantizer, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            xq = self.quantizer(x.detach())
        return _qdrop(x, pass_through(x, xq), self.drop_prob, self.training)


@torch.no_grad()
def init_static_range(lo: torch.Tensor, hi: torch.Tensor, samples: torch.Tensor, template: ActQuantizer,
                      method: str = "minmax", p: float = 2.4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero) of a static per-tensor range: min-max of [lo, hi], or the Lp search that shrinks
    it by 1 - 0.01 i (i < 80) and scores each candidate on `samples` (a subsample of the inputs)."""
    obs = ActQuantizer(template.spec, dynamic=False)
    ratios = [1.0] if method == "minmax" else [1.0 - 0.01 * i for i in range(80)]
    scales, zeros = [], []
    for r in ratios:
        obs.observed_min, obs.observed_max = lo.float() * r, hi.float() * r
        obs.finalize()
        scales.append(obs.scale.clone())
        zeros.append(None if obs.zero is None else obs.zero.clone())
    if len(ratios) == 1:
        return scales[0], zeros[0]
    # All candidates at once: [R, 1] grids against [1, S] samples, same arithmetic as fake_quant_int.
    x = samples.reshape(1, -1).float()
    s = torch.stack(scales).reshape(-1, 1)
    if template.spec.symmetric:
        off = integer.zero_offset(template.spec)
        xq = torch.clamp(torch.round(x / s), -off, off - 1) * s
    else:
        z = torch.stack(zeros).float().reshape(-1, 1)
        xq = (torch.clamp(torch.round(x / s) + z, 0, (1 << template.spec.bits) - 1) - z) * s
    best = int((xq - x).abs().pow(p).mean(1).argmin())
    return scales[best], zeros[best]
