"""Calibration samples for reconstruction: splitting recorded calls into single samples, batching
them again, QDrop-style mixing of quantized and full-precision inputs."""
from __future__ import annotations

from typing import Any

import torch

from quantkit.errors import QuantkitError
from quantkit.adapters.base import UNBATCHED_INPUTS, CallArgs, first_tensor


def _rows(call: CallArgs) -> int:
    """The batch size of a call: the leading size of its first tensor of rank >= 2."""
    for v in list(call.args) + list(call.kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim() >= 2:
            return v.shape[0]
    return 1


def _slice(v: Any, i: int, n: int) -> Any:
    if isinstance(v, torch.Tensor):
        return v[i:i + 1] if v.dim() >= 1 and v.shape[0] == n and n > 1 else v
    if isinstance(v, dict):
        return {k: _slice(x, i, n) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_slice(x, i, n) for x in v)
    return v


def call_row(call: CallArgs, j: int, n: int) -> CallArgs:
    """Row j of a call of n rows (keyword inputs that adapters declare unbatched are kept whole)."""
    return CallArgs(tuple(_slice(a, j, n) for a in call.args),
                    {k: v if k in UNBATCHED_INPUTS else _slice(v, j, n) for k, v in call.kwargs.items()})


def split_call(call: CallArgs, group: int = 1) -> list[CallArgs]:
    """Split a batched call into calls of `group` consecutive rows (tensors whose dim 0 is the batch)."""
    n = _rows(call)
    if n <= group:
        return [call]
    return [collate([call_row(call, j, n) for j in range(i, min(i + group, n))]) for i in range(0, n, group)]


def _shared(name: str, vals: list[Any]) -> Any:
    """An unbatched input of several calls: one table for all of them, or they cannot be batched."""
    v0 = vals[0]
    same = all(v is v0 or (isinstance(v, torch.Tensor) and v.shape == v0.shape and torch.equal(v, v0)) for v in vals)
    if not same:
        raise QuantkitError(f"calibration calls differ in their {name!r} (different image or text sizes?) "
                            "and cannot be batched together")
    return v0


def _cat(vals: list[Any], rows: list[int]) -> Any:
    """Concatenate one argument of several calls: tensors led by their call's batch size are batched; a tensor
    that is not (FLUX's rotary tables [L, d], position ids) and is equal in every call is kept once."""
    v0 = vals[0]
    if isinstance(v0, torch.Tensor):
        if v0.dim() == 0 or all(v is v0 for v in vals):
            return v0
        same_tail = all(v.dim() == v0.dim() and v.shape[1:] == v0.shape[1:] for v in vals)
        batched = same_tail and all(v.shape[0] == r for v, r in zip(vals, rows))
        if not batched and all(v.shape == v0.shape and torch.equal(v, v0) for v in vals):
            return v0
        if v0.dim() >= 1 and same_tail:
            return torch.cat(vals)
        return v0
    if isinstance(v0, dict):
        return {k: _cat([v[k] for v in vals], rows) for k in v0}
    if isinstance(v0, (list, tuple)):
        return type(v0)(_cat([v[i] for v in vals], rows) for i in range(len(v0)))
    return v0


def collate(calls: list[CallArgs]) -> CallArgs:
    """Concatenate calls along the batch (tensors that are equal in every call and not batched are kept once)."""
    if len(calls) == 1:
        return calls[0]
    rows = [_rows(c) for c in calls]
    return CallArgs(tuple(_cat([c.args[i] for c in calls], rows) for i in range(len(calls[0].args))),
                    {k: _shared(k, [c.kwargs[k] for c in calls]) if k in UNBATCHED_INPUTS
                     else _cat([c.kwargs[k] for c in calls], rows) for k in calls[0].kwargs})


def _mix(q: Any, fp: Any, prob: float, gen: torch.Generator | None) -> Any:
    if isinstance(q, torch.Tensor) and isinstance(fp, torch.Tensor) and q.is_floating_point() and q.shape == fp.shape:
        keep = torch.rand(q.shape, generator=gen, device="cpu").to(q.device) < prob
        return torch.where(keep, q, fp)
    if isinstance(q, dict):
        return {k: _mix(v, fp[k], prob, gen) for k, v in q.items()}
    if isinstance(q, (list, tuple)):
        return type(q)(_mix(a, b, prob, gen) for a, b in zip(q, fp))
    return q


def mix_inputs(q: CallArgs, fp: CallArgs, prob: float, gen: torch.Generator | None = None) -> CallArgs:
    """QDrop: each input element from the quantized model with probability `prob`, else the FP value."""
    if prob >= 1.0:
        return q
    if prob <= 0.0:
        return fp
    return CallArgs(tuple(_mix(a, b, prob, gen) for a, b in zip(q.args, fp.args)),
                    {k: _mix(v, fp.kwargs[k], prob, gen) for k, v in q.kwargs.items()})


def main_tensor(out: Any) -> torch.Tensor:
    """The tensor a block returns (blocks return a tensor, a tuple, or an output dataclass). A block that
    returns several streams (MMDiT: text and image hidden states) is compared on all of them: [B, sum of sizes]."""
    if isinstance(out, (tuple, list)):
        streams = [t for t in out if isinstance(t, torch.Tensor)]  # SD3's last block returns (None, hidden)
        if len(streams) == 1:
            return streams[0]
        b = streams[0].shape[0] if streams else 0
        if len(streams) > 1 and all(t.dim() >= 2 and t.shape[0] == b for t in streams):
            return torch.cat([t.reshape(b, -1) for t in streams], dim=1)
    return first_tensor(out, ("sample", "hidden_states"))
