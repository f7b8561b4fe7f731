"""Byte-level tinyshakespeare splits and the perplexity the zoo LMs record."""

from __future__ import annotations

import math

import torch

from quantkit.zoo.common import find_data_file

TRAIN_FRACTION = 0.9  # first 90% trains, last 10% is held out (the shared data README's split)


def shakespeare_splits() -> tuple[torch.Tensor, torch.Tensor]:
    """Return (train, held_out) as 1-D int64 tensors of byte values."""
    raw = find_data_file("tinyshakespeare.txt").read_bytes()
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    cut = int(len(data) * TRAIN_FRACTION)
    return data[:cut], data[cut:]


def random_windows(data: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Sample `batch` windows of `length` bytes at random offsets."""
    starts = torch.randint(0, len(data) - length, (batch,), generator=gen)
    return torch.stack([data[s : s + length] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model: torch.nn.Module, data: torch.Tensor, window: int = 256, batch: int = 32,
               max_windows: int | None = None) -> float:
    """exp(mean next-byte NLL) over non-overlapping `window`-byte chunks of `data`."""
    model.eval()
    n = (len(data) - 1) // window
    if max_windows is not None:
        n = min(n, max_windows)
    chunks = data[: n * window].view(n, window)
    total_nll, total_tokens = 0.0, 0
    for i in range(0, n, batch):
        ids = chunks[i : i + batch]
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += ids[:, 1:].numel()
    return math.exp(total_nll / total_tokens)
