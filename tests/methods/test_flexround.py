"""FlexRound on the DiT and the bare UNet: quantize, save, reload to the identical output."""
import pytest
import torch

import quantkit
from quantkit.config import Recipe
from quantkit.io import save_checkpoint
from quantkit.models import load_model
from quantkit.pipeline import quantize_model
from helpers import forward


@pytest.mark.parametrize("model", ["zoo:tiny-dit"])  # the UNet paths run in test_eda_dm (tiny-sd)
def test_flexround_save_load_same_output(model, tmp_path):
    rec = Recipe.load("flexround-w4a8")
    rec = rec.replace(calib_size=2, method_options={**rec.method_options, "iters": 2, "batch_size": 2, "act_init": "minmax"})
    loaded = load_model(model)
    ref = forward(loaded.adapter, loaded.root)
    res = quantize_model(loaded, rec)
    out = save_checkpoint(loaded, rec, res, tmp_path / "ck")
    a, b = forward(loaded.adapter, loaded.root), forward(loaded.adapter, quantkit.load(out))
    assert torch.equal(a, b) and not torch.equal(a, ref)
    assert ((a - ref).norm() / ref.norm()).item() < 0.5
