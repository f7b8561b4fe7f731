"""Initial weight quantization grids: min-max (= round-to-nearest) or an Lp-norm clipping search.

The search (Q-Diffusion / EDA-DM `perform_1D_search`, p = 2.4) shrinks each group's range by
1 - 0.01 i for i < 80 and keeps the candidate with the lowest sum |W - Q(W)|^p per group.
"""
from __future__ import annotations

import torch

from quantkit.errors import QuantkitError
from quantkit.formats import integer
from quantkit.formats.qweight import WEIGHT_SCALE_DTYPE
from quantkit.formats.spec import FormatSpec

WEIGHT_INITS = ("minmax", "mse")


def check_int_spec(spec: FormatSpec, what: str) -> None:
    if spec.kind != "int":
        raise QuantkitError(f"{what} needs an int weight format, got {spec.kind!r}; use method rtn for {spec.kind}")


def group_view(w2d: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """[N, K] -> [N, G, K/G]; [1, 1, N*K] for per-tensor (the layout of formats.integer)."""
    return integer._group_view(w2d, spec)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: FormatSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (fp16, as stored) and zero of a [lo, hi] range per group; same rules as integer.int_qparams."""
    if spec.symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / ((1 << (spec.bits - 1)) - 1)
    else:
        levels = (1 << spec.bits) - 1
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(WEIGHT_SCALE_DTYPE)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(WEIGHT_SCALE_DTYPE).tiny))
    zero = None
    if not spec.symmetric:
        zero = torch.round(-lo / scale.float()).clamp(0, (1 << spec.bits) - 1).to(torch.uint8)
    return scale, zero


@torch.no_grad()
def init_weight_grid(w2d: torch.Tensor, spec: FormatSpec, method: str = "minmax",
                     p: float = 2.4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale [N, G] fp16, zero [N, G] uint8 or None) for weight `w2d` [N, K]."""
    check_int_spec(spec, "learnable rounding")
    if method not in WEIGHT_INITS:
        raise QuantkitError(f"unknown weight_init {method!r}; allowed: {', '.join(WEIGHT_INITS)}")
    if method == "minmax":
        return integer.int_qparams(w2d, spec, WEIGHT_SCALE_DTYPE)
    wg = group_view(w2d.float(), spec)  # [N, G, K/G]
    lo0, hi0 = wg.amin(-1), wg.amax(-1)
    best_err = torch.full_like(lo0, float("inf"))
    best_scale, best_zero = qparams_from_range(lo0, hi0, spec)
    lo_q, hi_q = code_bounds(spec)
    for i in range(80):
        r = 1.0 - 0.01 * i
        scale, zero = qparams_from_range(lo0 * r, hi0 * r, spec)
        s = scale.float().unsqueeze(-1)
        z = zero.float().unsqueeze(-1) if zero is not None else 0.0
        # same arithmetic as integer.quantize_int_with / dequantize_int
        wq = (torch.clamp(torch.round(wg / s) + z, lo_q, hi_q) - z) * s
        err = (wq - wg).abs().pow(p).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def code_bounds(spec: FormatSpec) -> tuple[int, int]:
    """Range of round(x / s) (+ zero) before storage: signed for symmetric, unsigned for asymmetric."""
    if spec.symmetric:
        off = integer.zero_offset(spec)
        return -off, off - 1
    return 0, (1 << spec.bits) - 1
