"""GPTQ weight compensation (DuQuant++*, METHODS.md §5.2): columns quantized one at a time, the error
pushed onto the not-yet-quantized columns through the inverse Hessian of the layer's inputs.

Scales: MXFP4 and int group formats recompute a group's scale when the walk reaches its first column,
from the error-updated weights (the code's group_size=32 path); per-channel int scales come from
the original rows; duquantpp_log8 scales are fixed from the original weight (they depend on the
whole tensor's scale range). blocksize 128, percdamp 0.01, no act-order, as the official defaults.
"""
from __future__ import annotations

import torch

from quantkit.formats import integer, mxfp4
from quantkit.formats.qweight import WEIGHT_SCALE_DTYPE, QuantizedWeight
from quantkit.formats.spec import FormatSpec
from quantkit.progress import track


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / T for inputs x [T, K] (float64)."""
    x = x.double().reshape(-1, x.shape[-1])
    return 2.0 * x.T @ x / max(x.shape[0], 1)


class _ColumnQuantizer:
    """Quantize-dequantize one column with the scale of the group it belongs to."""

    def __init__(self, w: torch.Tensor, spec: FormatSpec) -> None:
        self.spec = spec
        n, k = w.shape
        self.group = spec.group_size if spec.granularity == "group" else k
        g = k // self.group
        if spec.kind == "mxfp4":
            fixed = spec.scale_mode == "duquantpp_log8"
            self.scale = mxfp4.duquantpp_log8_scales(w.float()) if fixed else torch.zeros(n, g, dtype=torch.uint8)
            self.fixed = fixed
            self.zero = None
        else:
            s, z = integer.int_qparams(w.float(), spec, WEIGHT_SCALE_DTYPE)
            self.scale, self.zero = s.reshape(n, -1).clone(), None if z is None else z.reshape(n, -1).clone()
            self.fixed = spec.granularity != "group"
        self._consts: tuple | None = None  # (group, fp32 scale [N], fp32 zero [N] or None) of the current group

    def start_group(self, gi: int, cols: torch.Tensor) -> None:
        """Scale of group gi from its current (error-updated) columns [N, group]."""
        self._consts = None
        if self.fixed:
            return
        if self.spec.kind == "mxfp4":
            self.scale[:, gi] = mxfp4.mx_exponents(cols.float(), self.spec.scale_mode)[:, 0]
        else:
            s, z = integer.int_qparams(cols.float(), FormatSpec("int", self.spec.bits, self.spec.symmetric),
                                       WEIGHT_SCALE_DTYPE)
            self.scale[:, gi] = s[:, 0]
            if z is not None:
                self.zero[:, gi] = z[:, 0]

    def fake(self, col: torch.Tensor, gi: int) -> torch.Tensor:
        if self.spec.kind == "mxfp4":
            c = col.float().unsqueeze(-1)
            s = mxfp4.block_scale(self.scale[:, gi:gi + 1])
            return (mxfp4.decode_e2m1(mxfp4.encode_e2m1(c / s)) * s).squeeze(-1)
        # integer.quantize_int_with then dequantize_int, written out on one column: the same fp32 operations
        # (codes are small integers, exact in fp32), without their per-call reshapes; once per column this
        # was most of GPTQ's Python time.
        if self._consts is None or self._consts[0] != gi:
            self._consts = (gi, self.scale[:, gi].float(), None if self.zero is None else self.zero[:, gi].float())
        _, s, z = self._consts
        q = (col.float() / s).round_()
        if z is None:
            off = integer.zero_offset(self.spec)
            return q.clamp_(-off, off - 1).mul_(s)
        return q.add_(z).clamp_(0, (1 << self.spec.bits) - 1).sub_(z).mul_(s)

    def finish(self, q: torch.Tensor) -> QuantizedWeight:
        """Codes of the GPTQ result (exactly representable under the collected scales)."""
        spec = self.spec
        if spec.kind == "mxfp4":
            s = mxfp4.block_scale(self.scale)
            codes = mxfp4.encode_e2m1(q.float().reshape(*s.shape, -1) / s.unsqueeze(-1)).reshape(q.shape)
            return QuantizedWeight.from_codes(codes, self.scale, None, spec)
        codes = integer.quantize_int_with(q.float(), self.scale, self.zero, spec)
        return QuantizedWeight.from_codes(codes, self.scale, self.zero, spec)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: FormatSpec, blocksize: int = 128,
                  percdamp: float = 0.01) -> QuantizedWeight:
    """GPTQ of w [N, K] (int channel/group or mxfp4) given the input Hessian h [K, K]."""
    if spec.kind not in ("int", "mxfp4") or spec.granularity == "tensor":
        return QuantizedWeight.quantize(w, spec)
    from quantkit.numeric_guard import check_hessian_finite

    check_hessian_finite(h)
    w_orig = w
    w = w.double().clone()
    n, k = w.shape
    h = h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * torch.diagonal(h).mean() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    cq = _ColumnQuantizer(w_orig, spec)
    q = torch.zeros_like(w)
    for i1 in track(range(0, k, blocksize), "GPTQ column blocks"):
        i2 = min(i1 + blocksize, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            gi = col // cq.group
            if col % cq.group == 0:
                cq.start_group(gi, w1[:, i:i + cq.group] if i + cq.group <= i2 - i1 else w[:, col:col + cq.group])
            qc = cq.fake(w1[:, i], gi).double()
            q[:, col] = qc
            e = (w1[:, i] - qc) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return cq.finish(q.float())
