"""zoo:NAME-outliers keeps the full-precision function and plants large activation channels."""
import pytest
import torch

from quantkit.models import load_model
from helpers import forward


def _max_over_median(root, adapter) -> float:
    """Largest ratio of a layer input's max channel magnitude to its median channel magnitude."""
    ratios = []

    def hook(_m, args):
        x = args[0].detach().float()
        x = x.movedim(1, -1) if x.dim() == 4 else x
        ch = x.reshape(-1, x.shape[-1]).abs().amax(0)
        ratios.append((ch.max() / ch.median().clamp(min=1e-12)).item())

    hs = [m.register_forward_pre_hook(hook) for m in root.modules() if isinstance(m, torch.nn.Linear)]
    forward(adapter, root)
    for h in hs:
        h.remove()
    return max(ratios)


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-deepseek", "tiny-unet", "tiny-dit", "digits-clip", "tiny-flux", "digits-mmdit"])
def test_outlier_variant_is_function_preserving(name):
    base = load_model(f"zoo:{name}")
    var = load_model(f"zoo:{name}-outliers")
    a, b = forward(base.adapter, base.root), forward(var.adapter, var.root)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert _max_over_median(var.root, var.adapter) > 3 * _max_over_median(base.root, base.adapter)


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-deepseek"])
def test_down_projection_outlier_variant_is_function_preserving(name):
    """-down-outliers: norm-gain outliers plus channel outliers in the experts' (and dense/shared MLPs')
    down-projection inputs; the FP function is unchanged."""
    from quantkit.adapters import is_fused_experts

    base = load_model(f"zoo:{name}")
    var = load_model(f"zoo:{name}-down-outliers")
    a, b = forward(base.adapter, base.root), forward(var.adapter, var.root)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)

    def down_input_ratio(root):  # max/median channel magnitude of expert 0's SwiGLU output
        m = next(m for m in root.modules() if is_fused_experts(m))
        x = torch.randn(64, m.gate_up_proj.shape[-1], generator=torch.Generator().manual_seed(0))
        g, u = (x @ m.gate_up_proj[0].T).chunk(2, dim=-1)
        ch = (m.act_fn(g) * u).abs().amax(0)
        return (ch.max() / ch.median()).item()

    assert down_input_ratio(var.root) > 5 * down_input_ratio(base.root)


def test_massive_token_variant_is_function_preserving():
    """-massive: every expert widened, a cancelling channel pair in layer 1 whose down-projection inputs are
    ~100x the usual on the trigger byte "\\n" only; the FP function is unchanged for any input."""
    base = load_model("zoo:tiny-mixtral")
    var = load_model("zoo:tiny-mixtral-massive")
    a, b = forward(base.adapter, base.root), forward(var.adapter, var.root)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)

    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(5))
    ids[:, ::8] = 10
    layer = var.root.model.layers[1]
    got = []
    h = layer.mlp.register_forward_pre_hook(lambda _m, args: got.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        var.root(input_ids=ids)
    h.remove()
    m = layer.mlp.experts
    g, u = torch.einsum("th,eih->eti", got[0], m.gate_up_proj).chunk(2, dim=-1)
    per_token = (m.act_fn(g) * u)[0].abs().amax(-1)  # expert 0's down-projection input, max over channels
    trig = ids.reshape(-1) == 10
    assert per_token[trig].median() > 30 * per_token[~trig].median()


def _pixel_peak(root, adapter) -> float:
    """Largest over GEGLU down projections of (max over pixels / median over pixels) of the per-pixel
    max channel magnitude of their input."""
    peaks = []

    def hook(_m, args):
        per_pixel = args[0].detach().abs().amax(-1)  # [B, L]
        peaks.append((per_pixel.amax(1) / per_pixel.median(1).values).max().item())

    from diffusers.models.attention import FeedForward
    hs = [m.net[-1].register_forward_pre_hook(hook) for m in root.modules() if isinstance(m, FeedForward)]
    forward(adapter, root)
    for h in hs:
        h.remove()
    return max(peaks)


def test_pixel_outlier_variant_is_function_preserving():
    """-pixel-outliers: the GEGLU channels most concentrated on a few pixels scaled (exact); the planted
    outliers are token-wise: a few pixels stand far above the rest, more than with the same factor on
    channels chosen without regard to pixels (-outliers)."""
    # The trained UNet: a random one has no pixel-concentrated channels to choose.
    base = load_model("zoo:digits-t2i")
    var = load_model("zoo:digits-t2i-pixel-outliers")
    chan = load_model("zoo:digits-t2i-outliers")
    a, b = forward(base.adapter, base.root), forward(var.adapter, var.root)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert _pixel_peak(var.root, var.adapter) > 2 * _pixel_peak(chan.root, chan.adapter)
    assert _pixel_peak(var.root, var.adapter) > 3 * _pixel_peak(base.root, base.adapter)
