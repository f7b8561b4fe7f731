"""Method interface and registry. A method quantizes one block at a time given its calibration inputs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from quantkit.adapters.base import CallArgs
from quantkit.config import Recipe
from quantkit.errors import QuantkitError
from quantkit.layers import LayerTask

METHODS: dict[str, type["Method"]] = {}


def register(name: str) -> Callable[[type["Method"]], type["Method"]]:
    def deco(cls: type["Method"]) -> type["Method"]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def get_method(name: str, recipe: Recipe) -> "Method":
    import difflib

    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise QuantkitError(f"unknown method {name!r}{hint}; allowed: {', '.join(sorted(METHODS))}")
    return METHODS[name](recipe)


@dataclass
class BlockContext:
    """One block of the walk: its layers, its cached inputs, and a way to run it."""

    name: str
    block: nn.Module
    tasks: list[LayerTask]
    inputs: list[CallArgs] | None
    root: nn.Module
    stats: dict[str, Any] = field(default_factory=dict)
    calls: list[CallArgs] | None = None  # the root-level calibration calls the inputs came from
    progress: Callable[[str, int, int], None] | None = None  # (what, done, total) for long per-block work
    work_dir: Path | None = None  # where a method may keep per-block progress to resume a killed run
    # The block's inputs in the full-precision model (methods with needs_fp_inputs), aligned with `inputs`.
    fp_inputs: list[CallArgs] | None = None

    def local_name(self, task: LayerTask) -> str:
        return task.name[len(self.name) + 1:] if self.name else task.name

    @torch.no_grad()
    def run(self) -> list[Any]:
        """Run the block (as it is now) on every cached input."""
        return [self.block(*c.args, **c.kwargs) for c in (self.inputs or [])]


class Method:
    """Base class: subclasses implement `quantize_block` (and may need calibration)."""

    name = "base"
    default_calib_steps = 10  # sampler steps recorded per calibration prompt when none are asked for
    # The walk keeps each finished block for a killed run to resume (quantkit.walk_resume). Methods that
    # hold a full-precision copy of the root taken at their first block cannot start mid-walk.
    walk_resume = True
    # Blocks may be materialized one at a time from the source files (quantkit.streaming); methods that
    # run a full-precision copy of the whole root cannot.
    supports_streaming = True
    # The walk also carries the calls through the full-precision blocks and hands each block its FP
    # inputs (ctx.fp_inputs), for methods that reconstruct towards the FP block's output.
    needs_fp_inputs = False
    # Under torchrun a calibrated walk may split each MoE layer's per-expert work across ranks, or the
    # calibration calls with the statistics reduced (quantkit.distributed.RankShare, set as `ranks` for
    # the walk); methods that do say which.
    expert_parallel = False
    data_parallel = False
    ranks: Any = None
    # With the expert split, each rank holds only its own experts (quantkit.expert_shard.ExpertShard, set
    # for the walk when every experts module of the model can be split): reductions over experts go through it.
    expert_shard: Any = None

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.options = dict(recipe.method_options)
        self.resumed_blocks: list[str] = []  # blocks reused from a killed run's progress folder
        defaults = self.option_defaults()
        if defaults is not None:
            from quantkit.methods.options import check_options

            check_options(self.name, self.options, defaults)

    @classmethod
    def option_defaults(cls) -> dict[str, Any] | None:
        """The method_options this method knows, with their defaults (None: the method checks them)."""
        return None

    def check_model(self, loaded: Any) -> None:
        """Raise QuantkitError before any work if this method cannot run on `loaded`."""

    def needs_calibration(self, tasks: list[LayerTask]) -> bool:
        return any(t.plan.activation is not None and not t.plan.activation.dynamic for t in tasks if not t.plan.skip)

    def build_calibration(self, loaded: Any, steps: int, prompts_file: str | None, text_file: str | None,
                          progress: Callable[[int], None] | None = None) -> list[CallArgs]:
        """Calibration calls when none were given (methods may select their own, e.g. EDA-DM's TDAC)."""
        from quantkit.calib.capture import calibration_calls

        return calibration_calls(loaded, self.recipe.calib_size, self.recipe.seed, steps, prompts_file, text_file,
                                 progress=progress)

    def quantize_block(self, ctx: BlockContext) -> dict[str, nn.Module]:
        """Return {layer full name: quantized module} for the block's non-skipped layers."""
        raise NotImplementedError

    def checkpoint_extras(self) -> dict[str, Any]:
        """Top-level quantization.json entries beyond the layers (e.g. DGQ's attention quantizers)."""
        return {}
