"""The MSE clipping search (DuQuant/EAQuant weights) picks, per scale group, the grid ratio whose
round-to-nearest weights have the least squared error: checked against a plain loop over the ratios,
including the row chunking of the fast path (a matrix larger than one chunk)."""
import pytest
import torch

from quantkit.formats import integer
from quantkit.formats.qweight import WEIGHT_SCALE_DTYPE
from quantkit.formats.spec import FormatSpec
from quantkit.quantizers import clip_search
from quantkit.quantizers.clip_search import CLIP_GRID, mse_clip_quantize


def reference_scales(w: torch.Tensor, spec: FormatSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    best_err, best = None, None
    for r in CLIP_GRID:  # ascending: a tie keeps the smaller ratio
        scale, zero = integer.int_qparams(w * r, spec, WEIGHT_SCALE_DTYPE)
        deq = integer.dequantize_int(integer.quantize_int_with(w, scale, zero, spec), scale, zero, spec)
        err = (deq - w).pow(2).reshape(*scale.shape, -1).sum(-1)
        if best_err is None:
            best_err, best = err, (scale.clone(), None if zero is None else zero.clone())
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best[0][better] = scale[better]
        if zero is not None:
            best[1][better] = zero[better]
    return best


@pytest.mark.parametrize("spec", [FormatSpec(kind="int", bits=4, symmetric=False, granularity="channel"),
                                  FormatSpec(kind="int", bits=4, symmetric=True, granularity="channel"),
                                  FormatSpec(kind="int", bits=3, symmetric=False, granularity="group", group_size=32)])
def test_mse_clip_search_matches_a_loop_over_the_grid(spec, monkeypatch):
    monkeypatch.setattr(clip_search, "_SEARCH_ELEMENTS", 101 * 64 * 7)  # 7 rows a chunk: 37 rows = 6 chunks
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 64, generator=g) * torch.rand(37, 1, generator=g) * 2
    w[0, :3] = 25.0  # an outlier row: its best ratio is well below 1
    w[5] = 0.0
    q = mse_clip_quantize(w, spec)
    scale, zero = reference_scales(w, spec)
    assert torch.equal(q.scale, scale)
    assert (q.zero is None and zero is None) or torch.equal(q.zero, zero)
    full = integer.int_qparams(w, spec, WEIGHT_SCALE_DTYPE)[0]
    assert (q.scale[0] < full[0]).all()  # the search really clips the outlier row
