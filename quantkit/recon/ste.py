"""Straight-through estimators as autograd functions, so the forward value is exactly the quantized
value (x + (q - x).detach() can be off by an ulp, and what is trained must be what is shipped)."""
from __future__ import annotations

import torch


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.round(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return g


class _PassThrough(torch.autograd.Function):
    """Forward: `value`; backward: the gradient goes to `x` unchanged (identity Jacobian)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return value.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: D102
        return g, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round-half-to-even forward, identity backward."""
    return _RoundSTE.apply(x)


def pass_through(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` in the forward pass, d/dx = 1 in the backward pass."""
    return _PassThrough.apply(x, value.detach())


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the fp16 grid the stored scales use, identity backward."""
    return _PassThrough.apply(x, x.detach().half().float())
