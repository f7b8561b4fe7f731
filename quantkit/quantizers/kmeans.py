"""Small deterministic K-means for DGQ's grouping of (min, max) points (no sklearn dependency)."""
from __future__ import annotations

import torch


def _plus_plus_init(points: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to squared distance."""
    n = points.shape[0]
    centres = [points[torch.randint(0, n, (1,), generator=gen)].squeeze(0)]
    d2 = ((points - centres[0]) ** 2).sum(-1)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # every point sits on a centre already
            break
        idx = torch.multinomial(d2 / total, 1, generator=gen)
        centres.append(points[idx].squeeze(0))
        d2 = torch.minimum(d2, ((points - centres[-1]) ** 2).sum(-1))
    return torch.stack(centres)


def kmeans(points: torch.Tensor, k: int, seed: int = 0, n_init: int = 4, iters: int = 100) -> torch.Tensor:
    """Cluster labels [N] (int64, 0..k'-1 with k' <= k, no empty cluster) of points [N, D].

    Lloyd iterations from k-means++ seeds; the best of `n_init` runs by inertia. Fewer distinct
    points than k gives one cluster per distinct point.
    """
    pts = points.detach().double()
    n = pts.shape[0]
    k = min(k, n, torch.unique(pts, dim=0).shape[0])
    if k <= 1:
        return torch.zeros(n, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    best, best_inertia = None, float("inf")
    for _ in range(n_init):
        centres = _plus_plus_init(pts, k, gen)
        labels = torch.cdist(pts, centres).argmin(1)
        for _ in range(iters):
            centres = torch.stack([pts[labels == j].mean(0) if (labels == j).any() else centres[j]
                                   for j in range(centres.shape[0])])
            new = torch.cdist(pts, centres).argmin(1)
            if torch.equal(new, labels):
                break
            labels = new
        inertia = ((pts - centres[labels]) ** 2).sum().item()
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    _, compact = torch.unique(best, return_inverse=True)  # renumber without gaps
    return compact
