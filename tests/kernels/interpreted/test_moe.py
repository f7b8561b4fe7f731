"""Fused MoE grouped GEMM (W{3,4,8}A16 int, MXFP4 W4A16) against qexperts_reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantkit.formats import FormatSpec, QuantizedWeight
from quantkit.kernels.configs import TileConfig
from quantkit.kernels.moe import moe_align, qexperts_triton
from quantkit.kernels.reference import qexperts_reference

from .helpers import HALF_TOL, rel_err

SPECS = [FormatSpec(bits=4, granularity="group", group_size=32), FormatSpec(bits=4, granularity="group", group_size=128),
         FormatSpec(bits=3, symmetric=False, granularity="group", group_size=64), FormatSpec(bits=8, granularity="channel"),
         FormatSpec.mxfp4()]


def _experts(spec: FormatSpec, e: int, h: int, inter: int) -> tuple[QuantizedWeight, QuantizedWeight]:
    return (QuantizedWeight.quantize(torch.randn(e, 2 * inter, h), spec),
            QuantizedWeight.quantize(torch.randn(e, h, inter), spec))


def _routing(t: int, e: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.stack([torch.randperm(e - 1)[:k] for _ in range(t)])  # expert e-1 gets no token
    if t > 1:
        idx[1, -1] = e  # transformers' value for a masked-out slot
    return idx, torch.rand(t, k).softmax(-1)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short)
@pytest.mark.parametrize("t", [1, 21])
def test_matches_reference(spec: FormatSpec, t: int) -> None:
    e, h, inter, k = 6, 128, 128, 2
    gate_up, down = _experts(spec, e, h, inter)
    idx, w = _routing(t, e, k)
    x = torch.randn(t, h, dtype=torch.float16)
    y = qexperts_triton(x, idx, w, gate_up, down, F.silu, config=TileConfig(16, 64, 64))
    assert rel_err(y, qexperts_reference(x, idx, w, gate_up, down, F.silu)) < HALF_TOL


def test_many_tokens_per_expert_with_biases() -> None:
    """Several BLOCK_M blocks per expert, a partial last block, expert biases, default tile."""
    e, h, inter, k, t = 4, 64, 64, 2, 150
    gate_up, down = _experts(FormatSpec(bits=4, granularity="group", group_size=64), e, h, inter)
    idx, w = _routing(t, e, k)
    x = torch.randn(t, h, dtype=torch.float16)
    gb, db = torch.randn(e, 2 * inter, dtype=torch.float16), torch.randn(e, h, dtype=torch.float16)
    y = qexperts_triton(x, idx, w, gate_up, down, F.silu, None, None, gb, db)
    expected = qexperts_reference(x, idx, w, gate_up, down, F.silu, None, None, gb, db)
    assert rel_err(y, expected) < HALF_TOL


def test_align_blocks_cover_each_pair_once() -> None:
    e, block = 5, 4
    idx = torch.tensor([[0, 3], [3, 5], [3, 1], [0, 3], [3, 3], [1, 0]])  # 5 = masked slot
    plan = moe_align(idx, e, block)
    flat = idx.reshape(-1)
    seen = []
    for b in range(plan["expert"].numel()):
        ex = int(plan["expert"][b])
        if ex >= e:
            continue
        rows = plan["order"][int(plan["start"][b]):int(plan["end"][b])][:block]
        assert 0 < rows.numel() <= block
        assert (flat[rows.long()] == ex).all()
        seen += rows.tolist()
    assert sorted(seen) == sorted(i for i in range(flat.numel()) if flat[i] < e)
