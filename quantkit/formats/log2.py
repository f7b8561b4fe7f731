"""Logarithmic quantizer for non-negative tensors such as attention probabilities (DGQ).

q = clamp(round(-log2(x / delta)), 0, 2^b - 1), x_hat = delta * 2^-q. x = 0 maps to the
largest code, i.e. delta * 2^-(2^b - 1), as in the formula (not to 0).
"""
from __future__ import annotations

import torch


def quantize_log2(x: torch.Tensor, delta: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Codes (uint8) of x >= 0 for scale `delta` (broadcastable to x)."""
    d = torch.as_tensor(delta, dtype=torch.float32, device=x.device)
    ratio = (x.float() / d).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(-torch.log2(ratio)).clamp(0, (1 << bits) - 1)
    return q.to(torch.uint8)


def dequantize_log2(codes: torch.Tensor, delta: torch.Tensor | float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    d = torch.as_tensor(delta, dtype=torch.float32, device=codes.device)
    return (d * torch.exp2(-codes.float())).to(dtype)


def fake_quant_log2(x: torch.Tensor, bits: int, delta: torch.Tensor | float | None = None) -> torch.Tensor:
    """Quantize-dequantize with delta = max(x) unless given."""
    if delta is None:
        delta = x.detach().amax().clamp(min=torch.finfo(torch.float32).tiny)
    return dequantize_log2(quantize_log2(x, delta, bits), delta, x.dtype)
