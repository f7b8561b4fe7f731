"""Modern diffusion transformers (bare models): RTN W8A8 and W4A16 g32 quantize the blocks (FLUX's single-stream
blocks included), keep modulation / embedders / input projections in full precision, save, reload with
quantkit.load and reproduce the in-memory quantized output on the adapter's synthetic inputs."""
import pytest
import torch

import quantkit
from quantkit.adapters import adapter_for
from quantkit.config import Recipe, recipe_with_overrides
from quantkit.io import save_checkpoint
from quantkit.models import load_model
from quantkit.pipeline import quantize_model

from dit_configs import DIT_FAMILIES, build_dit

# SANA's depthwise 3x3 convolutions have K = 9: g32 cannot tile them, so they take per-channel scales.
RECIPES = {"rtn-w8a8": lambda: Recipe.load("rtn-w8a8"),
           "rtn-w4a16-g32": lambda: recipe_with_overrides(Recipe.load("rtn-w4a16-g128"), group_size=32).replace(
               group_fallback="channel")}
CASES = [pytest.param(f, r, marks=pytest.mark.family(f, r, "diffusion"), id=f"{f}-{r}") for f in DIT_FAMILIES
         for r in RECIPES]
EXPECTED_ADAPTER = {"flux": "diffusers-flux", "sd3": "diffusers-sd3", "qwen_image": "diffusers-qwen-image",
                    "sana": "diffusers-sana", "wan": "diffusers-wan", "hunyuan_dit": "diffusers-hunyuan-dit"}


def _out(adapter, model, call):
    with torch.no_grad():
        return adapter.output_tensor(model(*call.args, **call.kwargs))


@pytest.mark.parametrize("family,recipe", CASES)
def test_dit_family_quantize_reload(family, recipe, tmp_path):
    build_dit(family).save_pretrained(tmp_path / "src")
    loaded = load_model(str(tmp_path / "src"))
    adapter = loaded.adapter
    assert adapter.name == EXPECTED_ADAPTER[family]
    call = adapter.synthetic_inputs(loaded.root, 1, 7)[0]
    ref = _out(adapter, loaded.root, call)
    rec = RECIPES[recipe]()
    result = quantize_model(loaded, rec)
    q = _out(adapter, loaded.root, call)
    out = save_checkpoint(loaded, rec, result, tmp_path / "ckpt")
    reloaded = quantkit.load(out)
    r = _out(adapter, reloaded, call)
    assert torch.isfinite(q).all()
    assert torch.allclose(q, r, rtol=1e-4, atol=1e-5), (q - r).abs().max()
    assert 0 < ((q - ref).norm() / ref.norm()).item() < 0.5
    # Every block is a block (FLUX's single-stream ones too): nothing is quantized "outside blocks" but what is.
    assert [b for b in result.blocks if b] == [n for n, _ in adapter.blocks(loaded.root)]
    skipped = set(result.skipped.values())
    assert {"time_embedding", "conv_in", "conv_out"} <= skipped
    if family in ("flux", "sd3", "qwen_image", "hunyuan_dit"):  # SANA / Wan modulate by parameter tables, not linears
        assert "norm" in skipped
    assert all(rec_["role"] not in ("time_embedding", "norm", "conv_in", "conv_out") for rec_ in result.layers.values())


def test_flux_blocks_roles():
    model = build_dit("flux")
    adapter = adapter_for(model)
    names = [n for n, _ in adapter.blocks(model)]
    assert names == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                     "single_transformer_blocks.1"]
    roles = {n: adapter.role(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert roles["transformer_blocks.0.norm1.linear"] == "norm"
    assert roles["transformer_blocks.0.norm1_context.linear"] == "norm"
    assert roles["single_transformer_blocks.0.norm.linear"] == "norm"
    assert roles["time_text_embed.guidance_embedder.linear_1"] == "time_embedding"
    assert roles["time_text_embed.text_embedder.linear_1"] == "time_embedding"
    assert roles["context_embedder"] == roles["x_embedder"] == "conv_in"
    assert roles["proj_out"] == "conv_out"
    assert roles["single_transformer_blocks.0.proj_out"] == "linear"  # a block's own projection, not the model's
    assert roles["transformer_blocks.0.attn.add_q_proj"] == "attention"


@pytest.mark.parametrize("last", [False, True])
def test_joint_attention_processor_matches_diffusers_without_quantizers(last):
    """With its quantizers switched to identity, DGQ's joint processor computes SD3's JointAttnProcessor2_0."""
    from quantkit.adapters.joint_attention import QuantJointAttnProcessor

    model = build_dit("sd3")
    attn = model.transformer_blocks[-1 if last else 0].attn
    x, ctx = torch.randn(2, 16, 64), torch.randn(2, 6, 64)
    with torch.no_grad():
        ref = attn(x, ctx)
        proc = QuantJointAttnProcessor({"bits": 8, "groups": 4, "probs": "log", "timestep_aware": False})
        proc.q_quant = proc.k_quant = proc.v_quant = proc.p_quant = proc.p_txt_quant = torch.nn.Identity()
        attn.set_processor(proc)
        out = attn(x, ctx)
    ref = [t for t in (ref if isinstance(ref, tuple) else (ref,)) if t is not None]
    out = [t for t in (out if isinstance(out, tuple) else (out,)) if t is not None]
    assert len(ref) == len(out)
    for a, b in zip(ref, out):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_flux_qwen_attention_processors_match_diffusers_without_quantizers(family):
    """With their quantizers switched to identity, DGQ's FLUX / Qwen-Image processors compute the model (FLUX's
    double and single blocks; Qwen-Image's text mask with a padded token)."""
    from quantkit.adapters.joint_attention import joint_processor

    model = build_dit(family)
    call = adapter_for(model).synthetic_inputs(model, 1, 0)[0]
    if family == "qwen_image":
        call.kwargs["encoder_hidden_states_mask"][:, -1] = 0
    with torch.no_grad():
        ref = model(*call.args, **call.kwargs).sample
        for block in list(model.transformer_blocks) + list(getattr(model, "single_transformer_blocks", [])):
            proc = joint_processor(block.attn)({"bits": 8, "groups": 4, "probs": "log", "timestep_aware": False})
            proc.q_quant = proc.k_quant = proc.v_quant = proc.p_quant = proc.p_txt_quant = torch.nn.Identity()
            block.attn.set_processor(proc)
        out = model(*call.args, **call.kwargs).sample
    assert torch.allclose(ref, out, atol=1e-5), (ref - out).abs().max()
