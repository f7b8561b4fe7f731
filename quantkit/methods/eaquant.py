"""EAQuant: expert-aware PTQ for MoE models (METHODS.md §3), built on the DuQuant engine.

1. Smoothing aggregation: the post-attention norm's scale is the max over the router's requirement
   (all tokens) and every expert's requirement (only its routed tokens), folded into the norm.
2. Router logits alignment: the router weight's clipping ratios minimize logit MSE + KL on the FP
   top-m experts (m = k + floor(P (n - k))); the router stays at 8 bits in the recipes.
3. Calibration balance: experts under their token target get tokens routed to them in further
   calibration samples (the paper's rule; `balance: force` = forced routing instead); experts with
   none are calibrated on the layer input; the counts go to quantization.json.
"""
from __future__ import annotations

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.qweight import QuantizedWeight
from quantkit.formats.spec import FormatSpec
from quantkit.methods.base import register
from quantkit.methods.duquant import DEFAULTS, DuQuant
from quantkit.quantizers.clip_search import align_router
from quantkit.quantizers.smoothing import MERGES, SmoothingStats, eaquant_scale

EAQUANT_DEFAULTS = {
    **DEFAULTS,
    "smooth_merge": "max_gate",  # the paper's formula; "max" = the official code's default (no router term)
    "router_align": True,
    "router_objective": "mse_kl",  # the paper's dual objective; "kl" = run.sh's per_channel_kl_top0
    "router_top_ratio": 0.0,  # P in m = k + floor(P (n - k)); run.sh uses 0 (m = k)
    # the paper's rule: more calibration samples until every expert reaches its token target;
    # "force" = quantkit's forced-routing substitute, "none" = natural tokens only
    "balance": "more_data",
}


@register("eaquant")
class EAQuant(DuQuant):
    defaults = EAQUANT_DEFAULTS

    def __init__(self, recipe) -> None:
        super().__init__(recipe)
        if self.opt["smooth_merge"] not in MERGES:
            raise QuantkitError(f"smooth_merge must be one of {', '.join(MERGES)}, got {self.opt['smooth_merge']!r}")
        if self.opt["router_objective"] not in ("mse_kl", "kl"):
            raise QuantkitError(f"router_objective must be 'mse_kl' or 'kl', got {self.opt['router_objective']!r}")
        if not 0.0 <= float(self.opt["router_top_ratio"]) <= 1.0:
            raise QuantkitError(f"router_top_ratio must be in [0, 1], got {self.opt['router_top_ratio']}")

    def smoothing_scale(self, g, stats: SmoothingStats, gi: int) -> torch.Tensor:
        if g.experts is None:  # attention inputs, dense MLPs: plain SmoothQuant
            return super().smoothing_scale(g, stats, gi)
        return eaquant_scale(g, stats.act[gi], stats.expert.get(gi, {}), float(self.opt["alpha"]),
                             self.opt["smooth_merge"], self.expert_shard)

    def router_weight(self, w: torch.Tensor, spec: FormatSpec, x_in: torch.Tensor,
                      idx: torch.Tensor | None) -> tuple[QuantizedWeight, dict | None]:
        if not self.opt["router_align"] or spec.kind != "int" or idx is None:
            return super().router_weight(w, spec, x_in, idx)
        return align_router(w, x_in, spec, idx.shape[-1], float(self.opt["router_top_ratio"]),
                            self.opt["router_objective"])
