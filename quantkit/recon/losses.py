"""Reconstruction losses: the lp block loss and pluggable extra terms (EDA-DM's per-layer FBR term)."""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

FBR_LAYER_SETS = ("all", "code")


def lp_loss(pred: torch.Tensor, target: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Q-Diffusion / BRECQ convention: |a - b|^p summed over dim 1 (channels), mean over the rest."""
    return (pred - target).abs().pow(p).sum(1).mean()


class LossTerm(Protocol):
    """An extra loss term: hooked into the quantized and full-precision blocks for one step."""

    def attach(self, qblock: nn.Module, fp_block: nn.Module) -> None: ...

    def detach(self) -> None: ...

    def __call__(self) -> torch.Tensor: ...


class LayerOutputLoss:
    """EDA-DM FBR: weight * sum over the block's quantized layers of lp(Y_q, Y_fp).

    Y_fp comes from the full-precision block run on the FP input, Y_q from the quantized block on the
    (mixed) training input. `layers="all"` takes every quantized layer (the paper's per-layer terms);
    `layers="code"` leaves out the last one in module registration order, as the official code does.
    """

    def __init__(self, local_names: list[str], weight: float, layers: str = "all") -> None:
        if layers == "code":
            local_names = local_names[:-1]
        self.names, self.weight = local_names, weight
        self.q_out: dict[str, torch.Tensor] = {}
        self.fp_out: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def attach(self, qblock: nn.Module, fp_block: nn.Module) -> None:
        for name in self.names:
            self._handles.append(qblock.get_submodule(name).register_forward_hook(self._store(self.q_out, name)))
            self._handles.append(fp_block.get_submodule(name).register_forward_hook(self._store(self.fp_out, name)))

    @staticmethod
    def _store(d: dict, name: str):
        def hook(_m, _inp, out):
            d[name] = out

        return hook

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __call__(self) -> torch.Tensor:
        terms = [lp_loss(self.q_out[n], self.fp_out[n].detach()) for n in self.names if n in self.q_out and n in self.fp_out]
        self.q_out.clear()
        self.fp_out.clear()
        if not terms:
            return torch.zeros(())
        return self.weight * torch.stack(terms).sum()
