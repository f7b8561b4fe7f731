"""DGQ: group axis choice and clustering, log2 attention quantizer, timestep slots, attention processor,
and the method end to end on a tiny Stable Diffusion pipeline."""
import json

import pytest
import torch

import quantkit
from quantkit.config import Recipe
from quantkit.errors import QuantkitError
from quantkit.io import save_checkpoint
from quantkit.models import load_model
from quantkit.pipeline import quantize_model
from quantkit.quantizers.group_act import CHANNEL, TOKEN, GroupActQuantizer
from quantkit.quantizers.kmeans import kmeans, sklearn_kmeans
from quantkit.quantizers.log_attention import LogProbQuantizer
from quantkit.quantizers.step_clock import StepClock


def _calibrated(x: torch.Tensor, layout: str, groups: int = 8) -> GroupActQuantizer:
    q = GroupActQuantizer(6, groups, layout, timestep_aware=False)
    q.observing = True
    q(x)
    q.finalize()
    q.observing = False
    return q


def _outlier_group_is_private(q: GroupActQuantizer, n: int, outliers: list[int]) -> None:
    labels = q.group_of[0, :n].long()
    outlier_groups = set(labels[outliers].tolist())
    rest = set(labels[[i for i in range(n) if i not in outliers]].tolist())
    assert outlier_groups and not outlier_groups & rest, (outlier_groups, rest)


@pytest.mark.parametrize("layout", ["last", "conv"])
def test_channel_outliers_found(layout):
    g = torch.Generator().manual_seed(0)
    if layout == "last":
        x = torch.randn(4, 64, 32, generator=g)  # [B, L tokens, C channels]
        x[..., [3, 17]] *= 40
    else:
        x = torch.randn(4, 32, 8, 8, generator=g)  # [N, C, H, W]
        x[:, [3, 17]] *= 40
    q = _calibrated(x, layout)
    assert int(q.axis[0]) == CHANNEL
    _outlier_group_is_private(q, 32, [3, 17])
    # groups beat one per-tensor range on the ordinary channels
    err_g = (q(x) - x).pow(2).mean()
    err_1 = (_calibrated(x, layout, groups=1)(x) - x).pow(2).mean()
    assert err_g < 0.5 * err_1


@pytest.mark.parametrize("layout", ["last", "conv"])
def test_pixel_outliers_found(layout):
    g = torch.Generator().manual_seed(1)
    if layout == "last":
        x = torch.randn(4, 64, 32, generator=g)
        x[:, [5, 40]] *= 40  # token (pixel) rows
        n, outliers = 64, [5, 40]
    else:
        x = torch.randn(4, 32, 8, 8, generator=g)
        x[:, :, 2, 3] *= 40  # pixel (2, 3) = index 19 of the flattened 8x8 map
        x[:, :, 6, 0] *= 40  # index 48
        n, outliers = 64, [19, 48]
    q = _calibrated(x, layout)
    assert int(q.axis[0]) == TOKEN
    _outlier_group_is_private(q, n, outliers)
    with pytest.raises(QuantkitError, match="calibrated"):
        q(x[..., :-1, :] if layout == "last" else x[..., :-1])  # another resolution


def test_group_ranges_follow_the_formula():
    x = torch.tensor([[[-1.0, 2.0], [0.5, 1.0]]])  # [1, L=2, C=2]
    q = _calibrated(x, "last", groups=2)
    # channel spread (2-1)+(0.5+1) = 2.5 vs token spread (2-1)+(0.5+1) = 2.5 -> channel (ties keep channels)
    assert int(q.axis[0]) == CHANNEL
    lo, hi = torch.tensor([-1.0, 1.0]), torch.tensor([0.5, 2.0])
    delta = (hi - lo) / 63
    labels = q.group_of[0, :2].long()
    torch.testing.assert_close(q.scale[0][labels], delta)
    torch.testing.assert_close(q.zero[0][labels], torch.round(-lo / delta))


@pytest.mark.parametrize("fn", [kmeans, sklearn_kmeans], ids=["torch", "sklearn"])
def test_kmeans_separates_blobs_and_caps_k(fn):
    pts = torch.cat([torch.zeros(10, 2), torch.full((3, 2), 50.0)])
    labels = fn(pts, 8)
    assert labels.max().item() == 1 and labels[:10].unique().numel() == 1 and labels[10] != labels[0]


def test_sklearn_kmeans_gives_the_dgq_code_partition():
    """The group quantizer's clustering is exactly KMeans(n_clusters=G, random_state=0), relabelled."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    g = torch.Generator().manual_seed(1)
    pts = torch.stack([-(torch.rand(200, generator=g) + 0.5), torch.rand(200, generator=g) * 3 + 0.5], 1)
    pts[:7] *= 30
    want = KMeans(n_clusters=8, random_state=0).fit(pts.double().numpy()).labels_
    assert adjusted_rand_score(sklearn_kmeans(pts, 8).numpy(), want) == 1.0


def test_log_quantizer_codes_and_per_prompt_scale():
    q = LogProbQuantizer(3, "prompt")
    p = torch.tensor([1.0, 0.5, 0.25, 0.3, 0.0]).reshape(1, 1, 1, 5)
    # delta = 1: codes 0, 1, 2, round(1.74) = 2, and 0 -> the largest code 7
    expect = torch.tensor([1.0, 0.5, 0.25, 0.25, 2.0 ** -7]).reshape(1, 1, 1, 5)
    torch.testing.assert_close(q(p), expect)
    # two prompts in one batch: each gets its own delta (its own max)
    batch = torch.cat([p, 0.01 * p])
    out = q(batch)
    torch.testing.assert_close(out[1], 0.01 * expect[0])
    per_batch = LogProbQuantizer(3, "prompt", per_batch_delta=True)(batch)  # the official code's rule
    assert not torch.allclose(per_batch[1], out[1])


def test_timestep_slots_map_to_nearest_calibrated_step():
    q = GroupActQuantizer(8, 1, "last", timestep_aware=True)
    clock = StepClock()
    q.clock, q.observing = clock, True
    for t, amp in ((999.0, 10.0), (500.0, 1.0), (1.0, 0.1)):
        clock.t = t
        q(amp * torch.linspace(-1, 1, 64).reshape(1, 8, 8))
    q.finalize()
    q.observing = False
    assert q.timesteps.tolist() == [999.0, 500.0, 1.0]
    # a sampler with other steps: nearest calibrated timestep
    for t, slot in ((950.0, 0), (760.0, 0), (740.0, 1), (260.0, 1), (240.0, 2), (0.0, 2)):
        clock.t = t
        assert q.slot() == slot
    clock.t = None
    with pytest.raises(QuantkitError, match="outside a denoiser call"):
        q(torch.zeros(1, 8, 8))


@pytest.mark.parametrize("cross", [False, True])
def test_attention_processor_matches_diffusers_before_quantization(cross):
    from diffusers.models.attention_processor import Attention

    from quantkit.adapters.diffusers_attention import install_processor

    torch.manual_seed(0)
    attn = Attention(32, cross_attention_dim=16 if cross else None, heads=4, dim_head=8)
    x, enc = torch.randn(2, 10, 32), (torch.randn(2, 6, 16) if cross else None)
    ref = attn(x, enc)
    proc = install_processor(attn, {"cross": cross, "bits": 4, "groups": 8, "probs": "log",
                                    "start_token_fp": True, "timestep_aware": False})
    for q in proc.quantizers():
        q.observing = True
    torch.testing.assert_close(attn(x, enc), ref)  # observing = full precision
    for q in proc.quantizers():
        q.finalize()
        q.observing = False
    seen = {}
    proc.p_quant.register_forward_hook(lambda m, a, out: seen.update(inp=a[0], out=out))
    y = attn(x, enc)
    assert not torch.allclose(y, ref) and torch.isfinite(y).all()
    lk = 6 if cross else 10
    # the start token's probability column bypasses the quantizer in cross-attention only
    assert seen["inp"].shape[-1] == (lk - 1 if cross else lk)


def _tiny_dgq_recipe(**opts) -> Recipe:
    return Recipe.from_dict({
        "method": "dgq", "weight": {"kind": "int", "bits": 8, "symmetric": False},
        "activation": {"kind": "int", "bits": 6, "symmetric": False, "granularity": "tensor", "dynamic": False,
                       "groups": 4},
        "calib_size": 2, "method_options": {"calib_steps": 3, **opts}})


def test_dgq_end_to_end_reload_and_other_step_count(tmp_path):
    loaded = load_model("zoo:tiny-sd")
    rec = _tiny_dgq_recipe()
    result = quantize_model(loaded, rec)
    out = save_checkpoint(loaded, rec, result, tmp_path / "ckpt")
    meta = json.loads((out / "quantization.json").read_text())
    crosses = [r["start_token_fp"] for r in meta["attention"].values() if r["cross"]]
    assert crosses and all(crosses)
    acts = [r["activation"] for r in meta["layers"].values() if r["activation"]]
    assert acts and all(a["groups"] == 4 for a in acts)
    pipe = quantkit.load(out)
    procs = [m for m in pipe.unet.modules() if type(m).__name__ == "QuantAttnProcessor"]
    assert len(procs) == len(meta["attention"])
    slots = {q.timesteps.numel() for m in pipe.unet.modules() if isinstance(m, GroupActQuantizer) for q in [m]}
    assert slots == {3}  # one parameter set per calibration step

    def sample(p, steps):
        g = torch.Generator().manual_seed(0)
        return p(["a red bus"], num_inference_steps=steps, generator=g, output_type="np").images

    a = sample(loaded.obj, 3)  # in-memory quantized pipeline
    b = sample(pipe, 3)
    assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    c = sample(pipe, 5)  # another step count: nearest calibrated step per timestep
    assert c.shape == a.shape and torch.isfinite(torch.as_tensor(c)).all()


def test_dgq_options_are_validated():
    from quantkit.methods import get_method

    with pytest.raises(QuantkitError, match="attention"):
        get_method("dgq", _tiny_dgq_recipe(attention="softmax"))
    with pytest.raises(QuantkitError, match="groups"):
        Recipe.from_dict({"method": "rtn", "activation": {"kind": "int", "bits": 6, "symmetric": False,
                                                          "granularity": "tensor", "dynamic": False, "groups": 8}})


def test_dgq_weight_recon_from_the_shell(tmp_path):
    from helpers import cli

    recipe = tmp_path / "dgq.yaml"
    from quantkit.config import builtin_recipe_path

    text = builtin_recipe_path("dgq-w4a6").read_text()
    recipe.write_text(text.replace("calib_steps: 25", "calib_steps: 2\n  recon_iters: 20"))
    out = tmp_path / "ckpt"
    r = cli("quantize", "zoo:tiny-sd", "--recipe", recipe, "--weight-recon", "--calib-size", "1", "--out", out)
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["recipe"]["method_options"]["weight_recon"] is True
    stats = meta["reconstruction"]
    # Reconstruction must lower every block's loss by a margin (measured at 20 iterations: 0.61-0.89).
    assert len(stats) == 14 and all(v["loss_end"] < 0.95 * v["loss_start"] for v in stats.values()), stats
    r = cli("generate", out, "--prompt", "a red bus", "--n", "1", "--steps", "3", "--out", tmp_path / "g.png")
    assert r.exit_code == 0, r.output
    r = cli("quantize", "zoo:tiny-sd", "--recipe", "rtn-w8a8", "--weight-recon", "--out", tmp_path / "x")
    assert r.exit_code != 0 and "dgq" in r.output


def test_dgq_on_a_bare_denoiser_is_a_one_line_error(tmp_path):
    from helpers import cli, one_line_error

    r = cli("quantize", "zoo:tiny-dit", "--recipe", "dgq-w8a6", "--out", tmp_path / "x")
    assert "pipeline" in one_line_error(r)
    assert not (tmp_path / "x").exists()


def test_width_overrides_keep_the_dgq_groups():
    from quantkit.config import recipe_with_overrides

    rec = recipe_with_overrides(Recipe.load("dgq-w8a6"), wbits=4, abits=4)
    assert rec.weight.bits == 4 and rec.activation.format.bits == 4
    assert rec.activation.groups == 8 and not rec.activation.dynamic
