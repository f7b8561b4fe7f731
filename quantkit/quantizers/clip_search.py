"""Clipping-ratio grid searches for integer weights (DuQuant/EAQuant `per_channel_tensor` and the
EAQuant router's KL-Top alignment, METHODS.md §3.2 and §3.4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from quantkit.formats import integer
from quantkit.formats.qweight import WEIGHT_SCALE_DTYPE, QuantizedWeight
from quantkit.formats.spec import FormatSpec

# The official grid: r in {0.35 + i * 0.0065 : i = 0..100} (`bottom_bound=0.35`).
CLIP_GRID = tuple(0.35 + i * 0.0065 for i in range(101))


def _qparams(w: torch.Tensor, spec: FormatSpec, r: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale/zero of the range [r*min, r*max] (per the spec's groups), fp16-rounded as stored."""
    return integer.int_qparams(w.float() * r, spec, WEIGHT_SCALE_DTYPE)


def _deq(w: torch.Tensor, spec: FormatSpec, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    return integer.dequantize_int(integer.quantize_int_with(w, scale, zero, spec), scale, zero, spec)


def _grid_qparams(w: torch.Tensor, spec: FormatSpec, grid: tuple[float, ...]) -> tuple:
    """Candidates for every ratio at once: scale/zero [R, N, G] and the dequantized weights [R, N, K]."""
    r = torch.tensor(grid, dtype=torch.float32).reshape(-1, *([1] * w.dim()))
    wr = w.float().unsqueeze(0) * r
    scale, zero = integer.int_qparams(wr, spec, WEIGHT_SCALE_DTYPE)
    return scale, zero, _deq(w.float().expand_as(wr), spec, scale, zero)


def _select(t: torch.Tensor | None, best: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.gather(0, best.unsqueeze(0)).squeeze(0)


# Candidates evaluated at once ([R, rows, K] fp32 temporaries of ~16 MB): the search is row-local, so row
# chunks give the same result as the whole matrix while their temporaries stay in cache (4x faster than
# one [R, N, K] pass at N x K = 1024 x 2048, whose 850 MB temporaries also set the process's peak).
_SEARCH_ELEMENTS = 1 << 22


def _best_qparams(w: torch.Tensor, spec: FormatSpec, grid: tuple[float, ...]) -> tuple:
    """Per scale group of w [n, K] (fp32): the scale/zero of the ratio with the least weight MSE."""
    r = torch.tensor(grid, dtype=torch.float32).reshape(-1, 1, 1)
    wg = integer._group_view(w, spec)  # [n, G, g]
    # min(r * w) = r * min(w) exactly for r > 0 (rounding is monotonic): the ranges without an [R, n, K] copy
    scale, zero = integer.range_qparams(wg.amin(dim=-1) * r, wg.amax(dim=-1) * r, spec, WEIGHT_SCALE_DTYPE)
    s = scale.float().unsqueeze(-1)  # [R, n, G, 1]
    # quantize_int_with then dequantize_int, fused in place: the same operations in the same order
    q = (wg / s).round_()
    if spec.symmetric:
        off = float(integer.zero_offset(spec))
        q.clamp_(-off, off - 1).add_(off).sub_(off)
    else:
        z = zero.float().unsqueeze(-1)
        q.add_(z).clamp_(0, (1 << spec.bits) - 1).sub_(z)
    err = q.mul_(s).sub_(wg).pow_(2).sum(-1)  # [R, n, G]
    best = err.argmin(dim=0)  # first (smallest ratio) on ties
    return _select(scale, best), _select(zero, best)


@torch.no_grad()
def mse_clip_quantize(w: torch.Tensor, spec: FormatSpec, grid: tuple[float, ...] = CLIP_GRID) -> QuantizedWeight:
    """Int weight [N, K] with each scale group's clipping ratio chosen to minimize weight MSE."""
    if spec.kind != "int" or spec.granularity == "tensor":
        return QuantizedWeight.quantize(w, spec)
    w = w.float()
    rows = max(1, _SEARCH_ELEMENTS // (w.shape[-1] * len(grid)))
    parts = [_best_qparams(w[i:i + rows], spec, grid) for i in range(0, w.shape[0], rows)]
    s = torch.cat([p[0] for p in parts])
    z = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
    return QuantizedWeight.from_codes(integer.quantize_int_with(w, s, z, spec), s, z, spec)


def top_m(num_experts: int, top_k: int, ratio: float) -> int:
    """m = k + floor(P (n - k)) experts the KL is restricted to."""
    return top_k + int(ratio * (num_experts - top_k))


def kl_top(z_fp: torch.Tensor, z_q: torch.Tensor, m: int) -> torch.Tensor:
    """KL between FP and quantized routing probabilities on the FP top-m experts, batch mean:
    (1/T) sum_t sum_{e in top-m(z_fp)} p_fp,e (log p_fp,e - log p_q,e). Probabilities are softmaxes
    over all experts, not renormalized over the top-m (the code's `post_attn=True` path)."""
    idx = z_fp.topk(m, dim=-1).indices
    lp_fp = F.log_softmax(z_fp.float(), dim=-1).gather(-1, idx)
    lp_q = F.log_softmax(z_q.float(), dim=-1).gather(-1, idx)
    return (lp_fp.exp() * (lp_fp - lp_q)).sum(-1).mean()


@torch.no_grad()
def align_router(w: torch.Tensor, x: torch.Tensor, spec: FormatSpec, top_k: int, ratio: float = 0.0,
                 objective: str = "mse_kl", grid: tuple[float, ...] = CLIP_GRID) -> tuple[QuantizedWeight, dict]:
    """Router weight [E, H] quantized with the clipping ratio that best keeps the routing of inputs x [T, H].

    objective 'mse_kl' (the paper's dual objective): per router row, mean logit MSE of that row plus
    the KL-Top of the whole router with every row clipped at the same ratio; each row takes its best
    ratio. 'kl' (the official run.sh default, `per_channel_kl_top0`): KL-Top alone, so one ratio for
    all rows. The logit MSE is a mean over tokens (the code sums; a mean keeps it commensurate with
    the batch-mean KL)."""
    if objective not in ("mse_kl", "kl"):
        raise ValueError(f"unknown router objective {objective!r}; allowed: mse_kl, kl")
    x, w = x.float(), w.float()
    z_fp = x @ w.T  # [T, E]
    m = top_m(w.shape[0], top_k, ratio)
    scale, zero, deq = _grid_qparams(w, spec, grid)  # deq [R, E, H]
    z_q = torch.einsum("th,reh->rte", x, deq)
    idx = z_fp.topk(m, dim=-1).indices
    lp_fp = F.log_softmax(z_fp, dim=-1).gather(-1, idx)
    lp_q = F.log_softmax(z_q, dim=-1).gather(-1, idx.expand(len(grid), *idx.shape))
    kl = (lp_fp.exp() * (lp_fp - lp_q)).sum(-1).mean(-1)  # [R]
    score = kl.unsqueeze(-1).expand(len(grid), w.shape[0])
    if objective == "mse_kl":
        score = score + (z_q - z_fp).pow(2).mean(1)  # [R, E]
    best = score.argmin(dim=0)  # [E]
    best_g = best.reshape(-1, *([1] * (scale.dim() - 2))).expand(scale.shape[1:])
    s, z = _select(scale, best_g), _select(zero, best_g)
    qw = QuantizedWeight.from_codes(integer.quantize_int_with(w, s, z, spec), s, z, spec)
    chosen = torch.tensor(grid)[best]
    z_q = x @ qw.dequantize().T
    info = {"objective": objective, "top_m": m, "clip_ratio_mean": round(float(chosen.mean()), 4),
            "kl_top": round(float(kl_top(z_fp, z_q, m)), 6)}
    return qw, info
