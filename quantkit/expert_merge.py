"""One copy instead of two when per-expert hub tensors become fused 3-D experts.

transformers 5 loads e.g. `experts.{e}.gate_proj.weight` and `experts.{e}.up_proj.weight` into one
`experts.gate_up_proj` [E, 2I, H] by stacking each list (a copy) and concatenating the stacks (a
second copy, with both stacks alive meanwhile). At real size that is a third of a block's load time
and ~2x its weights in transient memory. `single_copy_mapping` swaps that two-step chain for one op
that writes every expert's slice straight into the final tensor: the same values, one copy.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from quantkit.mapped_pages import release_pages

try:
    from transformers.core_model_loading import Concatenate, ConversionOps, MergeModulelist, WeightConverter
except ImportError:  # transformers missing or older than 5: nothing to swap
    ConversionOps = object  # type: ignore[assignment,misc]
    WeightConverter = None  # type: ignore[assignment,misc]


class MergeConcatInPlace(ConversionOps):  # type: ignore[misc,valid-type]
    """MergeModulelist(dim=0) then Concatenate(dim), as one preallocated copy.

    keep(e) False: expert e's slice is left unwritten (a rank of the expert split that holds only its own
    experts, quantkit.expert_shard): its pages are never touched, so never resident, and its source pages
    never read. The data pointers of such partial tensors are appended to `partial`."""

    def __init__(self, dim: int, chain: list[Any], keep: Callable[[int], bool] | None = None,
                 partial: list[int] | None = None) -> None:
        self.dim = dim
        self.chain = chain  # the ops it replaces, for the reverse (saving) direction
        self.keep = keep
        self.partial = partial if partial is not None else []

    def __deepcopy__(self, memo: dict) -> "MergeConcatInPlace":
        # transformers copies a model's converters per load; the copy must report into the loader's list
        return MergeConcatInPlace(self.dim, self.chain, self.keep, self.partial)

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str],
                **kwargs: Any) -> dict[str, torch.Tensor]:
        # Source patterns in their order (gate before up); each holds one 2-D tensor per expert, in order.
        lists = [input_dict.pop(p) for p in source_patterns if p in input_dict]
        first = lists[0][0]
        widths = [t[0].shape[self.dim - 1] for t in lists]
        shape = list(first.shape)
        shape[self.dim - 1] = sum(widths)
        out = torch.empty(len(lists[0]), *shape, dtype=first.dtype, device=first.device)  # [E, sum(widths), ...]
        start = 0
        for tensors, width in zip(lists, widths):
            part = out.narrow(self.dim, start, width)
            for e, t in enumerate(tensors):
                if self.keep is None or self.keep(e):
                    part[e].copy_(t)
                    release_pages(t)  # a view of the source file's map: its pages are not needed twice
            start += width
        del lists
        if self.keep is not None:
            self.partial.append(out.data_ptr())
        return {target_patterns[0]: out}

    @property
    def reverse_op(self) -> ConversionOps:  # type: ignore[valid-type]
        raise NotImplementedError("saving uses the model's own mapping")


def _is_stack_then_concat(ops: list[Any]) -> bool:
    return (len(ops) == 2 and type(ops[0]) is MergeModulelist and ops[0].dim == 0
            and type(ops[1]) is Concatenate and ops[1].dim >= 1)


def _is_stack(m: Any) -> bool:
    """One list of per-expert tensors stacked into one (e.g. down_proj): a concatenation of one part at dim 1."""
    ops = m.operations
    return (len(ops) == 1 and type(ops[0]) is MergeModulelist and ops[0].dim == 0
            and len(m._original_source_patterns) == 1 and len(m.target_patterns) == 1)


def single_copy_mapping(mapping: list[Any], keep: Callable[[int], bool] | None = None,
                        partial: list[int] | None = None) -> list[Any]:
    """`mapping` (transformers' weight conversions of a model) with stack-then-concatenate chains fused
    (keep, partial: see MergeConcatInPlace)."""
    if WeightConverter is None:
        return mapping
    out = []
    for m in mapping:
        if isinstance(m, WeightConverter) and _is_stack_then_concat(m.operations) and len(m.target_patterns) == 1:
            fused = m.copy(m._original_source_patterns, m._original_target_patterns,
                           operations=[MergeConcatInPlace(m.operations[1].dim, m.operations, keep, partial)])
            out.append(fused)
        elif keep is not None and isinstance(m, WeightConverter) and _is_stack(m):
            # (only for a rank that keeps some experts: transformers' own stack is one copy already)
            out.append(m.copy(m._original_source_patterns, m._original_target_patterns,
                              operations=[MergeConcatInPlace(1, m.operations, keep, partial)]))
        else:
            out.append(m)
    return out
