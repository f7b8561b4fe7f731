"""QuantRouter: a transformers MoE router (a custom module with a `.weight` [E, H]) with its weight
stored quantized, so the exported checkpoint holds exactly the router that was evaluated.

The original router module is kept as `inner` (its top-k / sigmoid / group logic, its buffers such
as DeepSeek's e_score_correction_bias) with its weight parameter removed; each forward hands it the
dequantized weight and the (rotated, quantized) input. Family-agnostic: every supported router only
reads its input through `F.linear(x, self.weight)`.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from quantkit.formats.qweight import QuantizedWeight
from quantkit.formats.spec import FormatSpec
from quantkit.nn import _assign, _empty_qweight_buffers, _QuantModule, _view
from quantkit.quantizers.activation import ActQuantizer


def is_router_module(module: nn.Module) -> bool:
    """A router with its own logic holding a 2-D `weight` parameter [E, H]: a custom module, or an nn.Linear
    subclass whose forward does more than the matmul (PhiMoE's returns logits, weights and experts)."""
    w = getattr(module, "weight", None)
    if not (isinstance(w, nn.Parameter) and w.dim() == 2):
        return False
    return not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward


class QuantRouter(_QuantModule):
    def __init__(self, router: nn.Module, wspec: FormatSpec, act: ActQuantizer | None = None) -> None:
        """`router` is consumed: pass a copy (its weight parameter is removed)."""
        super().__init__()
        e, h = router.weight.shape
        self.out_features, self.in_features = e, h
        self.wspec = wspec
        _empty_qweight_buffers(self, (e, h), wspec)
        del router._parameters["weight"]
        router.register_buffer("weight", None, persistent=False)  # filled per call, never saved
        self.inner = router
        self.act = act
        self.rotation: nn.Module | None = None
        self.kernel_backend = "reference"

    @classmethod
    def from_router(cls, router: nn.Module, wspec: FormatSpec, act: ActQuantizer | None = None,
                    qweight: QuantizedWeight | None = None) -> "QuantRouter":
        w = router.weight.detach()
        inner = copy.deepcopy(router)
        q = cls(inner, wspec, act)
        _assign(q, qweight if qweight is not None else QuantizedWeight.quantize(w, wspec))
        return q.to(w.device)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        return _view(self, (self.out_features, self.in_features), self.wspec)

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states
        if self.rotation is not None:
            x = self.rotation(x)
        if self.act is not None:
            x = self.act(x)
        self.inner.weight = self.quantized_weight.dequantize(x.dtype)
        return self.inner(x.contiguous())

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, w={self.wspec.short}"
