"""QuantExperts forward with static shapes, for torch.compile(fullgraph=True).

The eager reference gathers each hit expert's tokens (`torch.unique`, `torch.where`: host syncs and
data-dependent shapes). Here every expert runs on every token and each token keeps only its routed
experts' outputs, through a [T, E] routing-weight matrix that is zero elsewhere. Per token this adds the
same products in the same (ascending expert) order as the reference; the cost is E/k times the routed
FLOPs, which is why eager mode keeps the gather path.
"""
from __future__ import annotations

import torch
from torch import nn

from quantkit.quantizers.online_rotation import expert_mlp


def static_experts_forward(m: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """sum_k w_k * down_e(act(gate_e(x)) * up_e(x)) for x [T, H]; same contract as qexperts_reference."""
    n_experts = m.num_experts
    experts = torch.arange(n_experts, device=top_k_index.device)
    hit = top_k_index.unsqueeze(-1) == experts  # [T, k, E]; index E (masked-out slots) matches none
    routing = (hit.to(top_k_weights.dtype) * top_k_weights.unsqueeze(-1)).sum(dim=1)  # [T, E]
    chosen = hit.any(dim=1)  # [T, E]
    w_gu = m.gate_up.dequantize(hidden.dtype)  # [E, 2I, H]
    w_dn = m.down.dequantize(hidden.dtype)  # [E, H, I]
    out = torch.zeros_like(hidden)
    for e in range(n_experts):
        x = hidden
        y = expert_mlp(m, x, e, w_gu[e], w_dn[e]) * routing[:, e, None]
        # where, not a multiply by 0: an unrouted token's inf/nan must not leak into its output
        out = out + torch.where(chosen[:, e, None], y, torch.zeros_like(y)).to(out.dtype)
    return out
