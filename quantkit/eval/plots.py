"""Pictures a person would rather look at: sample grids and metric-vs-bits plots."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def samples_grid(quantized: torch.Tensor, reference: torch.Tensor | None, path: Path, k: int = 16) -> None:
    """Top half: full precision; bottom half: quantized, on the same seeds and prompts."""
    from PIL import Image

    cols = min(k, 8)
    parts = [quantized[:k]] if reference is None else [reference[:k], quantized[:k]]
    grids = [_grid(p, cols) for p in parts]
    sep = torch.zeros(3, 4, grids[0].shape[-1])
    canvas = torch.cat([grids[0], sep, grids[1]], dim=1) if len(grids) == 2 else grids[0]
    arr = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(path)


def _grid(images: torch.Tensor, cols: int) -> torch.Tensor:
    n, c, h, w = images.shape
    rows = -(-n // cols)
    canvas = torch.ones(c, rows * (h + 2), cols * (w + 2))
    for i, im in enumerate(images):
        r, col = divmod(i, cols)
        canvas[:, r * (h + 2) + 1:r * (h + 2) + 1 + h, col * (w + 2) + 1:col * (w + 2) + 1 + w] = im
    return canvas


def require_matplotlib() -> None:
    """matplotlib is the optional `plots` extra: say so before any work is done."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        from quantkit.errors import QuantkitError

        raise QuantkitError("metric-vs-bits plots (eval --compare with --out) need matplotlib: "
                            "pip install 'quantkit[plots]'")


def metric_vs_bits_plot(rows: list[dict[str, Any]], metric: str, path: Path) -> None:
    """One point per evaluated model: bits per weight on x, the metric on y."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for r in rows:
        if metric in r["metrics"]:
            ax.scatter(r["bits_per_weight"], r["metrics"][metric])
            ax.annotate(Path(r["model"]).name, (r["bits_per_weight"], r["metrics"][metric]), fontsize=7)
    ax.set_xlabel("bits per weight (quantized layers)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
