"""Block reconstruction lowers the block error below round-to-nearest on a small block."""
import pytest
import torch
from torch import nn

from quantkit.adapters.base import CallArgs
from quantkit.config import ActivationConfig, LayerPlan
from quantkit.formats.spec import FormatSpec
from quantkit.layers import LayerTask, build_quantized, set_submodule
from quantkit.recon.engine import ReconConfig, reconstruct_block
from quantkit.recon.losses import LayerOutputLoss, lp_loss


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x, scale=1.0):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x))) * scale


def _setup(static_act: bool):
    torch.manual_seed(0)
    block = Block()
    act = ActivationConfig(FormatSpec("int", 8, False, "tensor"), dynamic=False) if static_act else None
    spec = FormatSpec("int", 3, False, "channel")
    tasks = [LayerTask(f"blk.{n}", getattr(block, n), "linear", LayerPlan(False, spec, act)) for n in ("fc1", "fc2")]
    fp = [CallArgs((torch.randn(8, 16),), {"scale": 1.0}) for _ in range(4)]
    q = [CallArgs((c.args[0] + 0.05 * torch.randn(8, 16),), c.kwargs) for c in fp]  # "quantized-model" inputs
    return block, tasks, q, fp


def _loss_of(block, modules, tasks, q, fp):
    import copy

    b = copy.deepcopy(block)
    for t in tasks:
        set_submodule(b, t.name[4:], modules[t.name])
    with torch.no_grad():
        return sum(lp_loss(b(*qc.args, **qc.kwargs), block(*fc.args, **fc.kwargs)).item() for qc, fc in zip(q, fp)) / len(q)


@pytest.mark.parametrize("rounding", ["adaround", "flexround"])
def test_reconstruction_beats_rtn(rounding):
    block, tasks, q, fp = _setup(static_act=True)
    cfg = ReconConfig(rounding=rounding, iters=50, batch_size=16, lr_w=1e-1 if rounding == "adaround" else 5e-3,
                      lr_a=1e-3, lambda_add=0.5, weight_init="minmax", act_init="minmax", input_prob=0.5)
    res = reconstruct_block("blk", block, tasks, q, fp, cfg)
    assert res.loss_end < res.loss_start
    rtn = {t.name: build_quantized(t) for t in tasks}
    for t in tasks:  # RTN with the same (min-max) activation ranges
        res_act = res.modules[t.name].act
        rtn[t.name].act.scale, rtn[t.name].act.zero = res_act.scale.clone(), res_act.zero.clone()
    assert _loss_of(block, res.modules, tasks, q, fp) < 0.9 * _loss_of(block, rtn, tasks, q, fp)


def test_zero_iterations_nearest_is_rtn_grid():
    block, tasks, q, fp = _setup(static_act=False)
    cfg = ReconConfig(rounding="flexround", iters=0, weight_init="minmax")
    res = reconstruct_block("blk", block, tasks, q, fp, cfg)
    for t in tasks:
        assert torch.equal(res.modules[t.name].qweight, build_quantized(t).qweight)


def test_fbr_layer_sets():
    assert LayerOutputLoss(["a", "b", "c"], 1.0, "all").names == ["a", "b", "c"]
    assert LayerOutputLoss(["a", "b", "c"], 1.0, "code").names == ["a", "b"]  # official code drops the last
