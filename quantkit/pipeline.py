"""The block-by-block walk: capture a block's inputs on calibration data, let the method quantize
it, swap its layers, move on. Later blocks are captured through the already quantized ones, so
each block sees quantized inputs; only one block's inputs are held at a time."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from quantkit.adapters.base import CallArgs
from quantkit.calib.capture import _detach
from quantkit.config import Recipe
from quantkit.errors import QuantkitError
from quantkit.layers import LayerTask, layer_record, plan_layers, set_submodule
from quantkit.methods import BlockContext, get_method
from quantkit.models import LoadedModel
from quantkit.nn import QuantExperts
from quantkit.numeric_guard import check_inputs_finite, check_module_finite
from quantkit.quantizers.step_clock import install_step_clock

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass
class QuantizationResult:
    layers: dict[str, dict[str, Any]]  # quantized layer name -> record (see layers.layer_record)
    skipped: dict[str, str]  # layer kept in full precision -> its role
    calibration: dict[str, Any]
    seconds: float
    blocks: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)  # method records for quantization.json (e.g. attention)


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the block is needed."""


@torch.no_grad()
def capture_block_inputs(root: nn.Module, block: nn.Module, calls: list[CallArgs]) -> list[CallArgs]:
    """The arguments `block` receives for each calibration call of `root`."""
    captured: list[CallArgs] = []

    def hook(_mod, args, kwargs):
        captured.append(CallArgs(_detach(tuple(args)), _detach(dict(kwargs))))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for c in calls:
            n = len(captured)
            try:
                root(*c.args, **c.kwargs)
            except _StopForward:
                pass
            if len(captured) == n:
                log.debug("block not reached by one calibration call")
    finally:
        handle.remove()
    return captured


def _owner(name: str, block_names: list[str]) -> str:
    for b in block_names:
        if name == b or name.startswith(b + "."):
            return b
    return ""


def check_plan(loaded: LoadedModel, recipe: Recipe) -> list[LayerTask]:
    """Validate the recipe against the model before any work: method, group sizes, expert layouts."""
    get_method(recipe.method, recipe).check_model(loaded)
    tasks = plan_layers(loaded.root, loaded.adapter, recipe)
    if all(t.plan.skip for t in tasks):
        raise QuantkitError("the recipe quantizes no layer of this model (every layer is skipped)")
    return tasks


def quantize_model(loaded: LoadedModel, recipe: Recipe, *, calib_prompts: str | None = None,
                   calib_text: str | None = None, calib_steps: int | None = None, calls: list[CallArgs] | None = None,
                   progress: Progress | None = None, work_dir: str | Path | None = None) -> QuantizationResult:
    """Quantize `loaded.root` in place by `recipe`; returns what was done."""
    t0 = time.time()
    root, adapter = loaded.root, loaded.adapter
    method = get_method(recipe.method, recipe)
    tasks = check_plan(loaded, recipe)
    todo = [t for t in tasks if not t.plan.skip]
    calibration: dict[str, Any] = {"used": False}
    if calib_steps is None:
        calib_steps = method.default_calib_steps
    if calib_steps < 1:
        raise QuantkitError(f"calibration steps must be at least 1, got {calib_steps}")
    if calls is None and method.needs_calibration(todo):
        sampled = [0]

        def tick(k: int) -> None:
            sampled[0] += k
            if progress:
                progress("calibration sampling", sampled[0], recipe.calib_size)

        calls = method.build_calibration(loaded, calib_steps, calib_prompts, calib_text, progress=tick)
    if calls is not None:
        calibration = {"used": True, "calls": len(calls), "size": recipe.calib_size, "seed": recipe.seed,
                       "steps": calib_steps if loaded.is_pipeline else None,
                       "prompts": calib_prompts or ("builtin" if loaded.is_pipeline else None),
                       "text": calib_text or ("builtin" if adapter.kind == "lm" else None)}
        if getattr(method, "selection_provenance", None):  # e.g. EDA-DM's TDAC allocation
            calibration["selection"] = method.selection_provenance
    blocks = adapter.blocks(root)
    block_names = [n for n, _ in blocks]
    by_block: dict[str, list[LayerTask]] = {}
    for t in tasks:
        by_block.setdefault(_owner(t.name, block_names), []).append(t)
    units = [(n, b) for n, b in blocks if any(not t.plan.skip for t in by_block.get(n, []))]
    if any(not t.plan.skip for t in by_block.get("", [])):
        units.append(("", root))  # layers outside every block (e.g. a DiT's final projection)
    done: dict[str, nn.Module] = {}
    for i, (bname, block) in enumerate(units):
        if progress:
            progress(bname or "(outside blocks)", i, len(units))
        inputs = None
        if calls is not None:
            inputs = calls if block is root else capture_block_inputs(root, block, calls)
            check_inputs_finite(inputs, f"block {bname or '(root)'}")
        ctx = BlockContext(bname, block, by_block.get(bname, []), inputs, root, calls=calls, progress=progress,
                           work_dir=Path(work_dir) if work_dir is not None else None)
        for name, qmodule in method.quantize_block(ctx).items():
            check_module_finite(name, qmodule)
            set_submodule(root, name, qmodule)
            done[name] = qmodule
        log.info("quantized %s (%d layers)", bname or "layers outside blocks", len(ctx.tasks))
    if progress:
        progress("done", len(units), len(units))
    _verify(root, todo, done)
    install_step_clock(root)  # timestep-aware quantizers (DGQ) follow the sampler from now on
    if method.resumed_blocks:
        calibration["resumed_blocks"] = len(method.resumed_blocks)
    layers = {t.name: layer_record(t, done[t.name]) for t in todo}
    skipped = {t.name: t.role for t in tasks if t.plan.skip}
    return QuantizationResult(layers, skipped, calibration, time.time() - t0, [n for n, _ in units],
                              method.checkpoint_extras())


def _verify(root: nn.Module, todo: list[LayerTask], done: dict[str, nn.Module]) -> None:
    """Every planned layer was replaced; no fused expert weight was left behind silently."""
    missing = [t.name for t in todo if t.name not in done]
    if missing:
        raise QuantkitError(f"{len(missing)} planned layers were not quantized, e.g. {missing[0]}")
    planned_experts = {t.name for t in todo if t.kind == "experts"}
    for name, m in root.named_modules():
        if name in planned_experts and not isinstance(m, QuantExperts):
            raise QuantkitError(f"expert weights of {name} were left unquantized")
