"""Each rank computes only its own experts; the exchanged outputs combine to the module's own output bit for bit
(quantkit.expert_shard), simulated here in one process: the "other rank" computes its experts in the exchange."""
from __future__ import annotations

import pytest
import torch
from transformers import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

from quantkit.adapters.experts import expert_split_problem
from quantkit.expert_shard import ExpertShard, _SplitForward, pairs_by_expert
from quantkit.quantizers.smoothing import NormGroup, eaquant_scale, experts_col_absmax, group_smoothquant_scale


class TwoRanksInOne:
    """RankShare's interface for rank 0 of 2; the exchange adds what rank 1 would have computed."""

    def __init__(self, module: torch.nn.Module, impl: str) -> None:
        self.module, self.impl = module, impl
        self.rank1 = ExpertShard(self, [])

    def owns(self, e: int) -> bool:
        return e % 2 == 0

    def exchange(self, mine: dict, rows: dict, like: torch.Tensor) -> dict:
        assert all(e % 2 == 0 for e in mine)
        # what a real exchange relies on: every expert's row count known to every rank, one dtype and width
        assert all(mine[e].shape == (rows[e], like.shape[-1]) and mine[e].dtype == like.dtype for e in mine)
        other = _SplitForward(self.module, type(self.module).forward.__get__(self.module), self.impl, self.rank1)
        joined = dict(mine)
        k = self.args[1].shape[-1]
        for e, flat in pairs_by_expert(self.args[1], self.module.gate_up_proj.shape[0], self.impl).items():
            assert rows[e] == len(flat)
            if e % 2:
                tok = flat // k
                joined[e] = other.own_forward(self.args[0][tok], torch.full((len(tok), 1), e),
                                              torch.ones(len(tok), 1, dtype=self.args[0].dtype))
        return joined


def _experts(impl: str, dtype: torch.dtype, e=8, h=64, i=32) -> OlmoeExperts:
    cfg = OlmoeConfig(hidden_size=h, intermediate_size=i, num_experts=e, num_experts_per_tok=2)
    cfg._experts_implementation = impl
    m = OlmoeExperts(cfg).to(dtype)
    with torch.no_grad():
        m.gate_up_proj.normal_()
        m.down_proj.normal_()
    return m


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
@pytest.mark.parametrize("dtype,routing_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                                 (torch.bfloat16, torch.float32)])
def test_split_forward_equals_the_whole_module(impl, dtype, routing_dtype):
    """fp32 routing weights on bf16 experts (some routers keep fp32 scores) promote the weighted product: the
    split must weight in that dtype too, not in the experts' dtype."""
    torch.manual_seed(0)
    m = _experts(impl, dtype)
    assert expert_split_problem(m) is None
    for t, k in ((37, 2), (5, 3)):
        x = torch.randn(t, 64, dtype=dtype)
        idx = torch.stack([torch.randperm(8)[:k] for _ in range(t)])
        w = torch.rand(t, k).softmax(-1).to(routing_dtype)
        with torch.no_grad():
            whole = m(x, idx, w)
        share = TwoRanksInOne(m, impl)
        share.args = (x, idx, w)
        shard = ExpertShard(share, [m])
        with shard.forwards():
            split = m(x, idx, w)
        assert torch.equal(split, whole), (impl, dtype, t, k)
        assert torch.equal(m(x, idx, w), whole)  # the module's own forward is back


def test_experts_of_other_implementations_are_not_split():
    assert "batched_mm" in expert_split_problem(_experts("batched_mm", torch.float32))


class MaxOverTwo:
    """An ExpertShard for rank 0 of 2 whose reductions take rank 1's values from `other`."""

    def __init__(self, other) -> None:
        self.other = other

    def owns(self, e: int) -> bool:
        return e % 2 == 0

    def max_(self, t):
        return torch.maximum(t, self.other.pop(0))

    def any_(self, flag: bool) -> bool:
        return flag or self.other_any

    other_any = True


def test_smoothing_terms_over_owned_experts_and_a_max_across_ranks_equal_all_experts():
    torch.manual_seed(1)
    w = torch.randn(8, 16, 32)
    odd_cols = torch.stack([w[e].abs().amax(0) for e in range(1, 8, 2)]).amax(0)
    assert torch.equal(experts_col_absmax(w, MaxOverTwo([odd_cols])), experts_col_absmax(w))
    router = torch.randn(8, 32)
    g = NormGroup(torch.nn.LayerNorm(32), router=[router], experts=w)
    act = torch.rand(32) * 10
    per_expert = {e: torch.rand(32) * (e + 1) for e in (0, 1, 2, 5)}
    whole = eaquant_scale(g, act, per_expert, 0.5)
    from quantkit.quantizers.smoothing import requirement

    odd_terms = torch.stack([requirement(per_expert[e], w[e].abs().reshape(-1, 32).amax(0), 0.5) for e in (1, 5)]).amax(0)
    assert torch.equal(eaquant_scale(g, act, per_expert, 0.5, shard=MaxOverTwo([odd_terms])), whole)
    sq = group_smoothquant_scale(act, g, 0.5)
    assert torch.equal(group_smoothquant_scale(act, g, 0.5, MaxOverTwo([odd_cols])), sq)


def test_gathered_result_layout_round_trips():
    """RankShare.gather sends a result's layout as an object and its tensors by broadcast: strip then fill
    gives back the same nesting, Nones and tensors."""
    from quantkit.distributed import _fill, _strip

    a, b, c = torch.arange(3), torch.ones(2, 2, dtype=torch.bfloat16), torch.zeros(0)
    result = ((a, b, None), (c, None, None), (b.double(), None, a), None)
    tensors: list[torch.Tensor] = []
    layout = _strip(result, tensors)
    assert len(tensors) == 5 and not any(isinstance(x, torch.Tensor) for x in layout[0])
    back = _fill(layout, tensors)
    assert back[3] is None and back[0][2] is None and back[0][0] is a and back[2][2] is a and back[1][0] is c


def test_exchange_in_a_real_process_group_returns_each_experts_output_and_refuses_a_dtype_mismatch(tmp_path):
    """RankShare.exchange under gloo (one rank: its own outputs come back as they are, and the checks that
    keep the ranks' broadcasts paired hold); the 2-rank path runs in tests/test_distributed.py."""
    import torch.distributed as dist

    from quantkit.distributed import DistEnv, RankShare
    from quantkit.errors import QuantkitError

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        share = RankShare(DistEnv(0, 1, 0))
        like = torch.zeros(0, 16, dtype=torch.bfloat16)
        mine = {0: torch.randn(3, 16).bfloat16(), 2: torch.randn(5, 16).bfloat16()}
        got = share.exchange(mine, {0: 3, 2: 5}, like)
        assert set(got) == {0, 2} and all(torch.equal(got[e], mine[e]) for e in mine)
        with pytest.raises(QuantkitError, match="expected torch.bfloat16"):
            share.exchange({0: mine[0].float(), 2: mine[2]}, {0: 3, 2: 5}, like)
        with pytest.raises(QuantkitError, match="expert 2 has tokens"):
            share.exchange({0: mine[0]}, {0: 3, 2: 5}, like)
    finally:
        dist.destroy_process_group()
