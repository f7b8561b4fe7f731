"""A rank of the expert split (quantkit.distributed) that holds and runs only its own experts.

In the expert split every rank walks the same calibration calls. Here each rank also materializes only
its experts' slices of every fused experts tensor (the loader leaves the others unwritten, so their pages
are never resident) and computes only its experts in the block's forwards. Each forward then exchanges
the per-expert outputs and combines them exactly as the module's own implementation would:

- grouped_mm (transformers' default): pairs sorted by expert, one grouped matmul, outputs put back in
  pair order and summed over the top-k slots of each token;
- eager: one expert at a time in expert order, `index_add_` into the output.

A rank computes expert e by calling the module's own forward on e's pairs alone, in the order the full
call would have them, so the matmuls see the same rows in the same order (CPU kernels can round
differently when rows move), with routing weight 1; the routing weights are applied in the combine, in
the dtype the whole call multiplies in. What spans experts in smoothing (column maxima of the expert weights, the
per-expert requirements) is reduced with a maximum across ranks, which is exact in any order.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator

import torch
from torch import nn

from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)


def splittable_experts(root: nn.Module) -> tuple[list[nn.Module], str | None]:
    """The model's fused experts modules, and why they cannot be split by expert (None if they can)."""
    from quantkit.adapters.experts import expert_layout, expert_split_problem

    mods = [m for m in root.modules() if expert_layout(m) is not None]
    for m in mods:
        problem = expert_split_problem(m)
        if problem is not None:
            return mods, problem
    return mods, None


def pairs_by_expert(top_k_index: torch.Tensor, n_experts: int, impl: str) -> dict[int, torch.Tensor]:
    """expert -> its (token, slot) pairs as flat indices token * k + slot, in the order `impl` computes them."""
    if impl == "grouped_mm":
        ids, perm = torch.sort(top_k_index.reshape(-1))  # as the grouped forward sorts them
        return {e: perm[ids == e] for e in torch.unique(ids).tolist() if 0 <= e < n_experts}
    k = top_k_index.shape[-1]
    out = {}
    for e in torch.unique(top_k_index).tolist():
        if 0 <= e < n_experts:
            slot, token = torch.where(top_k_index.T == e)  # the eager loop's where(expert_mask[e]) order
            out[e] = token * k + slot
    return out


class ExpertShard:
    """This rank's experts of every fused experts module: which it owns, its forwards, the reductions."""

    def __init__(self, share: Any, modules: list[nn.Module]) -> None:
        self.share = share  # quantkit.distributed.RankShare
        self.modules = modules

    def owns(self, expert: int) -> bool:
        return self.share.owns(expert)

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum of `t` over the ranks (exact in any order)."""
        return self.share.reduce_max(t)

    def any_(self, flag: bool) -> bool:
        return not self.share.all(not flag)

    @contextlib.contextmanager
    def forwards(self) -> Iterator[None]:
        """While inside: every split module computes its own experts and exchanges the outputs."""
        from quantkit.adapters.experts import experts_implementation

        for m in self.modules:
            m.forward = _SplitForward(m, type(m).forward.__get__(m), experts_implementation(m), self)
        try:
            yield
        finally:
            for m in self.modules:
                m.__dict__.pop("forward", None)


class _SplitForward:
    """The forward of one experts module on one rank (see the module docstring)."""

    def __init__(self, module: nn.Module, own_forward: Callable, impl: str, shard: ExpertShard) -> None:
        self.module, self.own_forward, self.impl, self.shard = module, own_forward, impl, shard

    @torch.no_grad()
    def __call__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:  # [T, H]
        m = self.module
        if m.gate_up_proj.dtype != hidden_states.dtype:
            # (a sub-call returns its output cast to the input dtype; the whole call keeps the weights' dtype)
            raise QuantkitError(f"experts split across ranks need inputs in the weights' dtype ({m.gate_up_proj.dtype}), "
                                f"got {hidden_states.dtype}")
        t, k = top_k_index.shape
        pairs = pairs_by_expert(top_k_index, m.gate_up_proj.shape[0], self.impl)
        mine = {}
        for e, flat in pairs.items():
            if self.shard.owns(e):
                tok = flat // k
                # routing weight 1 (exact): the expert's own output; the weight is applied below, in the dtype
                # the whole call multiplies in (fp32 routing weights promote the product)
                ones = torch.ones(len(tok), 1, dtype=hidden_states.dtype, device=hidden_states.device)
                mine[e] = self.own_forward(hidden_states[tok], torch.full_like(top_k_index[:1, :1], e).expand(len(tok), 1),
                                           ones)  # [n_e, H]
        outs = self.shard.share.exchange(mine)
        missing = [e for e in pairs if e not in outs]
        if missing:
            raise QuantkitError(f"expert {missing[0]} was computed by no rank (the ranks disagree on the routing)")
        weighted = {e: outs[e] * top_k_weights[flat // k, flat % k][:, None] for e, flat in pairs.items()}
        h = hidden_states.shape[-1]
        if self.impl == "grouped_mm":
            dtype = next(iter(weighted.values())).dtype if weighted else hidden_states.dtype
            per_pair = hidden_states.new_zeros(t * k, h, dtype=dtype)
            for e, flat in pairs.items():
                per_pair[flat] = weighted[e]
            return per_pair.view(t, k, h).sum(dim=1).to(hidden_states.dtype)
        final = torch.zeros_like(hidden_states)
        for e in sorted(pairs):
            final.index_add_(0, pairs[e] // k, weighted[e].to(final.dtype))
        return final
