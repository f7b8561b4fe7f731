"""Hub tensor names of a transformers model's weights, found with transformers' own conversion mapping.

transformers v5 fuses per-expert checkpoint tensors (e.g. Mixtral's `block_sparse_moe.experts.3.w1.weight`)
into 3-D parameters (`mlp.experts.gate_up_proj`) when loading, and `save_pretrained` splits them back.
quantkit keeps no copy of that family knowledge: it feeds *probe* tensors (every element holds its own
row number and column) through `revert_weight_conversion` and reads off which rows of which fused tensor
each hub tensor holds. Codes, scales and zero points are then sliced by the same rows. A conversion that
is not a pure row selection (a transpose, a sum) is refused, never guessed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantkit.errors import QuantkitError

_COL_BITS = 2**20  # probe value = global_row * 2^20 + column; exact in float64 up to 2^53


@dataclass(frozen=True)
class HubSlice:
    """One hub tensor: rows `rows` (flattened over leading dims) of the model tensor `source`."""

    hub_name: str
    source: str
    rows: torch.Tensor  # int64 [R] indices into source.reshape(-1, K)


def hub_slices(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, list[HubSlice]]:
    """For each model tensor name in `shapes` ([..., N, K]), the hub tensors made of its rows."""
    from transformers.core_model_loading import revert_weight_conversion

    offsets, probes, row = {}, {}, 0
    for name, shape in shapes.items():
        k = shape[-1]
        if k >= _COL_BITS:
            raise QuantkitError(f"{name}: input dimension {k} is too large for the hub-name probe")
        rows = 1
        for d in shape[:-1]:
            rows *= d
        ids = torch.arange(row, row + rows, dtype=torch.float64).unsqueeze(1) * _COL_BITS
        probes[name] = (ids + torch.arange(k, dtype=torch.float64)).reshape(shape)
        offsets[name] = (row, rows, k)
        row += rows
    if row * _COL_BITS >= 2**53:
        raise QuantkitError("model too large for the hub-name probe")
    reverted = revert_weight_conversion(model, dict(probes))
    out: dict[str, list[HubSlice]] = {n: [] for n in shapes}
    for hub, t in reverted.items():
        if t.dim() != 2:
            raise QuantkitError(f"hub tensor {hub} is {t.dim()}-D; compressed-tensors stores 2-D linear weights")
        t = t.to(torch.float64).reshape(-1, t.shape[-1])
        gid = torch.div(t[:, 0], _COL_BITS, rounding_mode="floor").long()
        src = [n for n, (start, cnt, _k) in offsets.items() if start <= int(gid[0]) < start + cnt]
        if not src:
            raise QuantkitError(f"hub tensor {hub} does not come from any quantized weight")
        name = src[0]
        start, cnt, k = offsets[name]
        expect = (gid.to(torch.float64).unsqueeze(1) * _COL_BITS + torch.arange(k, dtype=torch.float64))
        if (t.shape[-1] != k or bool((gid < start).any()) or bool((gid >= start + cnt).any())
                or not torch.equal(t, expect)):
            raise QuantkitError(f"transformers' conversion of {name} into {hub} is not a selection of whole "
                                "rows; it cannot be exported as quantized codes")
        out[name].append(HubSlice(hub, name, gid - start))
    for name, parts in out.items():
        covered = sum(len(p.rows) for p in parts)
        if covered != offsets[name][1]:
            raise QuantkitError(f"{name}: transformers' hub layout covers {covered} of its {offsets[name][1]} rows")
    return out
