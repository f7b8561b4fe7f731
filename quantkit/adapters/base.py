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
    """An experts module with a gate/up + down pair (or an experts-like module of unknown layout, which
    planning then reports); decided by what the module is (adapters/experts.py), not by tensor rank."""
    from quantkit.adapters.experts import classify_experts

    c = classify_experts(module)
    return isinstance(c, str) or (c is not None and c.kind == "fused")


def is_parallel_experts(module: nn.Module) -> bool:
    """One [E, out, in] weight per projection, called with per-expert token counts (JetMoE)."""
    from quantkit.adapters.experts import classify_experts

    c = classify_experts(module)
    return c is not None and not isinstance(c, str) and c.kind == "parallel"


def supported_experts_layout(module: nn.Module) -> str | None:
    """None if quantkit can quantize this experts module, else why not."""
    from quantkit.adapters.experts import classify_experts

    c = classify_experts(module)
    return c if isinstance(c, str) else None


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


# Root-call keyword arguments whose first dimension is not the batch (FLUX's positional ids [L, 3]), from
# every adapter's `unbatched_inputs`: splitting and batching calibration calls must not cut them by rows,
# and a generic rule cannot tell [L, 3] from [B, 3] when the text length happens to equal the batch.
UNBATCHED_INPUTS: set[str] = set()


class ModelAdapter:
    """Base adapter; subclasses override `matches`, `blocks`, `role` and the calibration hooks."""

    name = "base"
    kind = "model"  # "diffusion" or "lm"
    unbatched_inputs: tuple[str, ...] = ()  # root kwargs shared by every row of a call (see UNBATCHED_INPUTS)
    # Whether parts outside the blocks run between blocks (a UNet's down- and up-samplers). When they do
    # not (a decoder stack: embeddings before the first block, final norm and head after the last), a
    # streamed calibration walk gives them back once the calls reach the first block.
    outside_between_blocks = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        UNBATCHED_INPUTS.update(cls.unbatched_inputs)

    @classmethod
    def matches(cls, root: nn.Module) -> bool:
        raise NotImplementedError

    def prepare(self, root: nn.Module) -> None:
        """Learn what the adapter needs from the whole model before `role` is asked (e.g. MoE structure)."""

    def check_recipe(self, recipe: Any) -> None:
        """Raise QuantkitError before any work if `recipe` cannot run on this family."""

    def blocks(self, root: nn.Module) -> list[tuple[str, nn.Module]]:
        """Blocks in execution order (the unit of the block-by-block walk)."""
        raise NotImplementedError

    def role(self, name: str, module: nn.Module) -> str:
        raise NotImplementedError

    def keep_full_precision(self, name: str) -> str | None:
        """Why layer `name` must stay in full precision whatever the recipe says (the model's own code
        reads its parameters, say), or None."""
        return None

    def synthetic_inputs(self, root: nn.Module, n: int, seed: int) -> list[CallArgs]:
        """Inputs for a bare model with no sampler or tokenizer to drive it."""
        raise NotImplementedError

    def sampling_kwargs(self, pipe: Any) -> dict[str, Any]:
        """Extra pipeline-call arguments for calibration sampling (e.g. a size cap); by default those the
        model's folder names in quantkit_eval.json's `pipeline_kwargs` (the size it was trained at, say)."""
        from quantkit.eval.profile import folder_pipeline_kwargs

        return folder_pipeline_kwargs(pipe)

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
