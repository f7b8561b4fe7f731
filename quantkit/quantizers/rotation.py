"""DuQuant / DuQuant++ rotation search (pure torch; METHODS.md §5.1-5.2).

Row-vector convention throughout: a layer input x [T, K] becomes x @ T for an orthogonal T, and the
weight W [N, K] becomes W @ T along its input dimension, so that (x T)(W T)^T = x W^T exactly.
T = blockdiag(R1) . P . blockdiag(R2) (DuQuant) or blockdiag(R) (DuQuant++), with K/b blocks of b.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError


@dataclass(frozen=True)
class RotationConfig:
    """How the greedy block rotation is searched.

    block: rotation block size (128 DuQuant, 32 DuQuant++ = the MX group).
    steps: greedy steps (max_rotation_step).
    permute: zigzag permutation then a second rotation (DuQuant); False = one rotation (DuQuant++).
    shared: one b x b matrix for every block of the layer, as the official code does
        (`x.reshape(-1, n) @ R`; stored once: [1, b, b]); False = each block gets its own greedy
        rotation ([K/b, b, b], K/b times the storage).
    row_index_quirk: the code picks the swap target d from the *row* index of the reshaped input
        (`exchange_id % n`); False (default, the paper) = the channel holding the largest outlier.
    search_dtype: what the greedy steps compute in. The result is stored in fp16 either way.
        "float32" matches the code, which searches in the activations' own dtype, and halves the cost
        of the per-step matmul. "float64" gives quantkit's earlier rotations.
    """

    block: int = 128
    steps: int = 256
    permute: bool = True
    shared: bool = True
    row_index_quirk: bool = False
    seed: int = 0
    search_dtype: str = "float64"

    def __post_init__(self) -> None:
        if self.block < 2 or self.block & (self.block - 1):
            raise QuantkitError(f"rotation block must be a power of two >= 2, got {self.block}")
        if self.steps < 0:
            raise QuantkitError(f"rotation steps must be >= 0, got {self.steps}")
        if self.search_dtype not in ("float32", "float64"):
            raise QuantkitError(f"rotation search dtype must be float32 or float64, got {self.search_dtype!r}")

    def block_for(self, k: int) -> int:
        """The block size used for an input of K channels (the largest power of two <= block dividing K)."""
        b = math.gcd(k, self.block)
        if b < 2:
            raise QuantkitError(f"input dimension {k} has no power-of-two block of at least 2 for rotation")
        return b


def uniform_row_rotation(n: int) -> torch.Tensor:
    """R~ [n, n] orthogonal with row 0 uniform (1/sqrt n): the product of Givens rotations
    G_i on (i, i+1), cos = 1/sqrt(i+2), sin = sqrt(i+1)/sqrt(i+2), then rows/cols 0 and n-1 swapped
    (the official `get_rot.py` construction). float64."""
    return _uniform_row_rotation(n).clone()


@functools.lru_cache(maxsize=8)
def _uniform_row_rotation(n: int) -> torch.Tensor:
    r = torch.eye(n, dtype=torch.float64)
    for i in range(n - 1):
        c, s = 1.0 / math.sqrt(i + 2), math.sqrt(i + 1) / math.sqrt(i + 2)
        # G_i @ r touches rows i and i+1 only.
        ri, rj = r[i].clone(), r[i + 1].clone()
        r[i], r[i + 1] = c * ri - s * rj, s * ri + c * rj
    idx = torch.arange(n)
    idx[0], idx[n - 1] = n - 1, 0
    r = r[idx][:, idx]
    if not torch.allclose(r[0].abs(), torch.full((n,), 1 / math.sqrt(n), dtype=torch.float64), atol=1e-9):
        # The Givens chain leaves the uniform vector in the last row before the swap; fall back to the
        # symmetric Householder map e0 -> u should a sign convention ever differ.
        u = torch.full((n,), 1 / math.sqrt(n), dtype=torch.float64)
        v = torch.zeros(n, dtype=torch.float64)
        v[0] = 1.0
        v = v - u
        r = torch.eye(n, dtype=torch.float64) - 2 * torch.outer(v, v) / (v @ v)
    return r


def base_rotation(n: int, generator: torch.Generator) -> torch.Tensor:
    """R = diag(1, Q') R~ [n, n] with Q' a random orthogonal (n-1)x(n-1) (QR of a Gaussian).

    Q' multiplies from the left so the uniform row 0 survives: in x @ R the channel swapped into
    position 0 is spread evenly over the block, the rest is randomized."""
    r = uniform_row_rotation(n)
    q, rr = torch.linalg.qr(torch.randn(n - 1, n - 1, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(rr)).unsqueeze(0)
    d = torch.eye(n, dtype=torch.float64)
    d[1:, 1:] = q
    return d @ r


def _swapped_table(base: torch.Tensor) -> torch.Tensor:
    """E_d R E_d for every d -> [n, n, n]: rows and columns 0 and d of `base` exchanged (d = 0: base)."""
    n = base.shape[0]
    idx = torch.arange(n).expand(n, n).clone()
    d = torch.arange(n)
    idx[d, 0] = d
    idx[d, d] = 0
    return base[idx.unsqueeze(-1), idx.unsqueeze(-2)]


def _peak(xb: torch.Tensor) -> torch.Tensor:
    """max - min of each block of xb [G, T, b] -> [G] (amax and amin: torch's aminmax is slower on CPU)."""
    flat = xb.reshape(xb.shape[0], -1)
    return flat.amax(dim=-1) - flat.amin(dim=-1)


@torch.no_grad()
def greedy_block_rotation(x: torch.Tensor, cfg: RotationConfig, b: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy outlier-driven rotation of x [T, K] in blocks of b -> [K/b, b, b], or [1, b, b] when
    cfg.shared (float64).

    Each step finds a block's largest-magnitude element, swaps its channel d into position 0 and
    rotates by E_d R E_d (spreading it over the block); the prefix of steps with the smallest
    peak (max - min of the block) is kept."""
    t, k = x.shape
    g = k // b
    dt = getattr(torch, cfg.search_dtype)
    swapped = _swapped_table(base_rotation(b, generator)).to(dt)  # [b, b, b]: every E_d R E_d, built once
    # Blocks first, so each block's (token, channel) elements are one contiguous row-major run: the
    # argmax and the peak reduce over a view, and the rotation is one batched matmul per step.
    if cfg.shared:  # the code: one matrix for all blocks, searched on x.reshape(-1, b)
        xb = x.to(dt).reshape(1, t * g, b)
    else:
        xb = x.to(dt).reshape(t, g, b).transpose(0, 1).contiguous()  # [G, T, b]
    nb = xb.shape[0]
    total = torch.eye(b, dtype=dt).expand(nb, b, b).clone()
    best = total.clone()
    best_peak = _peak(xb)
    for _ in range(cfg.steps):
        pos = xb.abs().reshape(nb, -1).argmax(dim=-1)  # row-major over (token, channel)
        d = (pos // b) % b if cfg.row_index_quirk else pos % b
        rd = swapped[d]  # [nb, b, b]
        xb = xb @ rd
        total = total @ rd
        peak = _peak(xb)
        better = peak < best_peak
        best_peak = torch.where(better, peak, best_peak)
        best[better] = total[better]
    return best.double()


def zigzag_permutation(x: torch.Tensor, b: int) -> torch.Tensor:
    """Channel order [K] dealing channels by descending max|x_c| into the K/b blocks in zigzag order
    (0, 1, .., G-1, G-1, .., 0, 0, 1, ..), so each block gets a similar share of large channels."""
    k = x.shape[-1]
    g = k // b
    order = torch.argsort(x.abs().amax(dim=0), descending=True, stable=True)
    blocks: list[list[int]] = [[] for _ in range(g)]
    for i, c in enumerate(order.tolist()):
        cycle, pos = divmod(i, g)
        blocks[pos if cycle % 2 == 0 else g - 1 - pos].append(c)
    return torch.tensor([c for blk in blocks for c in blk], dtype=torch.long)


def apply_blocks(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x [..., K] times blockdiag(rot) with rot [K/b, b, b] (or [1, b, b]: one matrix for every block);
    fp32 accumulation, result in x's dtype (the same arithmetic as the fused kernels' rotate_blocks for b = 32)."""
    b = rot.shape[-1]
    g = x.shape[-1] // b
    xb = x.reshape(*x.shape[:-1], g, 1, b).float()
    return (xb @ rot.to(x.dtype).float()).reshape(x.shape).to(x.dtype)


@torch.no_grad()
def fit_rotation(x: torch.Tensor, cfg: RotationConfig) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(rot1 [G, b, b], perm [K] or None, rot2 [G, b, b] or None) for calibration inputs x [T, K];
    G = 1 when cfg.shared (one matrix for every block), else K/b.

    x is assumed already smoothed. float64 matrices (OnlineRotation stores them in fp16)."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise QuantkitError(f"rotation needs calibration inputs [tokens, channels], got shape {tuple(x.shape)}")
    b = cfg.block_for(x.shape[-1])
    gen = torch.Generator().manual_seed(cfg.seed)
    x = x.double()
    # Rounded to the stored fp16 values now, so the permutation and the second rotation are fitted on
    # exactly what inference computes.
    rot1 = greedy_block_rotation(x, cfg, b, gen).half().double()
    if not cfg.permute:
        return rot1, None, None
    x1 = _apply64(x, rot1)
    perm = zigzag_permutation(x1, b)
    rot2 = greedy_block_rotation(x1[:, perm], cfg, b, gen).half().double()
    return rot1, perm, rot2


def _apply64(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    b = rot.shape[-1]
    g = x.shape[-1] // b
    return (x.reshape(-1, g, 1, b) @ rot.double()).reshape(x.shape)


def transform_rows(w: torch.Tensor, rot1: torch.Tensor, perm: torch.Tensor | None,
                   rot2: torch.Tensor | None) -> torch.Tensor:
    """w [..., K] @ blockdiag(rot1) P blockdiag(rot2) in float64 (OnlineRotation passes the blocks'
    inverse transposes for weights: W' = W T^-T, so that (x T)(W')^T = x W^T exactly)."""
    out = _apply64(w.double(), rot1)
    if perm is not None:
        out = out[..., perm]
        out = _apply64(out, rot2)
    return out
