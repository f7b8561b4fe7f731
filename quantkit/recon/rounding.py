"""Learnable weight rounding on a fixed integer format: AdaRound and FlexRound.

Both start from a grid (scale, zero) of the recipe's int format and learn how each weight rounds.
`forward(hard=True)` computes exactly `export().dequantize()`: the stored codes and fp16 scales
are the weights that were trained and evaluated.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from quantkit.formats import integer
from quantkit.formats.qweight import WEIGHT_SCALE_DTYPE, QuantizedWeight
from quantkit.formats.spec import FormatSpec
from quantkit.recon.init import check_int_spec
from quantkit.recon.ste import fp16_ste, round_ste



def expand_groups(t: torch.Tensor, shape: tuple[int, int], spec: FormatSpec) -> torch.Tensor:
    """A per-group tensor [N, G] (or [1, 1] per tensor) broadcastable to the weight [N, K]."""
    if spec.granularity == "group":
        return t.repeat_interleave(shape[1] // t.shape[1], dim=1)
    return t


def code_range(spec: FormatSpec) -> tuple[int, int]:
    """Signed integer range of q (before the stored offset / zero point is added)."""
    if spec.symmetric:
        off = integer.zero_offset(spec)
        return -off, off - 1
    return 0, (1 << spec.bits) - 1


class LearnableRounding(nn.Module):
    """Shared parts: the frozen FP weight [N, K], the format, the integer zero point."""

    def __init__(self, w2d: torch.Tensor, spec: FormatSpec, zero: torch.Tensor | None) -> None:
        super().__init__()
        check_int_spec(spec, "learnable rounding")
        self.spec = spec
        self.register_buffer("weight", w2d.detach().float().clone())
        self.register_buffer("zero", zero)  # [N, G] uint8 (asymmetric) or None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def _offset(self) -> torch.Tensor | float:
        """The zero point broadcast to [N, K] (0 for symmetric formats: q is signed there)."""
        if self.zero is None:
            return 0.0
        return expand_groups(self.zero.float(), self.shape, self.spec)

    def _dequant(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """(clamp(q + z) - z) * scale, with q the (soft or hard) integer part before the zero point."""
        lo, hi = code_range(self.spec)
        z = self._offset()
        return (torch.clamp(q + z, lo, hi) - z) * expand_groups(scale, self.shape, self.spec)

    def _export(self, q: torch.Tensor, scale: torch.Tensor) -> QuantizedWeight:
        lo, hi = code_range(self.spec)
        z = self._offset()
        codes = torch.clamp(q + z, lo, hi)
        if self.spec.symmetric:
            codes = codes + integer.zero_offset(self.spec)
        return QuantizedWeight.from_codes(codes.to(torch.uint8), scale.to(WEIGHT_SCALE_DTYPE),
                                          None if self.zero is None else self.zero.clone(), self.spec)

    def reg_loss(self, frac_done: float) -> torch.Tensor:
        return self.weight.new_zeros(())

    def export(self) -> QuantizedWeight:
        raise NotImplementedError


class AdaRound(LearnableRounding):
    """W_hat = s * (clamp(floor(W/s) + h(alpha) + z) - z), h the rectified sigmoid (Nagel et al. 2020).

    Soft h while training, hard (alpha >= 0) at the end. The regularizer (sum 1 - |2h-1|^beta with
    beta annealed from 20 to 2 after a warm-up) is optional: EDA-DM's code trains without it.
    """

    ZETA, GAMMA = 1.1, -0.1

    def __init__(self, w2d: torch.Tensor, spec: FormatSpec, scale: torch.Tensor, zero: torch.Tensor | None,
                 reg_weight: float = 0.0, b_range: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2) -> None:
        super().__init__(w2d, spec, zero)
        self.register_buffer("scale", scale.detach().clone())  # fp16, fixed
        s = expand_groups(scale.float(), self.shape, spec)
        w_div = self.weight / s
        self.register_buffer("w_floor", torch.floor(w_div))
        rest = (w_div - self.w_floor).clamp(1e-4, 1 - 1e-4)
        # alpha such that h(alpha) = rest: the soft start is the FP weight itself.
        self.alpha = nn.Parameter(-torch.log((self.ZETA - self.GAMMA) / (rest - self.GAMMA) - 1))
        self.reg_weight, self.b_range, self.warmup = reg_weight, b_range, warmup

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (self.ZETA - self.GAMMA) + self.GAMMA, 0, 1)

    def forward(self, hard: bool = False) -> torch.Tensor:
        up = (self.alpha >= 0).float() if hard else self.h()
        return self._dequant(self.w_floor + up, self.scale.float())

    def reg_loss(self, frac_done: float) -> torch.Tensor:
        if self.reg_weight <= 0 or frac_done < self.warmup:
            return self.alpha.new_zeros(())
        start, end = self.b_range
        beta = end + (start - end) * (1 + math.cos(math.pi * (frac_done - self.warmup) / (1 - self.warmup))) / 2
        return self.reg_weight * (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def export(self) -> QuantizedWeight:
        return self._export(self.w_floor + (self.alpha >= 0).float(), self.scale)


class FlexRound(LearnableRounding):
    """W_hat = s1 * (clamp(round(W / (s1 * S2 * s3 * s4)) + z) - z) (Lee et al., ICML 2023).

    Learned in the log domain (as the official code): log s1 (the grid, one per scale group),
    log S2 (one per weight, init 0), log s3 (per output channel) and, as in the paper, log s4 (per
    input channel; the official LLM code has no s4: `use_s4=False`). s1 goes through the fp16
    rounding of the stored scale, so the trained grid is the shipped grid.
    """

    def __init__(self, w2d: torch.Tensor, spec: FormatSpec, scale: torch.Tensor, zero: torch.Tensor | None,
                 in_channels: int | None = None, use_s4: bool = True) -> None:
        super().__init__(w2d, spec, zero)
        n, k = self.shape
        self.log_s1 = nn.Parameter(torch.log(scale.detach().float()))
        self.log_s2 = nn.Parameter(torch.zeros(n, k))
        self.log_s3 = nn.Parameter(torch.zeros(n, 1))
        in_channels = in_channels or k
        self.kernel_elems = k // in_channels  # conv: the [O, I*kh*kw] layout repeats each in-channel kh*kw times
        self.log_s4 = nn.Parameter(torch.zeros(1, in_channels)) if use_s4 else None

    def s1(self) -> torch.Tensor:
        return fp16_ste(torch.exp(self.log_s1))

    def divisor(self) -> torch.Tensor:
        """s1 * S2 * s3 * s4, broadcast to [N, K]."""
        log_rest = self.log_s2 + self.log_s3
        if self.log_s4 is not None:
            log_rest = log_rest + self.log_s4.repeat_interleave(self.kernel_elems, dim=1)
        return expand_groups(self.s1(), self.shape, self.spec) * torch.exp(log_rest)

    def forward(self, hard: bool = False) -> torch.Tensor:
        return self._dequant(round_ste(self.weight / self.divisor()), self.s1())

    @torch.no_grad()
    def export(self) -> QuantizedWeight:
        return self._export(torch.round(self.weight / self.divisor()), self.s1())
