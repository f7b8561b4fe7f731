"""EDA-DM end to end on the tiny pipeline: a calibration file, reconstruction, save, reload, same output."""
import json

import torch
import yaml

import quantkit
from quantkit.config import Recipe
from helpers import cli, forward
from quantkit.models import load_model


def _recipe(tmp_path, name="eda-dm-w4a8"):
    d = Recipe.load(name).to_dict()
    d["calib_size"] = 2
    d["method_options"].update(iters=1, batch_size=2, weight_init="minmax", act_init="minmax")
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_eda_dm_cli_with_calib_file_and_flexround(tmp_path):
    calib = tmp_path / "c.safetensors"
    r = cli("calib", "select", "zoo:tiny-sd", "--size", "2", "--steps", "2", "--batch", "2", "--out", calib)
    assert r.exit_code == 0, r.output
    out = tmp_path / "ck"
    r = cli("quantize", "zoo:tiny-sd", "--recipe", _recipe(tmp_path), "--calib", calib, "--rounding", "flexround",
            "--out", out)
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["recipe"]["method"] == "eda-dm" and meta["recipe"]["method_options"]["rounding"] == "flexround"
    assert meta["calibration"]["selection"]["method"] == "eda-dm"
    assert not (tmp_path / ".ck.progress").exists()  # progress folder removed after a complete save
    pipe = quantkit.load(out)
    loaded = load_model("zoo:tiny-sd")
    a = forward(loaded.adapter, pipe.unet)
    assert torch.isfinite(a).all()
    png = tmp_path / "g.png"
    assert cli("generate", out, "--prompt", "a cat", "--n", "1", "--steps", "2", "--out", png).exit_code == 0


def test_eda_dm_on_dit_save_load_same_output(tmp_path):
    from quantkit.io import save_checkpoint
    from quantkit.pipeline import quantize_model

    loaded = load_model("zoo:tiny-dit")  # a bare model: synthetic calibration inputs, FBR reconstruction
    rec = Recipe.load(_recipe(tmp_path))
    res = quantize_model(loaded, rec)
    assert res.calibration["used"]
    out = save_checkpoint(loaded, rec, res, tmp_path / "ck")
    assert torch.equal(forward(loaded.adapter, loaded.root), forward(loaded.adapter, quantkit.load(out)))
