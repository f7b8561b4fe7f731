"""Which activation quantizers and weights the integer GEMM (aq_gemm.py) serves; pure python."""
from __future__ import annotations

import math

import torch

from quantkit.formats.qweight import QuantizedWeight
from quantkit.formats.spec import FormatSpec


def max_block_k(a_group: int, w_group: int) -> int:
    """Largest K tile (power of two, at most 128) inside one group of both operands (0 = per row)."""
    g = math.gcd(a_group, w_group)  # gcd(x, 0) = x
    return min(128, g & -g) if g else 128


def act_group(spec: FormatSpec) -> int:
    """Activation elements per scale along K as the kernel sees it (0 = one per token)."""
    return 0 if spec.granularity in ("channel", "tensor") else int(spec.group_size)


def act_kernel_problem(x: torch.Tensor, qweight: QuantizedWeight, act: object,
                       rotation: torch.Tensor | None) -> str | None:
    """None if aq_gemm computes `act` then the GEMM exactly as the reference would, else why not."""
    from quantkit.quantizers.activation import ActQuantizer

    if not isinstance(act, ActQuantizer):
        return f"activation function {type(act).__name__} is not an ActQuantizer (only the reference can call it)"
    if act.channel_dim not in (-1, x.dim() - 1):
        return "activation quantizer reads channels from a non-last dimension"
    a, w = act.spec, qweight.spec
    k = qweight.shape[-1]
    if rotation is not None and a.kind != "mxfp4":
        return "the fused block rotation is implemented for mxfp4 activations only"
    if rotation is not None and tuple(rotation.shape[-2:]) != (32, 32):
        return f"rotation has shape {tuple(rotation.shape)}; expected [32, 32] or [K/32, 32, 32]"
    if a.kind == "mxfp4":
        if w.kind != "mxfp4":
            return f"mxfp4 activations run with mxfp4 weights, not {w.short}"
        if a.scale_mode != "ocp_floor" or not act.dynamic:
            return f"mxfp4 activation scale mode {a.scale_mode!r} has no fused quantizer (ocp_floor only)"
        return None
    if a.kind != "int":
        return f"{a.kind} activations have no integer GEMM"
    if w.kind != "int":
        return f"int activations run with int weights, not {w.short}"
    if not a.symmetric:
        return "asymmetric activations: a zero point would need a row-sum correction the kernel does not do"
    if a.granularity == "tensor" and act.dynamic:
        return "dynamic per-tensor activation scales need a global reduction before the GEMM"
    if w.bits == 8 and not w.symmetric:
        return "asymmetric 8-bit weights (code - zero) do not fit the int8 dot"
    if max_block_k(act_group(a), 0 if w.granularity != "group" else int(w.group_size)) < 32:
        return "activation and weight groups share no K tile of 32 or more (the int8 MMA's K)"
    if a.granularity == "group" and k % a.group_size:
        return f"activation group {a.group_size} does not divide K={k}"
    return None
