"""Exponential moving average of weights: diffusion models sample far better from the EMA copy."""

from __future__ import annotations

import copy
import logging

import torch

log = logging.getLogger(__name__)


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


def step_with_ema(model: torch.nn.Module, opt: torch.optim.Optimizer, ema: EMA, loss: torch.Tensor, step: int,
                  steps: int, name: str) -> None:
    """The zoo denoisers' training step after the loss: backward, clip to norm 1, optimizer step, EMA update,
    a log line every 200 steps and at the last."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema.update(model, step)
    if step % 200 == 0 or step == steps - 1:
        log.info("%s step %d/%d loss %.4f", name, step, steps, loss.item())
