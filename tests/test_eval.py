"""quantkit eval: FID sanity, diffusion and language-model reports."""
import json

import pytest
import torch

from quantkit.eval.clip_features import load_clip
from quantkit.eval.diffusion import _fid, feature_extractor
from quantkit.eval.lm import router_fidelity
from quantkit.tiny_models import tiny_model_path
from helpers import cli, one_line_error


def test_fid_of_a_set_against_itself_is_zero_and_rises_with_noise():
    clip = load_clip(tiny_model_path("tiny-clip"))
    fx = feature_extractor(clip, None)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(200, 3, 16, 16, generator=g)
    assert abs(_fid(fx, a, a)) < 1e-6
    noisy = [_fid(fx, a, (a + s * torch.randn(a.shape, generator=g)).clamp(0, 1)) for s in (0.05, 0.2, 0.5)]
    assert 0 < noisy[0] < noisy[1] < noisy[2]


def test_router_fidelity_of_identical_routing():
    logits = torch.randn(50, 8)
    idx = logits.topk(2, -1).indices
    rec = {"r": [logits, idx]}
    f = router_fidelity(rec, rec)
    assert f["router_topk_agreement"] == 1.0 and f["router_topk_exact"] == 1.0 and abs(f["router_kl"]) < 1e-6
    assert sum(f["tokens_per_expert"]["r"]) == 100


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ev") / "moe"
    r = cli("quantize", "zoo:tiny-mixtral", "--out", out, "--recipe", "rtn-w4a8")
    assert r.exit_code == 0, r.output
    return out


def test_lm_eval_report(moe_ckpt, tmp_path):
    js = tmp_path / "r.json"
    r = cli("eval", moe_ckpt, "--n", "2", "--seq-len", "64", "--json", js)
    assert r.exit_code == 0, r.output
    rep = json.loads(js.read_text())
    assert {"model", "metrics", "n", "seed"} <= set(rep)
    m = rep["metrics"]
    assert m["perplexity"] > 1 and 0 <= m["router_topk_agreement"] <= 1 and m["router_kl"] >= 0
    assert rep["details"]["tokens_per_expert"]
    # The full-precision model against itself routes identically.
    r = cli("eval", "zoo:tiny-mixtral", "--n", "2", "--seq-len", "64", "--reference", "zoo:tiny-mixtral", "--json", js)
    assert r.exit_code == 0, r.output
    fp = json.loads(js.read_text())["metrics"]
    assert fp["router_topk_agreement"] == 1.0 and fp["router_kl"] < 1e-9


def test_diffusion_eval_report(tmp_path):
    from PIL import Image

    ck = tmp_path / "sd"
    assert cli("quantize", "zoo:tiny-sd", "--out", ck, "--recipe", "rtn-w8a8").exit_code == 0
    real = tmp_path / "real"
    real.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        arr = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(real / f"{i}.png")
    js = tmp_path / "d.json"
    out = tmp_path / "out"
    r = cli("eval", ck, "--n", "6", "--steps", "2", "--clip-model", "zoo:tiny-clip", "--real-images", real,
            "--json", js, "--out", out, "--metrics", "fid_real,fid_fp,clip_score")
    assert r.exit_code == 0, r.output
    m = json.loads(js.read_text())["metrics"]
    assert set(m) == {"fid_clip_real", "fid_clip_fp", "clip_score"}  # named for the CLIP features used
    assert all(v == v for v in m.values())  # no NaN
    assert (out / "model0" / "samples.png").stat().st_size > 0


def test_eval_bad_metric(moe_ckpt):
    msg = one_line_error(cli("eval", moe_ckpt, "--metrics", "fid_real"))
    assert "unknown language-model metric 'fid_real'" in msg
