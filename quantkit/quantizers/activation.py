"""Activation quantizer: dynamic (per token / per group, computed at run time) or static (calibrated range)."""
from __future__ import annotations

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.formats import fp8, integer, mxfp4
from quantkit.formats.spec import FormatSpec


def fake_quant(x: torch.Tensor, spec: FormatSpec, scale: torch.Tensor | None = None,
               zero: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize `x` [..., K] along its last dimension."""
    if spec.kind == "int":
        return integer.fake_quant_int(x, spec, scale, zero)
    if spec.kind == "mxfp4":
        return mxfp4.fake_quant_mxfp4(x, spec)
    if spec.kind == "fp8":
        return fp8.fake_quant_fp8(x, spec)
    raise QuantkitError(f"format {spec.kind!r} cannot quantize linear/conv inputs; allowed: int, mxfp4, fp8")


class ActQuantizer(nn.Module):
    """Quantizes the input of one layer.

    dynamic: scales from each call's data (per token for granularity 'channel', per group, or per call).
    static:  one per-tensor int range calibrated by `observe` + `finalize`, kept as buffers.
    `channel_dim` is where the channels of the input are (1 for NCHW convolutions, -1 for linears).
    """

    def __init__(self, spec: FormatSpec, dynamic: bool = True, channel_dim: int = -1) -> None:
        super().__init__()
        if not dynamic and (spec.kind != "int" or spec.granularity != "tensor"):
            raise QuantkitError("static activation ranges need an int format with granularity 'tensor'")
        self.spec = spec
        self.dynamic = dynamic
        self.channel_dim = channel_dim
        if not dynamic:
            self.register_buffer("scale", torch.ones(()))
            self.register_buffer("zero", torch.zeros((), dtype=torch.uint8) if not spec.symmetric else None)
            self.register_buffer("observed_min", torch.tensor(float("inf")), persistent=False)
            self.register_buffer("observed_max", torch.tensor(float("-inf")), persistent=False)

    def observe(self, x: torch.Tensor) -> None:
        """Widen the static range to cover `x` (calibration)."""
        self.observed_min = torch.minimum(self.observed_min, x.detach().amin().float())
        self.observed_max = torch.maximum(self.observed_max, x.detach().amax().float())

    def finalize(self) -> None:
        """Turn the observed range into the stored scale (and zero)."""
        if self.observed_min.item() == float("inf") and self.observed_max.item() == float("-inf"):
            raise QuantkitError("static activation quantizer saw no calibration data")
        if not (torch.isfinite(self.observed_min) and torch.isfinite(self.observed_max)):
            bad = "NaN" if torch.isnan(self.observed_min) or torch.isnan(self.observed_max) else "Inf"
            raise QuantkitError(f"calibration inputs hold {bad}: no finite static activation range")
        rng = torch.stack([self.observed_min, self.observed_max])
        scale, zero = integer.int_qparams(rng.reshape(1, 2), self.spec)
        self.scale = scale.reshape(())
        if zero is not None:
            self.zero = zero.reshape(())

    def along_last_dim(self) -> "ActQuantizer":
        """A twin that quantizes along the last dimension and shares this one's buffers
        (a 1x1 convolution run as a GEMM sees channels-last inputs)."""
        if self.channel_dim == -1:
            return self
        twin = ActQuantizer.__new__(ActQuantizer)
        nn.Module.__init__(twin)
        twin.spec, twin.dynamic, twin.channel_dim = self.spec, self.dynamic, -1
        for name, buf in self._buffers.items():
            twin._buffers[name] = buf
        return twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moved = self.channel_dim not in (-1, x.dim() - 1)
        if moved:
            x = x.movedim(self.channel_dim, -1)
        if self.dynamic:
            y = fake_quant(x, self.spec)
        else:
            y = integer.fake_quant_int(x, self.spec, self.scale.reshape((1,) * x.dim()),
                                       None if self.zero is None else self.zero.reshape((1,) * x.dim()))
        return y.movedim(-1, self.channel_dim) if moved else y

    def extra_repr(self) -> str:
        return f"{self.spec.short}, {'dynamic' if self.dynamic else 'static'}"
