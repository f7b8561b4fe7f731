"""Exponential moving average of weights: diffusion models sample far better from the EMA copy."""

from __future__ import annotations

import copy

import torch


class EMA:
    """Keeps a frozen shadow copy of `model` updated as shadow = d * shadow + (1 - d) * model."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # Warm up the decay so early, still-random weights wash out quickly.
        decay = min(self.decay, (1 + step) / (10 + step))
        for shadow, live in zip(self.shadow.parameters(), model.parameters()):
            shadow.lerp_(live.detach(), 1 - decay)
