"""Quantized experts of every layout adapters/experts.py knows.

Weights are always stored [E, N, K] (K, the input dimension, last: what the formats quantize along),
whatever the source layout; scales are per expert. A standard layout (chunked gate/up, act_fn(gate) * up,
routed call) becomes a plain `QuantExperts` and runs through quantkit's fused-experts kernels. The others:
- `QuantExpertsCustom`: gpt-oss's interleaved gate/up with its own gate function and biases (routed: the
  fused-experts kernels with the layout's gate step between the two GEMMs), Llama-4's dense call on
  router-scaled [E*T, H] inputs (pure torch over the dequantized weights; a warning at CUDA load says so);
- `QuantParallelExperts`: JetMoE's one-weight-per-projection experts, called with per-expert token counts.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantkit import kernels
from quantkit.adapters.experts import ExpertLayout, canonical_weights, classify_experts
from quantkit.errors import QuantkitError
from quantkit.formats.qweight import WEIGHT_SCALE_DTYPE, QuantizedWeight
from quantkit.formats.spec import FormatSpec
from quantkit.nn import QuantExperts, _assign, _empty_qweight_buffers, _QuantModule, _view

log = logging.getLogger(__name__)


class ExpertGate(nn.Module):
    """The source experts class's own gate function (`_apply_gate`), on a weightless copy of the module
    (it keeps the scalars the function reads, e.g. gpt-oss's alpha and limit)."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        shell = copy.copy(experts)
        shell._parameters, shell._buffers = {}, {}
        shell._modules = dict(experts._modules)
        self.__dict__["_shell"] = shell  # not a submodule: it holds no tensors worth saving

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:  # [S, 2I] -> [S, I]
        shell = self.__dict__["_shell"]
        return type(shell)._apply_gate(shell, gate_up)


class QuantExpertsCustom(QuantExperts):
    """QuantExperts for the non-standard layouts (see the module docstring); same buffers, so checkpoints
    and `inspect` treat it as any QuantExperts."""

    def __init__(self, layout: ExpertLayout, experts: nn.Module, wspec: FormatSpec, act_in: nn.Module | None,
                 act_mid: nn.Module | None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(layout.num_experts, layout.in_dim, layout.mid_dim, wspec, getattr(experts, "act_fn", None),
                         act_in, act_mid, layout.has_bias, dtype)
        self.call = layout.call
        self.gate_fn = ExpertGate(experts) if layout.custom_gate else None
        self.layout = layout.describe()

    def _gate(self, gu: torch.Tensor) -> torch.Tensor:
        if self.gate_fn is not None:
            return self.gate_fn(gu)
        gate, up = gu.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up.dequantize(dtype), self.down.dequantize(dtype)  # [E, 2I, H], [E, H, I]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None) -> torch.Tensor:
        if self.call == "dense":
            return self._dense(hidden_states)
        if top_k_index is None or top_k_weights is None:
            raise QuantkitError("routed experts need top_k_index and top_k_weights")
        # the fused-experts kernels (or their reference) with this layout's own gate step
        return kernels.qexperts(hidden_states, top_k_index, top_k_weights, self.gate_up, self.down, self.act_fn,
                                self.act_in, self.act_mid, self.gate_up_bias, self.down_bias, self.kernel_backend,
                                gate_fn=self._gate)

    def _dense(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [E*T, H] -> [E*T, H]
        w_gu, w_dn = self._weights(hidden_states.dtype)
        x = hidden_states.view(self.num_experts, -1, self.hidden_dim)  # [E, T, H]
        if self.act_in is not None:
            x = self.act_in(x)
        h = self._gate(torch.bmm(x, w_gu.transpose(1, 2)))  # [E, T, I]
        if self.act_mid is not None:
            h = self.act_mid(h)
        return torch.bmm(h, w_dn.transpose(1, 2)).reshape(-1, self.hidden_dim)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", layout={self.layout}"


class QuantParallelExperts(_QuantModule):
    """JetMoE's parallel experts: weight [E, N, K]; forward(inputs sorted by expert, expert_size)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, wspec: FormatSpec,
                 act: nn.Module | None = None) -> None:
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.wspec = wspec
        spec = wspec
        spec.check_k(in_features, "an expert weight")
        _empty_qweight_buffers(self, self.shape, spec)
        if wspec.granularity == "tensor":  # one scale per expert
            self.scale = torch.ones(num_experts, 1, 1, dtype=WEIGHT_SCALE_DTYPE)
            if self.zero is not None:
                self.zero = torch.zeros(num_experts, 1, 1, dtype=torch.uint8)
        self.act = act

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.num_experts, self.out_features, self.in_features)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        return _view(self, self.shape, self.wspec)

    def forward(self, inputs: torch.Tensor, expert_size: list[int]) -> torch.Tensor:
        w = self.quantized_weight.dequantize(inputs.dtype)  # [E, N, K]
        outs = []
        for e, x in enumerate(inputs.split(expert_size, dim=0)):
            if self.act is not None and x.numel():
                x = self.act(x)
            outs.append(F.linear(x, w[e]))
        return torch.cat(outs, dim=0)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, {self.in_features}, {self.out_features}, w={self.wspec.short}"


def _layout(module: nn.Module) -> ExpertLayout:
    c = classify_experts(module)
    if not isinstance(c, ExpertLayout):
        raise QuantkitError(f"{type(module).__name__} is not an experts module quantkit can quantize: {c}")
    return c


def reduction_sizes(module: nn.Module) -> list[int]:
    """K of each expert projection (what group sizes must divide)."""
    lay = _layout(module)
    return [lay.in_dim] if lay.kind == "parallel" else [lay.in_dim, lay.mid_dim]


def build_experts(module: nn.Module, wspec: FormatSpec, act_in: nn.Module | None, act_mid: nn.Module | None,
                  weights: Any = None) -> nn.Module:
    """The quantized replacement of an experts module (round-to-nearest unless `weights` are given)."""
    lay = _layout(module)
    if lay.standard:
        gu, dn = weights if weights is not None else (None, None)
        return QuantExperts.from_experts(module, wspec, act_in, act_mid, gu, dn)
    q = empty_experts(module, wspec, act_in, act_mid)
    w, dn = canonical_weights(module, lay)
    if weights is not None:
        raise QuantkitError(f"{lay.describe()}: only round-to-nearest experts are supported for this layout")
    if lay.kind == "parallel":
        _assign(q, QuantExperts.quantize_3d(w, wspec))
        return q.to(w.device)
    _assign(q, QuantExperts.quantize_3d(w, wspec), "gate_up_")
    _assign(q, QuantExperts.quantize_3d(dn, wspec), "down_")
    if lay.has_bias:
        q.gate_up_bias = module.gate_up_proj_bias.detach().clone()
        q.down_bias = module.down_proj_bias.detach().clone()
    return q.to(w.device)


def empty_experts(module: nn.Module, wspec: FormatSpec, act_in: nn.Module | None,
                  act_mid: nn.Module | None) -> nn.Module:
    """An unfilled quantized experts module with `module`'s layout (checkpoint loading)."""
    lay = _layout(module)
    dtype = next(module.parameters()).dtype
    if lay.kind == "parallel":
        return QuantParallelExperts(lay.num_experts, lay.in_dim, lay.out_dim, wspec, act_in)
    if lay.kernel_ready:
        return QuantExperts(lay.num_experts, lay.in_dim, lay.mid_dim, wspec, module.act_fn, act_in, act_mid,
                            lay.has_bias, dtype)
    return QuantExpertsCustom(lay, module, wspec, act_in, act_mid, dtype)
