"""Fused MoE on the repacked layout (split-K down projection, atomic scatter) against qexperts_reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantkit import kernels
from quantkit.formats import FormatSpec, QuantizedWeight
from quantkit.kernels.configs import TileConfig
from quantkit.kernels.packed_moe import is_silu, qexperts_packed
from quantkit.kernels.reference import qexperts_reference
from quantkit.kernels.repack import repack

from .helpers import HALF_TOL, rel_err

SPECS = [FormatSpec(bits=4, granularity="group", group_size=32), FormatSpec(bits=4, granularity="group", group_size=128),
         FormatSpec(bits=4, symmetric=False, granularity="group", group_size=64), FormatSpec(bits=8, granularity="channel"),
         FormatSpec(bits=2, granularity="group", group_size=64), FormatSpec.mxfp4(),
         FormatSpec(bits=3, symmetric=False, granularity="group", group_size=64)]


def _experts(spec: FormatSpec, e: int, h: int, inter: int) -> tuple[QuantizedWeight, QuantizedWeight]:
    return (QuantizedWeight.quantize(torch.randn(e, 2 * inter, h), spec),
            QuantizedWeight.quantize(torch.randn(e, h, inter), spec))


def _routing(t: int, e: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.stack([torch.randperm(e - 1)[:k] for _ in range(t)])  # expert e-1 gets no token
    if t > 1:
        idx[1, -1] = e  # transformers' value for a masked-out slot
    return idx, torch.rand(t, k).softmax(-1)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short)
@pytest.mark.parametrize("t,split_k", [(1, 1), (1, 3), (21, 2)])
def test_matches_reference(spec: FormatSpec, t: int, split_k: int) -> None:
    e, h, inter, k = 6, 128, 384, 2  # I = 384: 1.5 int2 pack blocks, down's K ends mid-block there
    gate_up, down = _experts(spec, e, h, inter)
    idx, w = _routing(t, e, k)
    x = torch.randn(t, h, dtype=torch.float16)
    y = qexperts_packed(x, idx, w, repack(gate_up), repack(down), F.silu, config=TileConfig(16, 64, 0),
                        split_k=split_k)
    assert rel_err(y, qexperts_reference(x, idx, w, gate_up, down, F.silu)) < HALF_TOL


def test_64_experts_top8_with_biases_and_idle_experts() -> None:
    e, h, inter, k, t = 64, 64, 64, 8, 5  # 40 pairs over 63 experts: most experts idle
    gate_up, down = _experts(FormatSpec(bits=4, granularity="group", group_size=32), e, h, inter)
    idx, w = _routing(t, e, k)
    x = torch.randn(t, h, dtype=torch.float16)
    gb, db = torch.randn(e, 2 * inter, dtype=torch.float16), torch.randn(e, h, dtype=torch.float16)
    y = qexperts_packed(x, idx, w, repack(gate_up), repack(down), F.silu, gb, db, split_k=2)
    expected = qexperts_reference(x, idx, w, gate_up, down, F.silu, None, None, gb, db)
    assert rel_err(y, expected) < HALF_TOL


def test_many_tokens_per_expert_default_tile() -> None:
    e, h, inter, k, t = 4, 128, 64, 2, 150
    gate_up, down = _experts(FormatSpec(bits=4, granularity="group", group_size=64), e, h, inter)
    idx, w = _routing(t, e, k)
    x = torch.randn(t, h, dtype=torch.float16)
    y = kernels.qexperts(x, idx, w, gate_up, down, F.silu, backend="triton")  # dispatch: the packed kernel
    assert rel_err(y, qexperts_reference(x, idx, w, gate_up, down, F.silu)) < HALF_TOL


@pytest.mark.parametrize("act_fn", [F.silu, F.gelu], ids=["swiglu-epilogue", "act-in-torch"])
@pytest.mark.parametrize("fused_align", [True, False], ids=["align-1-launch", "align-torch"])
def test_epilogue_and_alignment_paths(act_fn, fused_align: bool) -> None:
    """SiLU runs inside the gate/up kernel (I = 96: a partial last N tile), any other act_fn in torch; both
    alignments; gate/up biases go through the epilogue."""
    e, h, inter, k, t = 5, 64, 96, 2, 7
    assert is_silu(act_fn) == (act_fn is F.silu)
    gate_up, down = _experts(FormatSpec(bits=4, symmetric=False, granularity="group", group_size=32), e, h, inter)
    idx, w = _routing(t, e, k)
    x = torch.randn(t, h, dtype=torch.float16)
    gb, db = torch.randn(e, 2 * inter, dtype=torch.float16), torch.randn(e, h, dtype=torch.float16)
    y = qexperts_packed(x, idx, w, repack(gate_up), repack(down), act_fn, gb, db, config=TileConfig(16, 64, 0),
                        fused_align=fused_align)
    assert rel_err(y, qexperts_reference(x, idx, w, gate_up, down, act_fn, None, None, gb, db)) < HALF_TOL


def test_silu_modules_take_the_epilogue() -> None:
    from transformers.activations import ACT2FN

    assert is_silu(torch.nn.SiLU()) and is_silu(ACT2FN["silu"]) and not is_silu(ACT2FN["gelu"])


def test_gpt_oss_experts_run_the_fused_kernel_with_their_own_gate() -> None:
    """gpt-oss's interleaved, clamped gate (with expert biases) sits between the two packed GEMMs."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from quantkit.nn_experts import QuantExpertsCustom, build_experts

    cfg = GptOssConfig(hidden_size=64, intermediate_size=64, num_local_experts=6, num_experts_per_tok=2)
    src = GptOssExperts(cfg)
    for p in src.parameters():
        torch.nn.init.normal_(p, std=0.1)
    q = build_experts(src, FormatSpec(bits=4, granularity="group", group_size=32), None, None).half()
    assert isinstance(q, QuantExpertsCustom)
    idx, w = _routing(9, 6, 2)
    x = torch.randn(9, 64, dtype=torch.float16)
    assert kernels.choose_experts_kernel(x, q.gate_up, q.down, None, None).kernel is not None
    y = q(x, idx, w.half())
    q.kernel_backend = "reference"
    assert rel_err(y, q(x, idx, w.half())) < HALF_TOL
