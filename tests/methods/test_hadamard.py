"""Hadamard + RTN baseline: an orthogonal fixed rotation, exact before quantization, stored once per
layer, and better than plain RTN on planted outliers."""
import torch

import quantkit
from quantkit.config import Recipe
from quantkit.io import save_checkpoint
from quantkit.methods.hadamard import hadamard_matrix, randomized_hadamard
from quantkit.models import load_model
from quantkit.pipeline import quantize_model
from helpers import forward


def test_hadamard_matrix_known_answer_and_orthogonal():
    assert hadamard_matrix(4).tolist() == [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]
    h = randomized_hadamard(32, seed=3)
    assert torch.allclose(h @ h.T, torch.eye(32, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full((32, 32), 32 ** -0.5, dtype=torch.float64))
    assert not torch.equal(h, randomized_hadamard(32, seed=3, random_signs=False))


def test_hadamard_spreads_channel_outliers_for_int4_per_token():
    """By effect, on one linear with two 40x input channels: the rotated int4 W4A4 layer has a clearly
    smaller output error than plain RTN (measured 0.55 vs 0.80). (With MXFP4 the 32-block Hadamard does
    not help here: 0.73 vs 0.51; the outlier's error is spread over its whole group.)"""
    from quantkit.config import LayerPlan
    from quantkit.layers import LayerTask, build_quantized
    from quantkit.methods import get_method

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64)
    x = torch.randn(256, 128)
    x[:, [3, 50]] *= 40
    lin.weight.data[:, [3, 50]] /= 40
    rec = Recipe.load("hadamard-w4a4")
    t = LayerTask("l", lin, "linear", LayerPlan(False, rec.weight, rec.activation))
    q = get_method("hadamard", rec).quantize_linear(t, x)
    with torch.no_grad():
        ref = lin(x)
        err = lambda m: ((m(x) - ref).norm() / ref.norm()).item()  # noqa: E731
        assert err(q) < 0.8 * err(build_quantized(t))


def test_hadamard_stored_once_per_layer_and_reloads_exactly(tmp_path):
    loaded = load_model("zoo:tiny-mixtral-outliers")
    rec = Recipe.load("hadamard-mxfp4").replace(calib_size=2)
    res = quantize_model(loaded, rec)
    rot = [r["rotation"] for r in res.layers.values() if "rotation" in r]
    assert rot and all(r["block"] == 32 and r["shared"] for r in rot)
    out = save_checkpoint(loaded, rec, res, tmp_path / "ck")
    assert torch.equal(forward(loaded.adapter, loaded.root), forward(loaded.adapter, quantkit.load(out)))
