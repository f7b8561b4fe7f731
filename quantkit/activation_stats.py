"""Activation statistics of a model's quantizable layers on calibration inputs: how outlier-heavy the
inputs are (max / median channel magnitude, kurtosis), the regime that decides what PTQ can do."""
from __future__ import annotations

from typing import Any, Callable

import torch

from quantkit.layers import is_quantizable


def _stats(x: torch.Tensor, channel_dim: int) -> dict[str, float]:
    x = x.detach().float().movedim(channel_dim, -1)
    flat = x.reshape(-1, x.shape[-1])
    ch = flat.abs().amax(0)  # [C] largest magnitude per channel
    v = flat.flatten()
    z = (v - v.mean()) / v.std().clamp(min=1e-12)
    return {"max": ch.max().item(), "median_channel_max": ch.median().item(),
            "max_over_median": (ch.max() / ch.median().clamp(min=1e-12)).item(),
            "kurtosis": (z**4).mean().item()}


@torch.no_grad()
def activation_stats(loaded: Any, calls: list, progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Per quantizable layer: statistics of its input, pooled over the calibration calls.
    `progress(done, total)` is called after each calibration call."""
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, m in loaded.root.named_modules():
        if name and is_quantizable(m):
            cdim = 1 if isinstance(m, torch.nn.Conv2d) else -1

            def hook(_m, args, kwargs, name=name, cdim=cdim):
                x = args[0] if args else next(iter(kwargs.values()))
                # keep a bounded sample of rows so long calibrations stay cheap
                x = x.movedim(cdim, -1).reshape(-1, x.shape[cdim])
                inputs.setdefault(name, []).append(x[: 4096].cpu())

            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        for i, c in enumerate(calls):
            loaded.root(*c.args, **c.kwargs)
            if progress:
                progress(i + 1, len(calls))
    finally:
        for h in handles:
            h.remove()
    rows = []
    for name, xs in inputs.items():
        s = _stats(torch.cat(xs), -1)
        rows.append({"layer": name, "role": loaded.adapter.role(name, loaded.root.get_submodule(name)), **s})
    return rows
