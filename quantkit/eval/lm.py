"""Language-model metrics: held-out perplexity and router fidelity against the full-precision model."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.adapters.base import ModelAdapter
from quantkit.progress import track

LM_METRICS = ("perplexity", "router_topk_agreement", "router_topk_exact", "router_kl")


def token_ids(tokenizer: Any, text: str, vocab_size: int) -> torch.Tensor:
    """Token ids of `text` (UTF-8 bytes modulo the vocabulary when there is no tokenizer)."""
    if tokenizer is not None:
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    return torch.tensor([b % vocab_size for b in text.encode("utf-8")])


def windows(ids: torch.Tensor, seq_len: int, n: int | None) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of seq_len tokens (at most n)."""
    count = len(ids) // seq_len
    if n is not None:
        count = min(count, n)
    return [ids[i * seq_len:(i + 1) * seq_len].unsqueeze(0) for i in range(count)]


@torch.no_grad()
def perplexity(model: nn.Module, wins: list[torch.Tensor], progress: Callable[[int], None] | None = None) -> float:
    """exp(mean next-token NLL) over all predicted positions of all windows."""
    nll, count = 0.0, 0
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else "cpu"
    for w in wins:
        w = w.to(device)
        logits = model(input_ids=w, use_cache=False).logits.float()
        nll += F.cross_entropy(logits[0, :-1], w[0, 1:], reduction="sum").item()
        count += w.shape[1] - 1
        if progress:
            progress(1)
    return math.exp(nll / count)


def _router_outputs(out: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(logits [T, E], top-k indices [T, k]) from a router's output tuple, None if it has no indices."""
    if not isinstance(out, (tuple, list)):
        return None
    idx = next((t for t in out if isinstance(t, torch.Tensor) and not t.is_floating_point()), None)
    logits = next((t for t in out if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
    if idx is None or logits is None:
        return None
    return logits.reshape(-1, logits.shape[-1]).float(), idx.reshape(-1, idx.shape[-1])


@torch.no_grad()
def router_records(model: nn.Module, adapter: ModelAdapter, wins: list[torch.Tensor]) -> dict[str, list]:
    """Per router: its (logits, indices) for every token of every window, concatenated."""
    records: dict[str, list] = {}
    handles = []
    for name, module in model.named_modules():
        if name and adapter.role(name, module) == "router":
            def hook(_m, _a, out, name=name):
                got = _router_outputs(out)
                if got is not None:
                    records.setdefault(name, []).append(got)
            handles.append(module.register_forward_hook(hook))
    device = next(model.parameters()).device
    try:
        for w in track(wins, "router records"):
            model(input_ids=w.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: [torch.cat([r[0] for r in v]), torch.cat([r[1] for r in v])] for k, v in records.items()}


def expert_counts(records: dict[str, list]) -> dict[str, list[int]]:
    """Tokens routed to each expert, per router."""
    out = {}
    for name, (logits, idx) in records.items():
        out[name] = torch.bincount(idx.flatten().clamp(min=0), minlength=logits.shape[-1]).tolist()
    return out


def router_fidelity(fp: dict[str, list], q: dict[str, list]) -> dict[str, Any]:
    """Top-k set agreement, exact-set rate and KL(P_fp || P_q) of the softmax routing distributions,
    averaged over tokens then routers; plus tokens per expert of the quantized model."""
    agree, exact, kls = [], [], []
    for name, (lf, idf) in fp.items():
        if name not in q:
            continue
        lq, idq = q[name]
        k = idf.shape[-1]
        hit = (idf.unsqueeze(-1) == idq.unsqueeze(-2)).any(-1).sum(-1).float()  # [T]
        agree.append((hit / k).mean().item())
        exact.append((hit == k).float().mean().item())
        kls.append(F.kl_div(F.log_softmax(lq, -1), F.log_softmax(lf, -1), log_target=True, reduction="batchmean").item())
    counts = expert_counts(q)
    starved = {name: [e for e, c in enumerate(cs) if c == 0] for name, cs in counts.items()}
    return {
        "router_topk_agreement": sum(agree) / len(agree) if agree else float("nan"),
        "router_topk_exact": sum(exact) / len(exact) if exact else float("nan"),
        "router_kl": sum(kls) / len(kls) if kls else float("nan"),
        "tokens_per_expert": counts,
        "experts_without_tokens": {k: v for k, v in starved.items() if v},
    }
