"""The denoising step a timestep-aware quantizer is in: a forward pre-hook on the denoiser reads its
`timestep` argument, and every timestep-aware quantizer below it reads the clock (DGQ)."""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from quantkit.errors import QuantkitError


# Why fullgraph compilation stops at the clock (torch.compile without fullgraph runs it eagerly, then compiles on).
COMPILE_REFUSAL = ("quantkit: timestep-aware DGQ quantizers cannot be compiled with fullgraph=True: each denoiser call "
                   "picks its calibrated step (per-step group axis, group table and scales) in Python from the value of "
                   "the timestep tensor, a data-dependent choice one graph cannot hold; compile without fullgraph "
                   "(a graph break per denoiser call) or run eagerly")


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
        root.__dict__.pop("_quantkit_clock_fn", None)
        return None
    sig = inspect.signature(root.forward)
    if argument not in sig.parameters:
        raise QuantkitError(f"{type(root).__name__}.forward has no {argument!r} argument; timestep-aware "
                            "quantizers need the denoising step")
    clock = StepClock()

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_compiling():
            torch._dynamo.graph_break(msg=COMPILE_REFUSAL)  # fullgraph=True: an error carrying this message
        clock.t = timestep_value(sig.bind_partial(*args, **kwargs).arguments.get(argument))

    root._quantkit_clock_hook = root.register_forward_pre_hook(hook, with_kwargs=True)
    # Calibration calls interleave block by block (quantkit.propagate): the walk re-points the clock per call.
    root._quantkit_clock_fn = lambda args, kwargs: hook(root, args, kwargs)
    for m in modules:
        m.clock = clock
    return clock


def calibration_step(quantizer: nn.Module) -> float:
    """The timestep a calibrating quantizer files its statistics under (0.0 when not timestep-aware)."""
    if not quantizer.timestep_aware:
        return 0.0
    clock = quantizer.clock
    if clock is None or clock.t is None:
        raise QuantkitError("timestep-aware calibration needs the step clock set (install_step_clock)")
    return clock.t


def nearest_step(timesteps: list[float], clock: StepClock | None) -> int:
    """Index of the calibrated timestep nearest to the clock's (any sampler step count maps there)."""
    if len(timesteps) == 1:
        return 0
    if clock is None or clock.t is None:
        raise QuantkitError("timestep-aware quantizer called outside a denoiser call (no timestep; see install_step_clock)")
    return min(range(len(timesteps)), key=lambda i: abs(timesteps[i] - clock.t))


def take_buffer_shapes(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str) -> None:
    """Resize `module`'s own buffers to the checkpoint's tensors before loading (calibration-dependent shapes)."""
    for name, buf in module._buffers.items():
        if prefix + name in state_dict:
            t = state_dict[prefix + name]
            module._buffers[name] = torch.empty(t.shape, dtype=t.dtype, device=None if buf is None else buf.device)
