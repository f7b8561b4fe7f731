"""Finding quantizable layers, building their quantized replacements, and swapping them in."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantkit.adapters import ModelAdapter, is_fused_experts, is_parallel_experts, supported_experts_layout
from quantkit.adapters.experts import expert_layout
from quantkit.config import ActivationConfig, LayerPlan, Recipe
from quantkit.errors import QuantkitError
from quantkit.formats.qweight import QuantizedWeight
from quantkit.formats.spec import FormatSpec
from quantkit.nn import QuantConv2d, QuantExperts, QuantLinear
from quantkit.nn_experts import QuantParallelExperts, build_experts, empty_experts, reduction_sizes
from quantkit.quant_router import QuantRouter, is_router_module
from quantkit.quantizers.activation import ActQuantizer
from quantkit.quantizers.group_act import GroupActQuantizer
from quantkit.quantizers.online_rotation import attach_empty_rotations, rotation_records

log = logging.getLogger(__name__)

QUANT_MODULES = (QuantLinear, QuantConv2d, QuantExperts, QuantRouter, QuantParallelExperts)


@dataclass
class LayerTask:
    """One quantizable layer and what the recipe decided for it."""

    name: str  # full name in the root module
    module: nn.Module
    role: str
    plan: LayerPlan

    @property
    def kind(self) -> str:
        if self.role == "router" and is_router_module(self.module):
            return "router"
        if isinstance(self.module, nn.Linear):
            return "linear"
        if isinstance(self.module, nn.Conv2d):
            return "conv2d"
        if is_fused_experts(self.module):
            return "experts"
        if is_parallel_experts(self.module):
            return "expert_linear"
        return "embedding" if isinstance(self.module, nn.Embedding) else "router"


def is_quantizable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d)) or is_fused_experts(module) or is_parallel_experts(module)


def _full_precision_only(module: nn.Module, role: str) -> bool:
    """Layers quantkit reports but cannot quantize: embeddings and custom routers without a 2-D weight
    (routers with one are quantized as QuantRouter)."""
    if isinstance(module, nn.Embedding):
        return True
    return (role == "router" and not isinstance(module, nn.Linear)
            and isinstance(getattr(module, "weight", None), nn.Parameter) and not is_router_module(module))


def plan_layers(root: nn.Module, adapter: ModelAdapter, recipe: Recipe) -> list[LayerTask]:
    """Every quantizable layer of `root` with its plan; fails on an expert layout it cannot quantize."""
    adapter.check_recipe(recipe)
    tasks = []
    for name, module in root.named_modules():
        if isinstance(module, QUANT_MODULES):
            continue
        role = adapter.role(name, module) if name else "linear"
        if _full_precision_only(module, role):
            if not recipe.plan(name, role).skip:
                raise QuantkitError(f"{name} ({type(module).__name__}, role {role}) can only stay in full precision; "
                                    f"keep role {role!r} in skip_roles or add a rule {{name: {name}, skip: true}}")
            tasks.append(LayerTask(name, module, role, recipe.plan(name, role)))
            continue
        if not is_quantizable(module) and not (role == "router" and is_router_module(module)):
            continue
        role = adapter.role(name, module)
        plan = recipe.plan(name, role)
        why_fp = adapter.keep_full_precision(name)
        if why_fp is not None and not plan.skip:
            log.warning("%s stays in full precision although the recipe quantizes it: %s", name, why_fp)
            plan = dataclasses.replace(plan, skip=True)
        task = LayerTask(name, module, role, plan)
        if task.kind == "experts" and not plan.skip:
            why = supported_experts_layout(module)
            if why is not None:
                raise QuantkitError(
                    f"expert weights of {name} ({type(module).__name__}) cannot be quantized: {why}; "
                    f"add a rule {{name: {name}, skip: true}} to keep them in full precision explicitly"
                )
        if task.kind in ("experts", "expert_linear") and not plan.skip:
            _check_layout_method(name, module, recipe, plan)
        if not plan.skip:
            k = _reduction_sizes(task)
            w = plan.weight
            if (recipe.group_fallback == "channel" and w.kind == "int" and w.granularity == "group"
                    and any(kk % w.group_size for kk in k)):
                log.info("%s: group size %d does not divide %s; using per-channel scales", name, w.group_size, k)
                plan = task.plan = dataclasses.replace(
                    plan, weight=dataclasses.replace(w, granularity="channel", group_size=None))
            for kk in k:
                plan.weight.check_k(kk, name)
            if plan.activation is not None:
                for kk in k:
                    plan.activation.format.check_k(kk, f"the input of {name}")
        tasks.append(task)
    return tasks


def _reduction_sizes(task: LayerTask) -> list[int]:
    m = task.module
    if task.kind == "linear":
        return [m.in_features]
    if task.kind == "conv2d":
        return [m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]]
    if task.kind == "router":
        return [m.weight.shape[-1]]
    return reduction_sizes(m)


def _check_layout_method(name: str, module: nn.Module, recipe: Recipe, plan: LayerPlan) -> None:
    """Methods look inside standard experts ([E, 2I, H] / [E, H, I], chunked gate/up, routed call); other
    layouts take round-to-nearest weights with weight-only or dynamic activations, and say so otherwise."""
    lay = expert_layout(module)
    if lay is None or lay.standard:
        return
    static = plan.activation is not None and not plan.activation.dynamic
    if recipe.method != "rtn" or static:
        raise QuantkitError(
            f"method {recipe.method!r}{' with static activations' if static else ''} cannot quantize the experts of "
            f"{name} ({lay.describe()}); allowed for this layout: rtn with weight-only or dynamic activations")


def act_channel_dim(task_kind: str) -> int:
    return 1 if task_kind == "conv2d" else -1


def make_act(cfg: ActivationConfig | None, kind: str) -> nn.Module | None:
    if cfg is None:
        return None
    if cfg.groups is not None:
        if kind not in ("linear", "conv2d"):
            raise QuantkitError(f"DGQ group activation quantizers cover linear and conv2d inputs, not {kind}")
        return GroupActQuantizer(cfg.format.bits, cfg.groups, "conv" if kind == "conv2d" else "last")
    return ActQuantizer(cfg.format, cfg.dynamic, act_channel_dim(kind))


def conv_act_spec_ok(cfg: ActivationConfig | None, task: LayerTask) -> None:
    """Conv inputs are quantized along channels; group formats need C divisible by the group size."""
    if cfg is not None and task.kind == "conv2d" and cfg.format.granularity == "group":
        cfg.format.check_k(task.module.in_channels, f"the input channels of {task.name}")


def build_quantized(task: LayerTask, weights: Any = None) -> nn.Module:
    """The quantized replacement of `task.module` (round-to-nearest unless `weights` are given).

    weights: a QuantizedWeight for linear/conv, a (gate_up, down) pair for experts.
    """
    plan = task.plan
    conv_act_spec_ok(plan.activation, task)
    if task.kind == "linear":
        return QuantLinear.from_linear(task.module, plan.weight, make_act(plan.activation, "linear"), weights)
    if task.kind == "conv2d":
        return QuantConv2d.from_conv(task.module, plan.weight, make_act(plan.activation, "conv2d"), weights)
    if task.kind == "router":
        return QuantRouter.from_router(task.module, plan.weight, make_act(plan.activation, "linear"), weights)
    if task.kind == "expert_linear":
        return build_experts(task.module, plan.weight, make_act(plan.activation, "linear"), None, weights)
    return build_experts(task.module, plan.weight, make_act(plan.activation, "experts"),
                         make_act(plan.activation, "experts"), weights)


def empty_quantized(module: nn.Module, kind: str, wspec: FormatSpec, act: ActivationConfig | None,
                    record: dict[str, Any] | None = None, on_meta: bool = False) -> nn.Module:
    """An unfilled quantized module with `module`'s geometry (for loading a checkpoint);
    `record` (its quantization.json entry) adds the online rotations it was saved with.
    on_meta (fused experts only): its tensors on the meta device, every one to be assigned by the caller
    (a rank of the expert split fills only its rows: no zeroed copy of every expert on the way)."""
    if on_meta:
        if kind != "experts":
            raise ValueError(f"on_meta is for fused experts, not {kind!r}")
        act_in, act_mid = make_act(act, kind), make_act(act, kind)  # (their non-persistent buffers stay real)
        with torch.device("meta"):
            return attach_empty_rotations(empty_experts(module, wspec, act_in, act_mid), record)
    if kind == "linear":
        return attach_empty_rotations(QuantLinear(module.in_features, module.out_features, module.bias is not None,
                                                  wspec, make_act(act, kind), module.weight.dtype), record)
    if kind == "conv2d":
        return QuantConv2d(QuantConv2d.conv_args_of(module), module.bias is not None, wspec, make_act(act, kind))
    if kind == "router":
        import copy

        return attach_empty_rotations(QuantRouter(copy.deepcopy(module), wspec, make_act(act, "linear")), record)
    if kind == "expert_linear":
        return empty_experts(module, wspec, make_act(act, "linear"), None)
    return attach_empty_rotations(empty_experts(module, wspec, make_act(act, kind), make_act(act, kind)), record)


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def layer_record(task: LayerTask, qmodule: nn.Module) -> dict[str, Any]:
    """What quantization.json stores per layer: enough to rebuild the module before loading buffers."""
    plan = task.plan
    rec: dict[str, Any] = {"kind": task.kind, "role": task.role, "weight": plan.weight.to_dict(),
                           "activation": None if plan.activation is None else plan.activation.to_dict()}
    if isinstance(qmodule, QuantExperts):
        rec["experts"] = qmodule.num_experts
        rec["params"] = _numel(qmodule.gate_up) + _numel(qmodule.down)
    else:
        rec["params"] = _numel(qmodule.quantized_weight)
    rec.update(rotation_records(qmodule))
    info = getattr(qmodule, "calibration_info", None)  # e.g. EAQuant's per-expert token counts
    if info:
        rec["calibration"] = info
    return rec


def _numel(qw: QuantizedWeight) -> int:
    n = 1
    for s in qw.shape:
        n *= s
    return n
