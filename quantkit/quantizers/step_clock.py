"""The denoising step a timestep-aware quantizer is in: a forward pre-hook on the denoiser reads its
`timestep` argument, and every timestep-aware quantizer below it reads the clock (DGQ)."""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from quantkit.errors import QuantkitError


class StepClock:
    """The timestep of the denoiser call in progress (None outside one)."""

    def __init__(self) -> None:
        self.t: float | None = None


def timestep_value(timestep: Any) -> float:
    """One timestep for the whole call; a batch mixing timesteps is an error (parameters are per step)."""
    if timestep is None:
        raise QuantkitError("the denoiser was called without a timestep; timestep-aware quantizers need one")
    t = torch.as_tensor(timestep).detach().flatten().float()
    if t.numel() == 0 or not torch.all(t == t[0]):
        raise QuantkitError(f"one denoiser call mixes timesteps {t.unique().tolist()[:4]}; timestep-aware "
                            "activation quantizers take one timestep per call")
    return float(t[0])


def timestep_aware_modules(root: nn.Module) -> list[nn.Module]:
    return [m for m in root.modules() if getattr(m, "needs_clock", False)]


def install_step_clock(root: nn.Module, argument: str = "timestep") -> StepClock | None:
    """Hook `root` so its timestep-aware quantizers know the step; None if it has none. Idempotent."""
    modules = timestep_aware_modules(root)
    old = getattr(root, "_quantkit_clock_hook", None)
    if old is not None:
        old.remove()
    if not modules:
        return None
    sig = inspect.signature(root.forward)
    if argument not in sig.parameters:
        raise QuantkitError(f"{type(root).__name__}.forward has no {argument!r} argument; timestep-aware "
                            "quantizers need the denoising step")
    clock = StepClock()

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        clock.t = timestep_value(sig.bind_partial(*args, **kwargs).arguments.get(argument))

    root._quantkit_clock_hook = root.register_forward_pre_hook(hook, with_kwargs=True)
    for m in modules:
        m.clock = clock
    return clock
