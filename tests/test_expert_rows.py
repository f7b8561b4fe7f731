"""A rank of the streamed expert split keeps only its experts' rows of the quantized experts (quantkit.expert_shard):
its quantized forward, combined with the other rank's outputs, equals the whole module bit for bit without
reading the rows it does not hold, and the rows both ranks write into one output shard load as the whole tensor.
Two ranks are simulated in one process."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

from quantkit.config import ActivationConfig
from quantkit.expert_shard import ExpertShard, _SplitForward, expert_rows, pairs_by_expert
from quantkit.formats.spec import FormatSpec
from quantkit.layers import make_act
from quantkit.nn import QuantExperts
from quantkit.quantizers.online_rotation import OnlineRotation
from quantkit.streaming import _Shard


def _quant_experts(dtype: torch.dtype, rotate: bool, act: bool, e=8, h=64, i=32) -> QuantExperts:
    cfg = OlmoeConfig(hidden_size=h, intermediate_size=i, num_experts=e, num_experts_per_tok=2)
    m = OlmoeExperts(cfg).to(dtype)
    with torch.no_grad():
        m.gate_up_proj.normal_()
        m.down_proj.normal_()
    a = make_act(ActivationConfig(FormatSpec("int", 8, False, "channel")), "experts") if act else None
    q = QuantExperts.from_experts(m, FormatSpec("int", 4, False, "group", 32), a, copy.deepcopy(a))
    if rotate:
        def rot(k: int) -> OnlineRotation:
            r = torch.linalg.qr(torch.randn(e, k // 16, 16, 16, dtype=torch.float64))[0]
            return OnlineRotation.from_parts(k, r, torch.stack([torch.randperm(k) for _ in range(e)]), r.flip(-1),
                                             experts=e)
        q.rot_in, q.rot_mid = rot(h), rot(i)
    q.cache_dequantized = False  # (as in a streamed walk: per expert, no dense copy)
    return q


class TwoRanks:
    """RankShare's interface for rank 0 of 2: rank 1's outputs come from the whole module's own forward."""

    def __init__(self, whole: QuantExperts) -> None:
        self.whole = whole
        self.is_main = True

    def owns(self, e: int) -> bool:
        return e % 2 == 0

    def exchange(self, mine: dict, rows: dict, like: torch.Tensor) -> dict:
        assert all(e % 2 == 0 for e in mine)
        # what a real exchange relies on: every expert's row count known to every rank, one dtype and width
        assert all(mine[e].shape == (rows[e], like.shape[-1]) and mine[e].dtype == like.dtype for e in mine)
        x, idx = self.args
        k = idx.shape[-1]
        joined = dict(mine)
        for e, flat in pairs_by_expert(idx, self.whole.num_experts, "token_major").items():
            assert rows[e] == len(flat)
            if e % 2:
                tok = flat // k
                joined[e] = self.whole(x[tok], torch.full((len(tok), 1), e), torch.ones(len(tok), 1, dtype=x.dtype))
        return joined


@pytest.mark.parametrize("dtype,routing_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                                 (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("rotate,act", [(False, False), (True, True)])
def test_rank_with_its_rows_only_computes_the_whole_modules_output(dtype, routing_dtype, rotate, act):
    torch.manual_seed(0)
    whole = _quant_experts(dtype, rotate, act)
    mine = copy.deepcopy(whole)
    for name, t in expert_rows(mine).items():  # the rows rank 0 does not hold: anything read from them shows
        if t.is_floating_point():
            t[1::2] = float("nan")
        else:
            t[1::2] = 0 if name.endswith("perm") else 255
    share = TwoRanks(whole)
    shard = ExpertShard(share, [], rows_only=True)
    for t, k in ((37, 2), (5, 3)):
        x = torch.randn(t, 64, dtype=dtype)
        idx = torch.stack([torch.randperm(8)[:k] for _ in range(t)])
        w = torch.rand(t, k).softmax(-1).to(routing_dtype)
        with torch.no_grad():
            ref = whole(x, idx, w)
        share.args = (x, idx)
        with shard.forwards():
            shard.adopt(mine)
            assert [n for n, _ in shard.held(mine) if "gate_up_scale" in n] == [f"gate_up_scale[{e}]" for e in (0, 2, 4, 6)]
            got = mine(x, idx, w)
        assert not torch.isnan(ref).any() and torch.equal(got, ref), (dtype, routing_dtype, rotate, t, k)
        assert torch.isnan(mine(x, idx, w)).any()  # its own forward again, which reads every row


class RankOne:
    """RankShare's interface for rank 1 of 2, whose main rank has laid out the file already."""

    is_main = False

    def __init__(self, where: dict) -> None:
        self.where = where
        self.barriers = 0

    def owns(self, e: int) -> bool:
        return e % 2 == 1

    def broadcast_object(self, obj):
        assert obj is None
        return self.where

    def barrier(self) -> None:
        self.barriers += 1


@pytest.mark.parametrize("reserve", [0, 1 << 12])  # bytes after a side file, or in place after a header gap
def test_rows_of_two_ranks_written_into_one_shard_load_as_the_whole_tensor(reserve, tmp_path):
    torch.manual_seed(0)
    codes = torch.randint(0, 255, (6, 5, 3), dtype=torch.uint8)
    scales = torch.randn(6, 5, 2, dtype=torch.float16)
    before, after = torch.randn(7), torch.arange(10, dtype=torch.int32)
    rank0 = {"c": codes.clone(), "s": scales.clone()}
    for t in rank0.values():
        t[1::2] = 0  # what rank 0 does not hold
    shard = _Shard(tmp_path, "part.safetensors", reserve)
    shard.add("before", before)
    where = {k: shard.add(k, rank0[k], lambda e: e % 2 == 0) for k in ("c", "s")}
    shard.add("after", after)
    other = RankOne(where)
    ExpertShard(other, [], rows_only=True).write_rows(None, {"c": codes, "s": scales})
    assert other.barriers == 1
    shard.close()
    back = load_file(str(tmp_path / "part.safetensors"))
    assert torch.equal(back["c"], codes) and torch.equal(back["s"], scales)
    assert torch.equal(back["before"], before) and torch.equal(back["after"], after)


def test_a_ranks_rows_file_holds_exactly_its_rows_in_order(tmp_path):
    """The progress folder's NNNNN.rows-R file (written row by row, no stacked copy) reads back with safetensors
    as the rank's rows stacked, for every dtype a quantized experts module stores."""
    from quantkit.walk_resume import _save_own_rows

    torch.manual_seed(0)
    tensors = {"gate_up_qweight": torch.randint(0, 256, (5, 6, 3), dtype=torch.uint8),
               "gate_up_scale": torch.randn(5, 6, 1).half(),
               "rot_in.perm": torch.stack([torch.randperm(7) for _ in range(5)]).to(torch.int16),
               "rot_in.rot1": torch.randn(5, 1, 4, 4).bfloat16(),
               "down_bias": torch.randn(5, 3)}
    for owns in (lambda e: e % 2 == 1, lambda e: e % 3 == 0):
        _save_own_rows(tmp_path / "rows.safetensors", tensors, owns)
        got = load_file(str(tmp_path / "rows.safetensors"))
        assert set(got) == set(tensors)
        for k, t in tensors.items():
            want = torch.stack([t[e] for e in range(5) if owns(e)])
            assert got[k].dtype == t.dtype and torch.equal(got[k], want), k
