"""EDA-DM (Liu et al., arXiv 2401.04585): TDAC calibration selection + fine-grained block
reconstruction (block loss + lambda_add * per-layer output losses) with AdaRound (or FlexRound),
LSQ activation steps and QDrop input mixing. One set of parameters for all timesteps.

`ReconMethod` is the shared driver of every block-reconstruction method (flexround reuses it).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from torch import nn

from quantkit.adapters.base import CallArgs
from quantkit.layers import LayerTask
from quantkit.methods.base import BlockContext, Method, register
from quantkit.methods.rtn import RTN
from quantkit.recon.engine import ReconConfig, reconstruct_block
from quantkit.recon.resume import BlockStore, fingerprint

log = logging.getLogger(__name__)

# Method options that are not reconstruction settings.
# lamda 5.0: the paper's text-to-image (MS-COCO SD) value; its run scripts use 1.2 for CIFAR-10 DDIM and
# LDM-4 ImageNet, 1.0 for LSUN (METHODS.md §1.4). With 1.0 the normalized density and diversity terms
# nearly cancel and the allocation is close to uniform.
SELECTION_OPTIONS = {"calib_selection": "eda-dm", "lamda": 5.0, "radius": None, "guidance_scale": None,
                     "trajectory_batch": 16}


class ReconMethod(Method):
    """Block by block: capture FP inputs from a full-precision copy of the model, reconstruct, ship."""

    recon_defaults: dict[str, Any] = {}
    needs_fp_inputs = True

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        from dataclasses import MISSING, fields

        base = {f.name: f.default for f in fields(ReconConfig) if f.default is not MISSING}
        return {**base, **SELECTION_OPTIONS, **cls.recon_defaults}

    def __init__(self, recipe) -> None:
        super().__init__(recipe)
        unknown = set(self.options) - set(ReconConfig.__dataclass_fields__) - set(SELECTION_OPTIONS)
        if unknown:
            from quantkit.errors import QuantkitError

            raise QuantkitError(f"unknown method_options {sorted(unknown)} for {self.name}; allowed: "
                                f"{', '.join(sorted(set(ReconConfig.__dataclass_fields__) | set(SELECTION_OPTIONS)))}")
        self.cfg = ReconConfig.from_options(self.options, **{"seed": recipe.seed, **self.recon_defaults})
        self.block_stats: dict[str, dict[str, float]] = {}

    def needs_calibration(self, tasks: list[LayerTask]) -> bool:
        return True

    def quantize_block(self, ctx: BlockContext) -> dict[str, nn.Module]:
        tasks = [t for t in ctx.tasks if not t.plan.skip]
        if ctx.inputs is None or ctx.calls is None or ctx.block is ctx.root:
            # Layers outside every block (rare; the default recipes skip them): calibrated RTN.
            log.info("%s: no block to reconstruct for %d layers outside blocks; using RTN", self.name, len(tasks))
            return RTN(self.recipe.replace(method="rtn", method_options={})).quantize_block(ctx)
        fp_calls = ctx.fp_inputs  # the block's inputs in the FP model, carried by the walk (needs_fp_inputs)
        if fp_calls is None:
            from quantkit.errors import QuantkitError

            raise QuantkitError(f"{self.name}: block {ctx.name} has no full-precision inputs")
        store = BlockStore(ctx.work_dir) if ctx.work_dir is not None else None
        fp = fingerprint(self.recipe.to_dict(), ctx.name, ctx.block, fp_calls) if store else ""
        if store is not None:
            cached = store.load(ctx.name, fp, tasks)
            if cached is not None:
                # a warning, so it shows without -v: this block's result comes from an earlier (killed) run
                log.warning("block %s: finished by an earlier run, reused from %s", ctx.name, ctx.work_dir)
                self.resumed_blocks.append(ctx.name)
                self.block_stats[ctx.name] = cached[1]
                return cached[0]
        result = reconstruct_block(ctx.name, ctx.block, tasks, ctx.inputs, fp_calls, self.cfg, ctx.progress)
        stats = {"loss_start": result.loss_start, "loss_end": result.loss_end}
        self.block_stats[ctx.name] = stats
        ctx.stats.update(stats)
        if store is not None:
            store.save(ctx.name, fp, result.modules, stats)
        return result.modules

    def checkpoint_extras(self) -> dict[str, Any]:
        """Per-block reconstruction loss before/after, recorded in quantization.json."""
        return {"reconstruction": dict(self.block_stats)} if self.block_stats else {}

    def build_calibration(self, loaded: Any, steps: int, prompts_file: str | None, text_file: str | None,
                          progress: Callable[[int], None] | None = None) -> list[CallArgs]:
        """EDA-DM selects its own samples (TDAC) when no calibration file is given."""
        selection = self.options.get("calib_selection", self.default_selection)
        if selection == "all" or not loaded.is_pipeline:
            return super().build_calibration(loaded, steps, prompts_file, text_file, progress)
        from quantkit.calib.calib_file import batch_items
        from quantkit.calib.selection import select_calibration
        from quantkit.calib.data_files import read_prompts

        opts = {**SELECTION_OPTIONS, **self.options}
        cs = select_calibration(loaded, selection, self.recipe.calib_size, self.recipe.seed, steps,
                                read_prompts(prompts_file), opts["guidance_scale"], float(opts["lamda"]),
                                opts["radius"], int(opts["trajectory_batch"]))
        self.selection_provenance = cs.provenance
        return batch_items(cs.items, self.cfg.batch_size)

    default_selection = "eda-dm"


@register("eda-dm")
class EDADM(ReconMethod):
    # Defaults: the official SD (MS-COCO) W4A8 run script scaled to the zoo (iters 1000 -> 200).
    recon_defaults = {"rounding": "adaround", "lambda_add": 0.8, "fbr_layers": "all", "input_prob": 0.5,
                      "act_drop_prob": 0.5, "weight_init": "mse", "act_init": "mse", "lr_w": 3e-2, "lr_a": 1e-4,
                      "iters": 200, "batch_size": 8, "round_reg": False}
