"""Shared checks of the interpreted kernel tests."""
from __future__ import annotations

import torch

# fp16 outputs against an fp16 reference differ by output rounding and accumulation order:
# a relative Frobenius error of 2e-3 is ~8x the fp16 half-ulp, far below any real bug.
HALF_TOL = 2e-3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of a against b (NaN anywhere fails every comparison)."""
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()
