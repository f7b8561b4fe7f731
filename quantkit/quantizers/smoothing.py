"""Smoothing scales folded into the norm before each decoder sub-layer (SmoothQuant; EAQuant §3.1).

For a norm with gain g whose output x feeds weights W_c (last dim = input channel), a vector s
turns g into g / s and every W_c into W_c * s (columns): x' = x / s, x' W'^T = x W^T for every
consumer, so the block's full-precision function is unchanged while the quantized inputs lose
their outlier channels. Which weights read which norm comes from the adapter (`norm_consumers`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantkit.adapters.base import is_fused_experts

log = logging.getLogger(__name__)

MERGES = ("max_gate", "max")


@dataclass
class NormGroup:
    """One norm and its consumers, sorted by kind."""

    norm: nn.Module
    router: list[torch.Tensor] = field(default_factory=list)  # [E, K] router weights
    experts: torch.Tensor | None = None  # fused gate_up_proj [E, 2I, K]
    experts_module: nn.Module | None = None
    others: list[torch.Tensor] = field(default_factory=list)  # attention inputs, shared experts, dense MLP

    def weights(self) -> list[torch.Tensor]:
        out = list(self.router) + list(self.others)
        return out + ([self.experts] if self.experts is not None else [])


def norm_groups(layer: nn.Module, adapter) -> list[NormGroup]:
    """The adapter's (norm, consumer weights) pairs, each weight classified by what it belongs to."""
    owner = {}
    for name, m in layer.named_modules():
        for p in m.parameters(recurse=False):
            owner[id(p)] = (name, m)
    groups = []
    for norm, weights in adapter.norm_consumers(layer):
        g = NormGroup(norm)
        for w in weights:
            name, m = owner.get(id(w), ("", None))
            if m is not None and is_fused_experts(m):
                g.experts, g.experts_module = w, m
            elif m is not None and adapter.role(name, m) == "router":
                g.router.append(w)
            else:
                g.others.append(w)
        groups.append(g)
    return groups


def _col_absmax(w: torch.Tensor) -> torch.Tensor:
    """max |W[..., j]| over everything but the input channel j."""
    return w.detach().abs().reshape(-1, w.shape[-1]).amax(dim=0).float()


def requirement(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|x_j|^alpha / max|W_j|^(1-alpha), clamped at 1e-5 as in the code."""
    return (act_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)


def smoothquant_scale(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """One requirement over all consumers together (SmoothQuant / DuQuant)."""
    w = torch.stack([_col_absmax(x) for x in weights]).amax(dim=0)
    return requirement(act_absmax, w, alpha)


def experts_col_absmax(w: torch.Tensor, shard: Any = None) -> torch.Tensor:
    """max |W[e, ..., j]| over every expert e; with a shard (quantkit.expert_shard), from each rank's own
    experts (the only ones it holds) and a maximum across ranks: the same numbers, in any order."""
    if shard is None:
        return _col_absmax(w)
    own = [_col_absmax(w[e]) for e in range(w.shape[0]) if shard.owns(e)]
    local = torch.stack(own).amax(dim=0) if own else torch.zeros(w.shape[-1], device=w.device)
    return shard.max_(local)


def group_smoothquant_scale(act_absmax: torch.Tensor, group: NormGroup, alpha: float,
                            shard: Any = None) -> torch.Tensor:
    """smoothquant_scale over a group's consumers, its experts read through `shard` (see experts_col_absmax)."""
    if shard is None or group.experts is None:
        return smoothquant_scale(act_absmax, group.weights(), alpha)
    cols = [_col_absmax(x) for x in list(group.router) + list(group.others)]
    cols.append(experts_col_absmax(group.experts, shard))
    return requirement(act_absmax, torch.stack(cols).amax(dim=0), alpha)


def eaquant_scale(group: NormGroup, act_absmax: torch.Tensor, expert_absmax: dict[int, torch.Tensor],
                  alpha: float, merge: str = "max_gate", shard: Any = None) -> torch.Tensor:
    """EAQuant's expert-aware aggregation (METHODS.md §3.1):

        s_j = max( s_router_j, max_i s^i_j ),  s^i_j = max|x^i_j|^a / max|W^i_j|^(1-a)

    x^i = only the tokens routed to expert i, W^i = its gate and up rows; the router term uses all
    tokens. merge 'max_gate' (default) is the paper's formula; 'max' is the official code's default,
    which multiplies the router term by 0. Experts that got no token put no requirement. With a shard
    (quantkit.expert_shard) each rank computes its own experts' terms and the maximum is taken across
    ranks (requirements are >= 1e-5, so a rank with none contributes zeros)."""
    if merge not in MERGES:
        raise ValueError(f"unknown smoothing merge {merge!r}; allowed: {', '.join(MERGES)}")
    terms = []
    if group.experts is not None:
        for e, amax in sorted(expert_absmax.items()):
            if shard is None or shard.owns(e):
                terms.append(requirement(amax, _col_absmax(group.experts[e]), alpha))
    if merge == "max_gate" and group.router:
        w = torch.stack([_col_absmax(x) for x in group.router]).amax(dim=0)
        terms.append(requirement(act_absmax, w, alpha))
    if shard is not None:
        local = torch.stack(terms).amax(dim=0) if terms else torch.zeros(act_absmax.shape[-1])
        if shard.any_(bool(terms)):
            return shard.max_(local)
        terms = []
    if not terms:  # no routed expert saw a token and no router term: fall back to SmoothQuant
        return group_smoothquant_scale(act_absmax, group, alpha, shard)
    return torch.stack(terms).amax(dim=0)


@torch.no_grad()
def fold_scale(group: NormGroup, s: torch.Tensor, shard: Any = None) -> None:
    """g / s into the norm (and its bias), every consumer's input columns * s (with a shard: the rank's
    own experts only, the slices it holds)."""
    norm = group.norm
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    for w in group.weights():
        if shard is not None and w is group.experts:
            for e in range(w.shape[0]):
                if shard.owns(e):
                    w[e].mul_(s.to(w.dtype))
        else:
            w.mul_(s.to(w.dtype))


class SmoothingStats:
    """Hooks that record, during block forwards, each norm output's per-channel abs max and, for
    fused experts, the per-channel abs max of the tokens routed to each expert."""

    def __init__(self, groups: list[NormGroup]) -> None:
        self.groups = groups
        self.act: dict[int, torch.Tensor] = {}
        self.expert: dict[int, dict[int, torch.Tensor]] = {}
        self._handles = []

    def __enter__(self) -> "SmoothingStats":
        for gi, g in enumerate(self.groups):
            self._handles.append(g.norm.register_forward_hook(self._norm_hook(gi)))
            if g.experts_module is not None:
                self._handles.append(g.experts_module.register_forward_pre_hook(self._experts_hook(gi), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def _norm_hook(self, gi: int):
        def hook(_m, _a, out):
            x = out[0] if isinstance(out, tuple) else out
            a = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            self.act[gi] = a if gi not in self.act else torch.maximum(self.act[gi], a)
        return hook

    def _experts_hook(self, gi: int):
        def hook(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
            store = self.expert.setdefault(gi, {})
            for e in torch.unique(idx).tolist():
                if not 0 <= e < self.groups[gi].experts.shape[0]:
                    continue
                tok = (idx == e).any(dim=-1)
                a = x[tok].detach().abs().amax(dim=0).float()
                store[e] = a if e not in store else torch.maximum(store[e], a)
        return hook
