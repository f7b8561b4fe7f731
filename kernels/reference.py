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


def gate_and_up(gu: torch.Tensor, act_fn: ActFn, gate_fn: ActFn | None = None) -> torch.Tensor:
    """[S, 2I] gate/up outputs -> [S, I]: gate_fn(gu), or act_fn(gate) * up of the chunked halves."""
    if gate_fn is not None:
        return gate_fn(gu)
    gate, up = gu.chunk(2, dim=-1)
    return act_fn(gate) * up


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
    gate_fn: ActFn | None = None,
) -> torch.Tensor:  # [T, H]
    """Routed SwiGLU-style experts: sum_k w_k * down_e(act(gate_e(x)) * up_e(x)).

    gate_fn: the layout's own [S, 2I] -> [S, I] step instead of act_fn(gate) * up (e.g. gpt-oss's
    interleaved, clamped gate)."""
    out = torch.zeros_like(hidden)
    n_experts = gate_up.shape[0]
    # Dequantize all experts once when the weights keep a dense copy (then repeated calls are free);
    # without one (a streamed calibration walk), only the experts this call reaches, one at a time.
    whole = gate_up.dense is not None or gate_up.cache is not None
    w_gu = gate_up.dequantize(hidden.dtype) if whole else None  # [E, 2I, H]
    w_dn = down.dequantize(hidden.dtype) if whole else None  # [E, H, I]
    hit = torch.unique(top_k_index)
    for e in hit.tolist():
        if not 0 <= e < n_experts:  # transformers marks masked-out slots with index E
            continue
        wg = w_gu[e] if whole else gate_up.select(e).dequantize(hidden.dtype)  # [2I, H]
        wd = w_dn[e] if whole else down.select(e).dequantize(hidden.dtype)  # [H, I]
        token_idx, slot = torch.where(top_k_index == e)
        x = hidden[token_idx]
        if act_in is not None:
            x = act_in(x)
        gu = F.linear(x, wg, None if gate_up_bias is None else gate_up_bias[e])
        h = gate_and_up(gu, act_fn, gate_fn)
        if act_mid is not None:
            h = act_mid(h)
        y = F.linear(h, wd, None if down_bias is None else down_bias[e])
        y = y * top_k_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out
