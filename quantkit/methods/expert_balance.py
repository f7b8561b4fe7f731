"""Expert-level calibration balance (EAQuant §3.3): which calibration tokens each expert is quantized on.

Natural routing first. An expert under its token target then gets, by `mode`:
- "more_data" (the paper's rule): tokens naturally routed to it in additional calibration samples
  (passed as `extra_index`, the routing of those samples' tokens), until it reaches the target or the
  extra samples run out;
- "force" (quantkit's own substitute): the calibration tokens its router scores highest among those
  not already routed to it (forced routing), until it reaches the target;
- "none": nothing.
An expert that still has no token is calibrated on the whole layer input. Everything is counted and
returned for quantization.json and the CLI, so no expert is skipped silently.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

BALANCE_MODES = ("more_data", "force", "none")


def token_target(top_k: int, num_experts: int, tokens_per_sample: int, ratio: float) -> int:
    """T = int(k/n * L * r) (the code's `seq_length * k/n * expert_token_num_ratio`)."""
    return int(top_k / num_experts * tokens_per_sample * ratio)


def select_expert_tokens(top_k_index: torch.Tensor, router_logits: torch.Tensor | None, num_experts: int,
                         target: int, mode: str = "force", seed: int = 0,
                         extra_index: torch.Tensor | None = None,
                         cap: bool = False) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Token indices each expert is calibrated on, and the counts.

    top_k_index [T, k] (natural routing; index E marks masked slots), router_logits [T, E] or None
    (then forced tokens are drawn in a seeded random order). extra_index [T2, k] ("more_data"): the
    routing of additional calibration tokens; their indices are T + j (into the concatenation of the
    layer input and the extra tokens). cap: an expert over target keeps only its first `target` routed
    tokens (the official code caches routed tokens until it has T of them)."""
    if mode not in BALANCE_MODES:
        raise ValueError(f"unknown expert balance {mode!r}; allowed: {', '.join(BALANCE_MODES)}")
    t = top_k_index.shape[0]
    gen = torch.Generator().manual_seed(seed)
    natural, used, forced, fallback, added, short = [], [], [], [], [], []
    for e in range(num_experts):
        routed = (top_k_index == e).any(dim=-1)
        sel = torch.where(routed)[0]
        natural.append(int(sel.numel()))
        if cap and target > 0:
            sel = sel[:target]
        n_added = 0
        if mode == "more_data" and extra_index is not None and sel.numel() < target:
            more = torch.where((extra_index == e).any(dim=-1))[0][: target - sel.numel()] + t
            n_added = int(more.numel())
            sel = torch.cat([sel, more])
        added.append(n_added)
        short.append(sel.numel() < target)
        if mode == "force" and sel.numel() < target and sel.numel() < t:
            if router_logits is not None:
                order = torch.argsort(router_logits[:, e].float(), descending=True, stable=True)
            else:
                order = torch.randperm(t, generator=gen)
            extra = order[~routed[order]][: target - sel.numel()]
            sel = torch.cat([sel, extra])
            forced.append(e)
        if sel.numel() == 0:
            sel = torch.arange(t)
            fallback.append(e)
        used.append(sel)
    info = {"expert_tokens": natural, "expert_tokens_used": [int(u.numel()) for u in used], "token_target": target,
            "balance": mode, "capped_at_target": cap, "under_target": [e for e, c in enumerate(natural) if c < target],
            "forced": forced, "layer_input_fallback": fallback}
    if mode == "more_data":
        info["extra_tokens_added"] = added
        info["extra_calibration_tokens"] = 0 if extra_index is None else int(extra_index.shape[0])
        info["still_under_target"] = [e for e, s in enumerate(short) if s]  # after the extra samples
    if fallback:
        log.warning("experts %s got no calibration token; calibrated on the whole layer input", fallback)
    return used, info
