"""Pure-torch references of quantkit's kernels: same signatures and layouts as the Triton ones."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from quantkit.formats.qweight import QuantizedWeight
from quantkit.kernels.reference_act import rotate_blocks

ActFn = Callable[[torch.Tensor], torch.Tensor]


def qlinear_reference(
    x: torch.Tensor,  # [..., K]
    qweight: QuantizedWeight,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    act: ActFn | None = None,
    rotation: torch.Tensor | None = None,  # [32, 32] or [K/32, 32, 32]
) -> torch.Tensor:  # [..., N]
    """y = act(rotate(x)) @ dequant(W)^T + b, in x's dtype (rotation: block-diagonal, 32x32 blocks)."""
    if rotation is not None:
        x = rotate_blocks(x, rotation)
    if act is not None:
        x = act(x)
    return F.linear(x, qweight.dequantize(x.dtype), bias)


def qexperts_reference(
    hidden: torch.Tensor,  # [T, H]
    top_k_index: torch.Tensor,  # [T, k]
    top_k_weights: torch.Tensor,  # [T, k]
    gate_up: QuantizedWeight,  # [E, 2I, H]
    down: QuantizedWeight,  # [E, H, I]
    act_fn: ActFn,
    act_in: ActFn | None = None,
    act_mid: ActFn | None = None,
    gate_up_bias: torch.Tensor | None = None,  # [E, 2I]
    down_bias: torch.Tensor | None = None,  # [E, H]
) -> torch.Tensor:  # [T, H]
    """Routed SwiGLU-style experts: sum_k w_k * down_e(act(gate_e(x)) * up_e(x))."""
    out = torch.zeros_like(hidden)
    n_experts = gate_up.shape[0]
    # Dequantize all experts once (the weights' own cache makes repeated calls free).
    w_gu = gate_up.dequantize(hidden.dtype)  # [E, 2I, H]
    w_dn = down.dequantize(hidden.dtype)  # [E, H, I]
    hit = torch.unique(top_k_index)
    for e in hit.tolist():
        if not 0 <= e < n_experts:  # transformers marks masked-out slots with index E
            continue
        token_idx, slot = torch.where(top_k_index == e)
        x = hidden[token_idx]
        if act_in is not None:
            x = act_in(x)
        gu = F.linear(x, w_gu[e], None if gate_up_bias is None else gate_up_bias[e])
        gate, up = gu.chunk(2, dim=-1)
        h = act_fn(gate) * up
        if act_mid is not None:
            h = act_mid(h)
        y = F.linear(h, w_dn[e], None if down_bias is None else down_bias[e])
        y = y * top_k_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out
