"""DGQ's logarithmic quantizer for attention probabilities (METHODS.md §2.3).

q = clamp(round(-log2(p / delta)), 0, 2^b - 1), p_hat = delta * 2^-q.

delta "prompt": the maximum of each sample's probabilities, computed at run time, so every prompt of
a batch (and each classifier-free-guidance half) gets its own scale. This is the paper's per-prompt
scale; the official code takes one max over the whole batch tensor (`per_batch_delta=True`).
delta "calibrated": one delta per timestep slot, the quantile of the calibration probabilities in
{0.999, 0.9999, 0.99999} with the least quantization MSE (the code's fallback without real time).
"""
from __future__ import annotations

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.formats.log2 import dequantize_log2, quantize_log2
from quantkit.quantizers.step_clock import calibration_step, nearest_step, take_buffer_shapes

DELTA_MODES = ("prompt", "calibrated")
QUANTILES = (0.999, 0.9999, 0.99999)
_SAMPLE = 1 << 20  # probabilities kept per slot for the quantile search


class LogProbQuantizer(nn.Module):
    """Quantize-dequantize attention probabilities p [B, heads, Lq, Lk] on a log2 grid."""

    def __init__(self, bits: int, delta: str = "prompt", timestep_aware: bool = True,
                 per_batch_delta: bool = False) -> None:
        super().__init__()
        if delta not in DELTA_MODES:
            raise QuantkitError(f"unknown log-quantizer delta {delta!r}; allowed: {', '.join(DELTA_MODES)}")
        self.bits, self.delta_mode = bits, delta
        self.timestep_aware = timestep_aware
        self.per_batch_delta = per_batch_delta
        self.observing = False
        self.clock = None
        self._samples: dict[float, list[torch.Tensor]] = {}
        self.register_buffer("timesteps", torch.zeros(0))
        self.register_buffer("delta", torch.zeros(0))

    @property
    def needs_clock(self) -> bool:
        return self.delta_mode == "calibrated" and (self.timesteps.numel() > 1 or (self.observing and self.timestep_aware))

    def observe(self, p: torch.Tensor) -> None:
        if self.delta_mode != "calibrated":
            return
        flat = p.detach().float().flatten()
        if flat.numel() > _SAMPLE:
            g = torch.Generator(device=flat.device).manual_seed(len(self._samples.get(calibration_step(self), [])))
            flat = flat[torch.randint(0, flat.numel(), (_SAMPLE,), generator=g, device=flat.device)]
        self._samples.setdefault(calibration_step(self), []).append(flat.cpu())

    def finalize(self) -> None:
        if self.delta_mode != "calibrated":
            return
        if not self._samples:
            raise QuantkitError("log attention quantizer saw no calibration data")
        keys = sorted(self._samples, reverse=True)
        deltas = []
        for k in keys:
            x = torch.cat(self._samples[k])
            if x.numel() > _SAMPLE:
                x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:_SAMPLE]]
            cands = [torch.quantile(x, q).clamp(min=1e-12) for q in QUANTILES]
            errs = [((dequantize_log2(quantize_log2(x, d, self.bits), d) - x) ** 2).mean() for d in cands]
            deltas.append(cands[int(torch.stack(errs).argmin())])
        self.timesteps = torch.tensor(keys, dtype=torch.float32)
        self.delta = torch.stack(deltas).float()
        self._samples = {}

    def _calibrated_delta(self) -> torch.Tensor:
        if self.timesteps.numel() == 0:
            raise QuantkitError("log attention quantizer is not calibrated")
        return self.delta[nearest_step(self.timesteps.tolist(), self.clock)]

    def forward(self, p: torch.Tensor) -> torch.Tensor:  # p [B, heads, Lq, Lk], >= 0
        if self.observing:
            self.observe(p)
            return p
        if self.delta_mode == "prompt":
            tiny = torch.finfo(torch.float32).tiny
            if self.per_batch_delta:
                delta = p.detach().amax().float().clamp(min=tiny)
            else:  # one scale per sample of the batch: [B, 1, 1, 1]
                delta = p.detach().flatten(1).amax(1).float().clamp(min=tiny).reshape(-1, *([1] * (p.dim() - 1)))
        else:
            delta = self._calibrated_delta().to(p.device)
        return dequantize_log2(quantize_log2(p, delta, self.bits), delta, p.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        take_buffer_shapes(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"log2 {self.bits} bits, delta={self.delta_mode}"
