"""K-means for DGQ's grouping of (min, max) points.

`sklearn_kmeans` is what DGQ's code runs (`sklearn.cluster.KMeans(n_clusters=G, random_state=0)`, the
installed scikit-learn's defaults) and what the group quantizer uses. `kmeans` is quantkit's earlier
torch implementation (k-means++ seeds, Lloyd, best of 4), kept for comparison: on synthetic outlier-heavy
(min, max) point sets its partitions differ from scikit-learn's (median adjusted Rand index 0.65 over
40 sets) at a similar inertia (median ratio 0.97); see docs/methods-dgq.md.
"""
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


def sklearn_kmeans(points: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Cluster labels [N] (int64, 0..k'-1, no empty cluster) of points [N, D] by scikit-learn's KMeans
    with random_state=seed, as DGQ's code; k' = min(k, distinct points)."""
    import warnings

    import numpy as np
    from sklearn.cluster import KMeans

    pts = points.detach().double().cpu().numpy()
    k = min(k, pts.shape[0], np.unique(pts, axis=0).shape[0])
    if k <= 1:
        return torch.zeros(pts.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # k <= distinct points, so a ConvergenceWarning cannot mean duplicate centres; nothing is lost
        warnings.simplefilter("ignore", category=UserWarning)
        labels = KMeans(n_clusters=k, random_state=seed).fit(pts).labels_
    _, dense = np.unique(labels, return_inverse=True)
    return torch.from_numpy(dense.astype(np.int64))
