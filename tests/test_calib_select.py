"""Calibration selection: TDAC scores and allocation on hand-made features, degenerate cases, the file."""
import json

import torch

from quantkit.calib.calib_file import load_calibration
from quantkit.calib.selection import (allocate, assign_steps, density_diversity, minmax_normalize,
                                      random_allocation, uniform_allocation)
from helpers import cli, one_line_error


def test_tdac_scores_and_allocation_known_answer():
    # Three steps, one sample, two channels, one pixel: steps 0 and 1 are identical, step 2 orthogonal.
    feats = [torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1), torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1),
             torch.tensor([0.0, 1.0]).reshape(1, 2, 1, 1)]
    d, v, r = density_diversity(feats, radius=0.5)
    assert d.tolist() == [1.0, 1.0, 0.0]  # neighbours within mean squared distance 0.5
    assert v.tolist() == [1.0, 1.0, 2.0]  # sum of (1 - cos) to the other steps
    w = minmax_normalize(d) + 2.0 * minmax_normalize(v)
    assert w.tolist() == [1.0, 1.0, 2.0]
    assert allocate(w, 8) == [2, 2, 4]


def test_allocation_sums_and_degenerate_cases():
    assert minmax_normalize(torch.ones(4)).tolist() == [0.0] * 4  # all equal: no division by zero
    assert allocate(torch.zeros(5), 10) == [2] * 5  # all scores equal -> equal shares
    assert allocate(torch.ones(3), 2) == [1, 1, 0]  # over by rounding: remove from the last steps
    assert allocate(torch.ones(3), 1) == [1, 0, 0]  # fewer samples than steps
    assert allocate(torch.tensor([0.1, 0.2, 0.7]), 1) == [0, 0, 1]
    for n in (1, 3, 7, 50):
        w = torch.rand(9, generator=torch.Generator().manual_seed(n))
        assert sum(allocate(w, n)) == n and min(allocate(w, n)) >= 0
        assert sum(uniform_allocation(9, n)) == n and sum(random_allocation(9, n, 0)) == n
    assert uniform_allocation(4, 2) == [1, 0, 1, 0]  # evenly spaced steps
    assert sorted(assign_steps([2, 0, 1], 0)) == [0, 0, 2]


def test_cli_select_writes_a_loadable_file(tmp_path):
    out = tmp_path / "calib.safetensors"
    r = cli("calib", "select", "zoo:tiny-sd", "--method", "eda-dm", "--size", "3", "--steps", "2", "--batch", "2",
            "--out", out)
    assert r.exit_code == 0, r.output
    items, prov = load_calibration(out)
    assert len(items) == 3 and sum(prov["counts"]) == 3 and len(prov["density"]) == 2
    assert json.loads((tmp_path / "calib.safetensors.json").read_text())["method"] == "eda-dm"
    x = items[0].args[0]
    assert x.shape[0] == 2  # classifier-free guidance: the unconditional and the conditional row
    assert items[0].kwargs["encoder_hidden_states"].shape[0] == 2


def test_cli_select_bad_input_is_one_line(tmp_path):
    line = one_line_error(cli("calib", "select", "zoo:tiny-unet", "--out", tmp_path / "c.safetensors"))
    assert "pipeline" in line
    line = one_line_error(cli("calib", "select", "zoo:tiny-sd", "--method", "best", "--out", tmp_path / "c.safetensors"))
    assert "eda-dm" in line


def test_cli_select_takes_calib_prompts(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red bus\na blue boat\n")
    out = tmp_path / "c.safetensors"
    r = cli("calib", "select", "zoo:tiny-sd", "--method", "uniform", "--size", "2", "--steps", "2",
            "--calib-prompts", prompts, "--out", out)
    assert r.exit_code == 0, r.output
    _, prov = load_calibration(out)
    assert prov["prompts"] == str(prompts)
