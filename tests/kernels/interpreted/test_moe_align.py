"""The one-launch MoE alignment gives exactly moe.moe_align's plan, and each sorted pair's token and weight."""
from __future__ import annotations

import pytest
import torch

from quantkit.kernels.moe import moe_align
from quantkit.kernels.moe_align import moe_align_fused


@pytest.mark.parametrize("t,k,e,block", [(1, 8, 64, 16), (5, 2, 6, 16), (150, 2, 4, 64), (97, 8, 257, 16),
                                         (40, 3, 5, 4)])
def test_fused_align_equals_torch_plan(t: int, k: int, e: int, block: int) -> None:
    idx = torch.randint(0, e, (t, k))
    idx[0, -1] = e  # transformers' value for a masked-out slot
    if t > 3:
        idx[3, 0] = -1  # any index outside [0, E) is masked too
    weights = torch.rand(t, k, dtype=torch.float16)
    want = moe_align(idx, e, block)
    got = moe_align_fused(idx, e, block, weights)
    for name in ("order", "expert", "start", "end"):  # (97 x 8 pairs: several 128-pair chunks)
        assert torch.equal(got[name], want[name]), name
    order = want["order"].long()
    assert torch.equal(got["token"], (order // k).to(torch.int32))
    assert torch.equal(got["weight"], weights.reshape(-1).float()[order])
