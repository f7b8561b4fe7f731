"""Numeric faults stop the run with the place they appeared: a NaN / Inf in calibration inputs, a
Hessian or a quantized layer's scales would otherwise be written into a checkpoint that loads fine
and outputs NaN."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.spill import iter_tensors


def _bad(t: torch.Tensor) -> str | None:
    if not t.is_floating_point() or t.is_meta or not t.numel():
        return None
    if torch.isfinite(t).all():
        return None
    return "NaN" if torch.isnan(t).any() else "Inf"


@torch.no_grad()
def check_inputs_finite(calls: list, where: str) -> None:
    """Calibration inputs of a block (activations) must be finite."""
    for i, c in enumerate(calls or []):
        for t in iter_tensors((c.args, c.kwargs)):
            what = _bad(t)
            if what:
                raise QuantkitError(f"calibration activations entering {where} contain {what} (calibration call {i}); "
                                    "the model overflows on the calibration data: check the source weights and dtype")


@torch.no_grad()
def check_module_finite(name: str, module: nn.Module, tensors: list[tuple[str, torch.Tensor]] | None = None) -> None:
    """Every float tensor of a freshly quantized layer (scales, zeros, rotations, static ranges) is finite
    (`tensors`: the module's tensors as this process holds them, when not all of them)."""
    if tensors is None:
        tensors = list(module.named_parameters()) + list(module.named_buffers())
    for tname, t in tensors:
        if tname.rpartition(".")[2].startswith("observed_"):
            continue  # running min/max of an observer: starts at +-inf by design, never used as a scale
        what = _bad(t)
        if what:
            raise QuantkitError(f"layer {name}: quantization produced {what} in {tname}; its weights or calibration "
                                "inputs hold extreme or non-finite values")


def check_hessian_finite(h: torch.Tensor, name: str = "") -> None:
    what = _bad(h)
    if what:
        where = f"layer {name}: its" if name else "GPTQ: a layer's"
        raise QuantkitError(f"{where} input Hessian holds {what} (non-finite calibration activations); "
                            "GPTQ cannot run on it")
