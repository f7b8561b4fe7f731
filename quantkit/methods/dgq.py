"""DGQ (Ryu et al., ICLR 2025; METHODS.md §2): distribution-aware group quantization of activations
and prompt-specific log quantization of attention, calibrated from statistics only.

Per block: weights first (round-to-nearest, or BRECQ/AdaRound block reconstruction with
`weight_recon: true`, the official SD v1.4 weight path), then every linear/conv input and the
attention Q, K, V and probabilities of the block's diffusers Attention modules are calibrated on the
block's inputs through the weight-quantized block, one parameter set per sampling step
(`timestep_aware`, on by default as in the official code).

method_options (defaults):
  attention: log        log | uniform | none   (attention-probability quantizer; none = FP attention)
  log_delta: prompt     prompt (per-sample run-time max) | calibrated (quantile search per step)
  per_batch_delta: false  true = the official code's one max over the whole batch
  start_token_fp: true  cross-attention start-token key and probability column stay FP
  timestep_aware: true
  calib_steps: 25       sampler steps per calibration prompt (the official SD setting; --calib-steps overrides)
  force_axis: null      channel | token (the code's IN_CHANNEL_WISE) | null = choose by spread
  weight_recon: false   true = BRECQ/AdaRound weights (recon_iters, recon_lr) before activation stats
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any, Callable

import torch
from torch import nn

from quantkit.adapters.base import CallArgs
from quantkit.errors import QuantkitError
from quantkit.layers import LayerTask, build_quantized, make_act, set_submodule
from quantkit.methods.base import BlockContext, Method, register
from quantkit.quantizers.step_clock import install_step_clock, timestep_value

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {"attention": "log", "log_delta": "prompt", "per_batch_delta": False,
                            "start_token_fp": True, "timestep_aware": True, "calib_steps": 25, "force_axis": None,
                            "weight_recon": False, "recon_iters": 200, "recon_lr": 1e-2}
CHOICES = {"attention": ("log", "uniform", "none"), "log_delta": ("prompt", "calibrated"),
           "force_axis": (None, "channel", "token")}


@register("dgq")
class DGQ(Method):
    @classmethod
    def option_defaults(cls) -> dict:
        return DEFAULTS

    def __init__(self, recipe) -> None:
        super().__init__(recipe)
        unknown = set(self.options) - set(DEFAULTS)
        if unknown:
            raise QuantkitError(f"unknown method_options {sorted(unknown)} for dgq; allowed: {', '.join(DEFAULTS)}")
        self.opts = {**DEFAULTS, **self.options}
        for k, allowed in CHOICES.items():
            if self.opts[k] not in allowed:
                raise QuantkitError(f"dgq option {k}={self.opts[k]!r}; allowed: {', '.join(map(str, allowed))}")
        act = recipe.activation
        if act is None or act.dynamic or act.groups is None:
            raise QuantkitError("dgq needs static activations with 'groups' (e.g. activation: {kind: int, bits: 6, "
                                "symmetric: false, granularity: tensor, dynamic: false, groups: 8})")
        self.default_calib_steps = int(self.opts["calib_steps"])
        self.attention_records: dict[str, dict[str, Any]] = {}
        self.recon_stats: dict[str, dict[str, float]] = {}
        self.needs_fp_inputs = bool(self.opts["weight_recon"])  # BRECQ targets: the FP block's outputs

    def check_model(self, loaded: Any) -> None:
        if not loaded.is_pipeline:
            raise QuantkitError("dgq calibrates on the sampler's steps: give a diffusers pipeline folder, "
                                f"not a bare {type(loaded.root).__name__}")
        if self.opts["attention"] != "none":
            from quantkit.adapters.diffusers_attention import uncovered_attention

            found = uncovered_attention(loaded.root)
            if found is not None:
                raise QuantkitError(f"dgq's attention quantizer does not cover {found[1]} ({found[0]}); use "
                                    "method_options {attention: none} to quantize the linear layers only")

    def needs_calibration(self, tasks: list[LayerTask]) -> bool:
        return True

    def build_calibration(self, loaded: Any, steps: int, prompts_file: str | None, text_file: str | None,
                          progress: Callable[[int], None] | None = None) -> list[CallArgs]:
        self.check_model(loaded)
        # Every step of the FP sampler on the calibration prompts (`--calib-steps`, else the recipe's calib_steps).
        return super().build_calibration(loaded, steps, prompts_file, text_file, progress)

    # ------------------------------------------------------------------------------------------
    def quantize_block(self, ctx: BlockContext) -> dict[str, nn.Module]:
        tasks = [t for t in ctx.tasks if not t.plan.skip]
        if ctx.inputs is None or ctx.calls is None:
            raise QuantkitError("dgq needs calibration inputs for every block")
        out = self._quantized_weights(ctx, tasks)
        quantizers: list[nn.Module] = []
        for t in tasks:
            if t.plan.activation is not None:
                out[t.name].act = self._configure(make_act(t.plan.activation, t.kind))
                quantizers.append(out[t.name].act)
        for name, q in out.items():  # the block runs with quantized weights while statistics are taken
            set_submodule(ctx.root, name, q)
        if self.opts["attention"] != "none" and ctx.block is not ctx.root:
            quantizers += self._install_attention(ctx)
        self._observe(ctx, quantizers)
        return out

    def _configure(self, q: nn.Module) -> nn.Module:
        q.timestep_aware = bool(self.opts["timestep_aware"])
        if hasattr(q, "force_axis"):
            q.force_axis = self.opts["force_axis"]
        q.observing = True
        return q

    def _quantized_weights(self, ctx: BlockContext, tasks: list[LayerTask]) -> dict[str, nn.Module]:
        """Weight-only quantized modules of the block (activation quantizers come after)."""
        wtasks = [dataclasses.replace(t, plan=dataclasses.replace(t.plan, activation=None)) for t in tasks]
        if not self.opts["weight_recon"] or ctx.block is ctx.root:
            return {t.name: build_quantized(t) for t in wtasks}
        from quantkit.recon.engine import ReconConfig, reconstruct_block

        # BRECQ / AdaRound as the official SD weight path: MSE init, rounding regularizer (weight
        # 0.01, warm-up 0.2, beta 20 -> 2), no activation quantization during weight reconstruction.
        cfg = ReconConfig(rounding="adaround", iters=int(self.opts["recon_iters"]), lr_w=float(self.opts["recon_lr"]),
                          input_prob=1.0, act_drop_prob=0.0, lambda_add=0.0, weight_init="mse",
                          learn_act_step=False, round_reg=True, round_reg_weight=0.01, seed=self.recipe.seed)
        fp_calls = ctx.fp_inputs  # carried through the FP blocks by the walk
        if fp_calls is None:
            raise QuantkitError(f"dgq: block {ctx.name} has no full-precision inputs")
        res = reconstruct_block(ctx.name, ctx.block, wtasks, ctx.inputs, fp_calls, cfg, ctx.progress)
        self.recon_stats[ctx.name] = {"loss_start": res.loss_start, "loss_end": res.loss_end}
        return res.modules

    def _install_attention(self, ctx: BlockContext) -> list[nn.Module]:
        from quantkit.adapters.diffusers_attention import attention_modules, install_processor

        act = self.recipe.activation
        quantizers = []
        for local, attn in attention_modules(ctx.block):
            cross = bool(getattr(attn, "is_cross_attention", False))
            record = {"cross": cross, "bits": act.format.bits, "groups": act.groups, "probs": self.opts["attention"],
                      "delta": self.opts["log_delta"], "per_batch_delta": bool(self.opts["per_batch_delta"]),
                      "start_token_fp": bool(self.opts["start_token_fp"]) and cross,
                      "timestep_aware": bool(self.opts["timestep_aware"])}
            proc = install_processor(attn, record)
            self.attention_records[f"{ctx.name}.{local}" if local else ctx.name] = record
            quantizers += [self._configure(q) for q in proc.quantizers()]
        return quantizers

    @torch.no_grad()
    def _observe(self, ctx: BlockContext, quantizers: list[nn.Module]) -> None:
        """Run the block on its calibration inputs, each at its call's timestep; then fix the ranges."""
        if len(ctx.inputs) != len(ctx.calls):
            raise QuantkitError(f"block {ctx.name}: {len(ctx.inputs)} inputs for {len(ctx.calls)} calibration calls")
        clock = install_step_clock(ctx.root)
        sig = inspect.signature(ctx.root.forward)
        for i, (inp, call) in enumerate(zip(ctx.inputs, ctx.calls)):
            if clock is not None and ctx.block is not ctx.root:
                clock.t = timestep_value(sig.bind_partial(*call.args, **call.kwargs).arguments.get("timestep"))
            ctx.block(*inp.args, **inp.kwargs)
            if ctx.progress and i % 8 == 0:
                ctx.progress(f"{ctx.name or '(outside blocks)'} statistics", i + 1, len(ctx.inputs))
        for q in quantizers:
            q.finalize()
            q.observing = False
        install_step_clock(ctx.root)

    def checkpoint_extras(self) -> dict[str, Any]:
        extras: dict[str, Any] = {"attention": dict(self.attention_records)} if self.attention_records else {}
        if self.recon_stats:
            extras["reconstruction"] = dict(self.recon_stats)
        return extras
