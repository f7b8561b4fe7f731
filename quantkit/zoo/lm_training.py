"""The training loop the zoo's byte-level language models share."""

from __future__ import annotations

import logging
from typing import Callable

import torch

from quantkit.zoo.common import cosine_lr
from quantkit.zoo.lm_data import perplexity, random_windows

log = logging.getLogger(__name__)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms, biases and routers stay undecayed (decay would fight routing)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_router = name.endswith("gate.weight")
        (no_decay if param.ndim < 2 or is_router else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_causal_lm(model: torch.nn.Module, train_data: torch.Tensor, held_out: torch.Tensor,
                    gen: torch.Generator, steps: int, batch: int, seq_len: int, lr: float,
                    forward_kwargs: dict | None = None,
                    after_step: Callable[[int], None] | None = None) -> None:
    """AdamW + warmup/cosine on random byte windows; `after_step` runs after each optimizer step."""
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95))
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, warmup=100, peak=lr)
        ids = random_windows(train_data, batch, seq_len, gen)
        out = model(input_ids=ids, labels=ids, **(forward_kwargs or {}))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(step)
        if step % 100 == 0 or step == steps - 1:
            aux = getattr(out, "aux_loss", None)
            log.info("step %d/%d loss %.4f%s", step, steps, out.loss.item(),
                     "" if aux is None else f" aux {aux.item():.4f}")
        if step % 500 == 499:
            log.info("held-out ppl (first 64 windows) %.3f", perplexity(model, held_out, max_windows=64))
            model.train()
