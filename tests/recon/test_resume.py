"""A killed reconstruction resumes from its finished blocks and ends with the same model."""
import pytest
import torch

import quantkit.methods.eda_dm as eda_dm
from quantkit.config import Recipe
from quantkit.models import load_model
from quantkit.pipeline import quantize_model
from helpers import forward

RECIPE = {"method": "eda-dm", "weight": {"kind": "int", "bits": 4, "symmetric": False},
          "activation": {"kind": "int", "bits": 8, "symmetric": False, "granularity": "tensor", "dynamic": False},
          "calib_size": 2, "method_options": {"iters": 2, "batch_size": 2, "weight_init": "minmax", "act_init": "minmax"}}


def test_resume_after_interruption(tmp_path, monkeypatch):
    rec = Recipe.from_dict(RECIPE)
    work = tmp_path / "progress"
    real = eda_dm.reconstruct_block
    calls = {"n": 0}

    def counting(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2 and counting.kill:
            raise KeyboardInterrupt
        return real(*a, **k)

    counting.kill = True
    monkeypatch.setattr(eda_dm, "reconstruct_block", counting)
    loaded = load_model("zoo:tiny-dit")
    with pytest.raises(KeyboardInterrupt):
        quantize_model(loaded, rec, work_dir=work)
    assert len(list(work.glob("*.json"))) == 1  # one block finished before the kill
    counting.kill = False
    calls["n"] = 0
    resumed = load_model("zoo:tiny-dit")
    quantize_model(resumed, rec, work_dir=work)
    n_blocks = len(resumed.adapter.blocks(resumed.root))
    assert calls["n"] == n_blocks - 1  # only the unfinished blocks were reconstructed
    fresh = load_model("zoo:tiny-dit")
    quantize_model(fresh, rec)
    assert torch.equal(forward(resumed.adapter, resumed.root), forward(fresh.adapter, fresh.root))
