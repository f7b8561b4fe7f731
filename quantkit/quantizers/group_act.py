"""DGQ's distribution-aware group activation quantizer (Ryu et al., ICLR 2025; METHODS.md §2.2).

For each timestep slot, calibration records the per-index (min, max) of the input along two axes:
channels and tokens (pixels for convolution inputs, queries/keys for attention tensors). The axis
whose (min, max) points spread more is grouped: its indices are clustered into G groups by K-means
on (min, max), and each group gets one asymmetric range lo_g..hi_g over its points:

    delta_g = (hi_g - lo_g) / (2^b - 1),  z_g = round(-lo_g / delta_g)
    x_hat   = delta_g * (clamp(round(x / delta_g) + z_g, 0, 2^b - 1) - z_g)

Layouts: "last" = channels on the last dim, tokens on the one before ([..., L, C] linear inputs,
[B, heads, L, d] attention tensors); "conv" = [N, C, H, W], tokens = the H*W pixels of the input
(grouped on the input tensor itself, no unfold). Buffers, per slot: the timestep, the chosen axis,
each index's group, the group scales and zero points; G scales per tensor and step at inference.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.quantizers.kmeans import sklearn_kmeans
from quantkit.quantizers.step_clock import calibration_step, nearest_step, take_buffer_shapes

log = logging.getLogger(__name__)

CHANNEL, TOKEN = 0, 1
LAYOUTS = ("last", "conv")


class GroupActQuantizer(nn.Module):
    """Static asymmetric int quantizer with G outlier-aware groups and one parameter set per timestep."""

    def __init__(self, bits: int, groups: int, layout: str = "last", timestep_aware: bool = True,
                 force_axis: str | None = None) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise QuantkitError(f"unknown activation layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
        if not 2 <= bits <= 8 or not 1 <= groups <= 255:
            raise QuantkitError(f"group activation quantizer takes 2-8 bits and 1-255 groups, got {bits} and {groups}")
        self.bits, self.groups, self.layout = bits, groups, layout
        self.timestep_aware = timestep_aware
        self.force_axis = force_axis  # None (choose by spread), "channel" or "token" (IN_CHANNEL_WISE)
        self.observing = False
        self.clock = None  # StepClock, set by install_step_clock
        self._stats: dict[float, list[torch.Tensor | None]] = {}
        self._cache: dict = {}
        for name, t in self._empty_buffers().items():
            self.register_buffer(name, t)

    @staticmethod
    def _empty_buffers() -> dict[str, torch.Tensor]:
        return {"timesteps": torch.zeros(0), "axis": torch.zeros(0, dtype=torch.uint8),
                "sizes": torch.zeros(2, dtype=torch.long),  # (channels, tokens) seen in calibration
                "group_of": torch.zeros(0, 0, dtype=torch.uint8), "scale": torch.ones(0, 0), "zero": torch.zeros(0, 0)}

    @property
    def needs_clock(self) -> bool:
        return self.timesteps.numel() > 1 or (self.observing and self.timestep_aware)

    # -- calibration -------------------------------------------------------------------------
    def _axes_minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        x = x.detach().float()
        if self.layout == "conv":  # [N, C, H, W]
            xc = x.transpose(0, 1).reshape(x.shape[1], -1)
            xt = x.flatten(2).permute(2, 0, 1).reshape(x.shape[2] * x.shape[3], -1)
        else:
            xc = x.reshape(-1, x.shape[-1]).T
            xt = x.movedim(-2, 0).reshape(x.shape[-2], -1) if x.dim() >= 3 else None
        tmin, tmax = (None, None) if xt is None else (xt.amin(1), xt.amax(1))
        return xc.amin(1), xc.amax(1), tmin, tmax

    def observe(self, x: torch.Tensor) -> None:
        """Record per-channel and per-token min/max of `x` for the current step."""
        new = list(self._axes_minmax(x))
        old = self._stats.get(calibration_step(self))
        if old is not None:
            for i, reduce in enumerate((torch.minimum, torch.maximum, torch.minimum, torch.maximum)):
                if old[i] is None and new[i] is None:
                    continue
                if old[i] is None or new[i] is None or old[i].shape != new[i].shape:
                    raise QuantkitError("calibration inputs of one layer change shape (token count or resolution); "
                                        "DGQ's groups need a fixed input size")
                new[i] = reduce(old[i], new[i])
        self._stats[calibration_step(self)] = new

    def finalize(self) -> None:
        """Choose the axis, cluster it and set the group ranges of every observed step."""
        if not self._stats:
            raise QuantkitError("group activation quantizer saw no calibration data")
        keys = sorted(self._stats, reverse=True)  # denoising order: high t first
        first = self._stats[keys[0]]
        c, n_tok = first[0].numel(), (0 if first[2] is None else first[2].numel())
        n = max(c, n_tok)
        T = len(keys)
        axis = torch.zeros(T, dtype=torch.uint8)
        group_of = torch.zeros(T, n, dtype=torch.uint8)
        lo_hi = []
        for s, k in enumerate(keys):
            cmin, cmax, tmin, tmax = self._stats[k]
            ax = self._choose_axis(cmin, cmax, tmin, tmax)
            mins, maxs = (cmin, cmax) if ax == CHANNEL else (tmin, tmax)
            labels = sklearn_kmeans(torch.stack([mins, maxs], 1), self.groups, seed=0)  # as DGQ's code
            g = int(labels.max()) + 1
            lo = torch.stack([mins[labels == j].min() for j in range(g)])
            hi = torch.stack([maxs[labels == j].max() for j in range(g)])
            axis[s], group_of[s, :labels.numel()] = ax, labels.to(torch.uint8)
            lo_hi.append((lo, hi))
        gmax = max(lo.numel() for lo, _ in lo_hi)
        scale, zero = torch.ones(T, gmax), torch.zeros(T, gmax)
        qmax = (1 << self.bits) - 1
        for s, (lo, hi) in enumerate(lo_hi):
            d = ((hi - lo) / qmax).clamp(min=1e-8)
            scale[s, :d.numel()], zero[s, :d.numel()] = d, torch.round(-lo / d)
        dev = self.scale.device
        self.timesteps = torch.tensor(keys, dtype=torch.float32, device=dev)
        self.axis, self.group_of = axis.to(dev), group_of.to(dev)
        self.scale, self.zero = scale.to(dev), zero.to(dev)
        self.sizes = torch.tensor([c, n_tok], device=dev)
        self._stats, self._cache = {}, {}

    def _choose_axis(self, cmin, cmax, tmin, tmax) -> int:
        if tmin is None or self.force_axis == "channel":
            return CHANNEL
        if self.force_axis == "token":
            return TOKEN

        def spread(mins: torch.Tensor, maxs: torch.Tensor) -> float:
            return float((maxs.max() - maxs.min()) + (mins.max() - mins.min()))

        return TOKEN if spread(tmin, tmax) > spread(cmin, cmax) else CHANNEL

    # -- inference -----------------------------------------------------------------------------
    def slot(self) -> int:
        """The calibrated step nearest to the clock's timestep (any sampler step count maps there)."""
        if self.timesteps.numel() == 0:
            raise QuantkitError("group activation quantizer is not calibrated")
        if "ts" not in self._cache:
            self._cache["ts"] = self.timesteps.tolist()
        return nearest_step(self._cache["ts"], self.clock)

    def _params(self, s: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-element scale and zero of slot s, shaped to broadcast against x."""
        key = (s, x.device, x.dtype, tuple(x.shape[2:]) if self.layout == "conv" else x.dim())
        if key in self._cache:
            return self._cache[key]
        c, n_tok = self._sizes()
        ax = self._cache["axes"][s]
        n = c if ax == CHANNEL else n_tok
        idx = self.group_of[s, :n].long()
        sc, z = self.scale[s][idx].to(x.dtype), self.zero[s][idx].to(x.dtype)
        if self.layout == "conv":
            shape = (c, 1, 1) if ax == CHANNEL else (1, *x.shape[2:])
        else:
            shape = (c,) if ax == CHANNEL else (n_tok, 1)
        self._cache[key] = (sc.reshape(shape), z.reshape(shape))
        return self._cache[key]

    def _sizes(self) -> tuple[int, int]:
        if "sizes" not in self._cache:  # python copies: no device sync per call
            self._cache["sizes"] = tuple(int(v) for v in self.sizes.tolist())
            self._cache["axes"] = [int(a) for a in self.axis.tolist()]
        return self._cache["sizes"]

    def _check_shape(self, x: torch.Tensor, s: int) -> None:
        """Channels must match; tokens too when this step groups tokens (their groups fix the resolution)."""
        c, n_tok = self._sizes()
        xc = x.shape[1] if self.layout == "conv" else x.shape[-1]
        if self.layout == "conv":
            xt = x.shape[2] * x.shape[3]
        else:
            xt = x.shape[-2] if x.dim() >= 3 else 0
        if xc != c or (self._cache["axes"][s] == TOKEN and xt != n_tok):
            raise QuantkitError(f"input has {xc} channels and {xt} tokens/pixels; this DGQ quantizer was calibrated "
                                f"for {c} and {n_tok} (token groups fix the resolution: sample at the calibrated size)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
            return x
        s = self.slot()
        self._check_shape(x, s)
        sc, z = self._params(s, x)
        q = torch.clamp(torch.round(x / sc) + z, 0, (1 << self.bits) - 1)
        return (q - z) * sc

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        take_buffer_shapes(self, state_dict, prefix)  # shapes depend on the calibration (steps, groups, sizes)
        self._cache = {}
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return (f"int{self.bits} asym, groups={self.groups}, layout={self.layout}, "
                f"steps={self.timesteps.numel()}{', observing' if self.observing else ''}")
