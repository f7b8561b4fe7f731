"""ModelAdapter: what a model family knows about where its blocks, experts and special layers are.

The pipeline asks an adapter four things about the module it quantizes (the "root": a UNet, a
DiT, a causal LM): its blocks, the role of each layer, which modules are fused 3-D experts, and
how to make calibration inputs for it. Nothing outside adapters/ knows a model family.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantkit.errors import QuantkitError


@dataclass
class CallArgs:
    """One call of the root module: root(*args, **kwargs)."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "CallArgs":
        mv = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return CallArgs(tuple(mv(a) for a in self.args), {k: mv(v) for k, v in self.kwargs.items()})


def is_fused_experts(module: nn.Module) -> bool:
    """A module that holds 3-D weight parameters directly (transformers' fused MoE experts)."""
    return any(p.dim() == 3 for p in module.parameters(recurse=False))


def supported_experts_layout(module: nn.Module) -> str | None:
    """None if `module` has the gate_up_proj [E, 2I, H] / down_proj [E, H, I] layout we quantize, else why not."""
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(dn, torch.Tensor):
        names = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
        return f"3-D parameters {names} are not the gate_up_proj/down_proj pair"
    if gu.dim() != 3 or dn.dim() != 3:
        return "gate_up_proj/down_proj are not 3-D"
    e, two_i, h = gu.shape
    if dn.shape != (e, h, two_i // 2) or two_i % 2:
        return f"shapes gate_up_proj {tuple(gu.shape)} / down_proj {tuple(dn.shape)} are not [E, 2I, H] / [E, H, I]"
    if not hasattr(module, "act_fn"):
        return "no act_fn attribute"
    return None


def first_tensor(out: Any, keys: tuple[str, ...]) -> torch.Tensor:
    """`out` itself, its first attribute among `keys` that is a tensor, or its first element (tuple outputs)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in keys:
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise QuantkitError(f"cannot find an output tensor in {type(out).__name__}")


class ModelAdapter:
    """Base adapter; subclasses override `matches`, `blocks`, `role` and the calibration hooks."""

    name = "base"
    kind = "model"  # "diffusion" or "lm"

    @classmethod
    def matches(cls, root: nn.Module) -> bool:
        raise NotImplementedError

    def blocks(self, root: nn.Module) -> list[tuple[str, nn.Module]]:
        """Blocks in execution order (the unit of the block-by-block walk)."""
        raise NotImplementedError

    def role(self, name: str, module: nn.Module) -> str:
        raise NotImplementedError

    def synthetic_inputs(self, root: nn.Module, n: int, seed: int) -> list[CallArgs]:
        """Inputs for a bare model with no sampler or tokenizer to drive it."""
        raise NotImplementedError

    def bottleneck_name(self, root: nn.Module) -> str:
        """The module whose input is the model's bottleneck feature (EDA-DM's TDAC scores it)."""
        raise QuantkitError(f"{self.name} has no bottleneck feature for calibration selection")

    def bottleneck(self, root: nn.Module) -> nn.Module:
        return root.get_submodule(self.bottleneck_name(root))

    def add_outliers(self, root: nn.Module, factor: float, channels: int, seed: int) -> dict:
        """Plant activation-outlier channels by a function-preserving edit; returns what was done."""
        raise QuantkitError(f"{self.name} has no outlier transformation")

    def output_tensor(self, out: Any) -> torch.Tensor:
        """The main tensor of a root forward's output (for comparisons)."""
        return first_tensor(out, ("sample", "logits", "last_hidden_state"))
