"""Splitting and batching calibration calls keeps inputs that adapters declare unbatched (FLUX's positional
ids [tokens, 3]) whole, even when their length equals the batch size (the digits-mmdit EDA-DM failure: 16
text tokens in calls of 16 rows were cut row by row and then concatenated to 32)."""
import pytest
import torch

from quantkit.calib.selection import trajectory_sample
from quantkit.adapters.base import CallArgs
from quantkit.errors import QuantkitError
from quantkit.recon.data import collate, split_call


def flux_call(rows: int, txt: int, img: int = 4) -> CallArgs:
    g = torch.Generator().manual_seed(0)
    return CallArgs((), {"hidden_states": torch.randn(rows, img, 8, generator=g),
                         "encoder_hidden_states": torch.randn(rows, txt, 8, generator=g),
                         "pooled_projections": torch.randn(rows, 8, generator=g),
                         "timestep": torch.full((rows,), 0.5),
                         "img_ids": torch.arange(img * 3.0).reshape(img, 3),
                         "txt_ids": torch.arange(txt * 3.0).reshape(txt, 3)})


def test_ids_as_long_as_the_batch_stay_whole():
    call = flux_call(rows=16, txt=16)
    parts = split_call(call, group=1)
    assert len(parts) == 16
    for i, p in enumerate(parts):
        assert p.kwargs["hidden_states"].shape == (1, 4, 8)
        assert torch.equal(p.kwargs["hidden_states"], call.kwargs["hidden_states"][i:i + 1])
        assert torch.equal(p.kwargs["txt_ids"], call.kwargs["txt_ids"])
    two = collate(parts[:2])
    assert two.kwargs["hidden_states"].shape == (2, 4, 8)
    assert torch.equal(two.kwargs["txt_ids"], call.kwargs["txt_ids"])
    one = trajectory_sample(call, batch=16, i=3)
    assert torch.equal(one.kwargs["encoder_hidden_states"], call.kwargs["encoder_hidden_states"][3:4])
    assert torch.equal(one.kwargs["txt_ids"], call.kwargs["txt_ids"])


def test_calls_with_different_ids_refuse_to_batch():
    with pytest.raises(QuantkitError, match="txt_ids"):
        collate([flux_call(rows=1, txt=5), flux_call(rows=1, txt=6)])
