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

With `rows_only` (a streamed walk, whose writer takes each rank's rows, see `write_rows`), the quantized
experts stay split too: a rank fills only its experts' rows of every per-expert tensor (codes, scales,
zero points, biases, rotations; the other rows are allocated but never written, so never resident), its
quantized forward computes only those experts (combined as QuantExperts' own loop: index_add_ in expert
order, each expert's tokens in token order), and at the block's write each rank puts its rows into the
output shard at their offsets.
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
            if impl == "token_major":  # QuantExperts' loop (kernels/reference.py): where(top_k_index == e)
                token, slot = torch.where(top_k_index == e)
            else:
                slot, token = torch.where(top_k_index.T == e)  # the eager loop's where(expert_mask[e]) order
            out[e] = token * k + slot
    return out


def expert_rows(module: nn.Module) -> dict[str, torch.Tensor]:
    """A QuantExperts' tensors that hold one row per expert (codes, scales, zero points, biases, per-expert
    rotations), by their names in the module's state dict; activation quantizers' tensors are not."""
    n = module.num_experts
    out = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if name.startswith(("act_in.", "act_mid.")) or t.dim() == 0 or t.shape[0] != n:
            continue
        out[name] = t
    return out


def fill_rows(rows: list[torch.Tensor | None]) -> torch.Tensor:
    """[E, *row] with the given rows written and the missing ones (other ranks' experts) left unwritten."""
    like = next(r for r in rows if r is not None)
    out = torch.empty((len(rows), *like.shape), dtype=like.dtype, device=like.device)
    for e, r in enumerate(rows):
        if r is not None:
            out[e] = r
    return out


class ExpertShard:
    """This rank's experts of every fused experts module: which it owns, its forwards, the reductions."""

    def __init__(self, share: Any, modules: list[nn.Module], rows_only: bool = False) -> None:
        self.share = share  # quantkit.distributed.RankShare
        self.modules = modules
        self.rows_only = rows_only  # quantized experts keep only this rank's rows (see the module docstring)
        self._adopted: list[nn.Module] = []

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
            for m in self.modules + self._adopted:
                m.__dict__.pop("forward", None)
            self._adopted = []

    def adopt(self, q: nn.Module) -> None:
        """A QuantExperts holding only this rank's rows: its forwards compute this rank's experts (per expert,
        never a dense copy of every expert) and exchange the outputs, until `forwards` ends."""
        q.cache_dequantized = False
        q.forward = _SplitForward(q, type(q).forward.__get__(q), "token_major", self)
        self._adopted.append(q)

    def held(self, module: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """A module's tensors as this rank holds them: of an adopted QuantExperts' per-expert tensors, only its
        rows (the others are unwritten memory)."""
        rows = expert_rows(module) if module in self._adopted else {}
        out = []
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if name in rows:
                out += [(f"{name}[{e}]", t[e]) for e in range(t.shape[0]) if self.owns(e)]
            else:
                out.append((name, t))
        return out

    def split_keys(self, module: nn.Module, prefix: str) -> dict[str, int]:
        """State-dict keys (under `prefix`) of the per-expert tensors of `module`'s adopted QuantExperts, each
        with its number of rows: the tensors whose rows the ranks write themselves (write_rows)."""
        out = {}
        for name, m in module.named_modules(prefix=prefix.rstrip(".")):
            if m in self._adopted:
                out.update({f"{name}.{k}": m.num_experts for k in expert_rows(m)})
        return out

    def write_rows(self, where: dict[str, tuple[str, int]] | None, state: dict[str, torch.Tensor]) -> None:
        """Every rank's rows of the split tensors into the output file, each at its offset. The main rank
        (whose writer laid out the file and wrote its own rows) passes `where` (key -> (file, byte offset of
        the tensor)); the others receive it. Returns once every rank's rows are in the file."""
        where = self.share.broadcast_object(where)
        if not self.share.is_main:
            for key, (path, offset) in where.items():
                t = state[key].detach()
                row = t[0].numel() * t.element_size()
                with open(path, "r+b") as f:
                    for e in range(t.shape[0]):
                        if self.owns(e):
                            f.seek(offset + e * row)
                            f.write(memoryview(t[e].contiguous().reshape(-1).view(torch.uint8).numpy()))
        self.share.barrier()


class _SplitForward:
    """The forward of one experts module on one rank (see the module docstring)."""

    def __init__(self, module: nn.Module, own_forward: Callable, impl: str, shard: ExpertShard) -> None:
        self.module, self.own_forward, self.impl, self.shard = module, own_forward, impl, shard

    @torch.no_grad()
    def __call__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:  # [T, H]
        m = self.module
        quantized = self.impl == "token_major"  # (a QuantExperts: its output is always in the input's dtype)
        if not quantized and m.gate_up_proj.dtype != hidden_states.dtype:
            # (a sub-call returns its output cast to the input dtype; the whole call keeps the weights' dtype)
            raise QuantkitError(f"experts split across ranks need inputs in the weights' dtype ({m.gate_up_proj.dtype}), "
                                f"got {hidden_states.dtype}")
        t, k = top_k_index.shape
        pairs = pairs_by_expert(top_k_index, m.num_experts if quantized else m.gate_up_proj.shape[0], self.impl)
        mine = {}
        for e, flat in pairs.items():
            if self.shard.owns(e):
                tok = flat // k
                # routing weight 1 (exact): the expert's own output; the weight is applied below, in the dtype
                # the whole call multiplies in (fp32 routing weights promote the product)
                ones = torch.ones(len(tok), 1, dtype=hidden_states.dtype, device=hidden_states.device)
                mine[e] = self.own_forward(hidden_states[tok], torch.full_like(top_k_index[:1, :1], e).expand(len(tok), 1),
                                           ones)  # [n_e, H]
        outs = self.shard.share.exchange(mine, {e: len(flat) for e, flat in pairs.items()}, hidden_states[:0])
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
