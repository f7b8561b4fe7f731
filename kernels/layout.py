"""How the Triton kernels read a QuantizedWeight: pointers, strides and compile-time flags (pure torch)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.formats.integer import zero_offset
from quantkit.formats.qweight import QuantizedWeight

# MXFP4 scale modes whose scales are E8M0 exponents (the kernels decode those; others are not E8M0).
E8M0_SCALE_MODES = ("ocp_floor", "ceil", "rceil")


@dataclass(frozen=True)
class WeightLayout:
    """A 2-D [N, K] or 3-D [E, N, K] quantized weight as kernel arguments.

    scale / zero are broadcast to [E, N, G] views (stride 0 where the stored tensor has a 1), so
    per-tensor, per-channel, per-group and shared-across-experts scales all read the same way.
    """

    packed: torch.Tensor  # [E, N, ceil(K*bits/8)] uint8
    scale: torch.Tensor  # [E, N, G] fp16 (int) or uint8 E8M0 (mxfp4), maybe stride 0
    zero: torch.Tensor  # [E, N, G] uint8, or `scale` as a never-read placeholder
    n: int
    k: int
    bits: int
    group: int  # elements per scale along K; 0 = one scale per row
    is_mx: bool
    has_zero: bool
    sym_offset: int

    @property
    def row_bytes(self) -> int:
        return self.packed.stride(-2)

    def constexprs(self) -> dict[str, int]:
        return {"BITS": self.bits, "GROUP": self.group, "IS_MX": self.is_mx,
                "HAS_ZERO": self.has_zero, "SYM_OFFSET": self.sym_offset}


def weight_layout(qw: QuantizedWeight) -> WeightLayout:
    """Kernel view of `qw` (2-D weights get a leading expert dimension of 1)."""
    spec = qw.spec
    shape = tuple(qw.shape)
    lead = shape[:-2] if len(shape) == 3 else (1,)
    n, k = shape[-2], shape[-1]
    packed = qw.packed.reshape(*lead, n, qw.packed.shape[-1])
    if packed.stride(-1) != 1:
        packed = packed.contiguous()
    scale = qw.scale.reshape((1,) * (3 - qw.scale.dim()) + tuple(qw.scale.shape))
    g = scale.shape[-1]
    scale = scale.expand(lead[0], n, g)
    zero = scale
    if qw.zero is not None:
        zero = qw.zero.reshape((1,) * (3 - qw.zero.dim()) + tuple(qw.zero.shape)).expand(lead[0], n, g)
    group = 0 if spec.granularity != "group" else int(spec.group_size)
    is_mx = spec.kind == "mxfp4"
    return WeightLayout(packed, scale, zero, n, k, spec.bits, group, is_mx, qw.zero is not None,
                        0 if is_mx else zero_offset(spec))


def weight_supported(qw: QuantizedWeight) -> str | None:
    """None if the Triton kernels can read `qw`, else why not (logged by the dispatcher)."""
    spec = qw.spec
    if spec.kind == "int":
        return None
    if spec.kind == "mxfp4":
        if spec.scale_mode not in E8M0_SCALE_MODES:
            return f"mxfp4 scale mode {spec.scale_mode!r} does not store E8M0 exponents"
        return None
    return f"no Triton kernel reads {spec.kind} weights"
