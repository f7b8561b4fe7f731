"""Calibration from the real pipelines (FluxPipeline, StableDiffusion3Pipeline, QwenImagePipeline, WanPipeline,
SanaPipeline with their flow-matching schedulers, StableDiffusionXLPipeline with Euler): EDA-DM (one
reconstruction iteration) and DGQ calibrate on the sampler's own steps, save, reload with quantkit.load and
sample the same latents as the in-memory quantized pipeline. DGQ's attention quantizer covers plain softmax
and SD3 / FLUX / Qwen-Image joint attention: asking for it on Wan's or SANA's linear attention is a one-line
refusal before any work."""
import logging

import pytest
import torch

import quantkit
from quantkit.config import Recipe
from quantkit.io import save_checkpoint
from quantkit.models import load_model
from quantkit.pipeline import quantize_model
from helpers import cli, one_line_error

OPTIONS = {"eda-dm-w8a8": {"iters": 1, "batch_size": 2}, "dgq-w8a6": {"attention": "none", "calib_steps": 2}}
# SDXL's UNet has plain (self / cross) attention, SD3 / FLUX / Qwen-Image joint attention: DGQ quantizes them.
FULL_DGQ = {"tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-qwen-image"}
PIPELINES = {"tiny-flux": "FluxTransformer2DModel", "tiny-sd3": "SD3Transformer2DModel",
             "tiny-qwen-image": "QwenImageTransformer2DModel",
             "tiny-wan": "WanTransformer3DModel", "tiny-sana": "SanaTransformer2DModel",
             "tiny-sdxl": "UNet2DConditionModel"}
CASES = [pytest.param(p, r, marks=pytest.mark.family(p.removeprefix("tiny-") + " pipeline",
                                                     r.split("-w")[0] + ("" if not r.startswith("dgq") else
                                                                         " (attention: log)" if p in FULL_DGQ
                                                                         else " (attention: none)"),
                                                     "pipeline"),
                      id=f"{p}-{r}") for p in PIPELINES for r in OPTIONS]


def reloaded_root(pipe):
    return getattr(pipe, "transformer", None) or pipe.unet


def _sample(pipe, adapter):
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompt=["a red bus"], num_inference_steps=2, output_type="latent", return_dict=False,
                    generator=torch.Generator().manual_seed(3), **adapter.sampling_kwargs(pipe))[0]


@pytest.mark.parametrize("model,recipe", CASES)
def test_pipeline_calibrated_method(model, recipe, tmp_path):
    loaded = load_model(f"zoo:{model}")
    assert loaded.is_pipeline and type(loaded.root).__name__ == PIPELINES[model]
    ref = _sample(loaded.obj, loaded.adapter)
    base = Recipe.load(recipe)
    opts = {**base.method_options, **OPTIONS[recipe]}
    if model in FULL_DGQ and recipe.startswith("dgq"):
        opts["attention"] = "log"
    rec = base.replace(calib_size=2, method_options=opts)
    result = quantize_model(loaded, rec, calib_steps=2)
    assert result.calibration["used"] and result.calibration["steps"] == 2
    assert [b for b in result.blocks if b] == [n for n, _ in loaded.adapter.blocks(loaded.root)]
    q = _sample(loaded.obj, loaded.adapter)
    reloaded = quantkit.load(save_checkpoint(loaded, rec, result, tmp_path / "ckpt"))
    assert type(reloaded) is type(loaded.obj)
    r = _sample(reloaded, loaded.adapter)
    assert torch.isfinite(q).all()
    assert torch.allclose(q, r, rtol=1e-4, atol=1e-4), (q - r).abs().max()
    assert 0 < ((q - ref).norm() / ref.norm()).item() < 0.5
    if opts.get("attention") == "log":
        assert result.extras.get("attention"), "DGQ attention quantizers were not installed"
        from quantkit.adapters.diffusers_attention import QuantAttnProcessor

        procs = [m.processor for m in reloaded_root(reloaded).modules() if hasattr(m, "to_q")]
        assert procs and all(isinstance(p, QuantAttnProcessor) for p in procs)
        if model in ("tiny-sd3", "tiny-flux", "tiny-qwen-image"):
            assert all(rec["joint"] for rec in result.extras["attention"].values())


@pytest.mark.parametrize("model,what", [
    pytest.param(m, w, marks=pytest.mark.family(m.removeprefix("tiny-") + " pipeline", "dgq (attention: log)", "refusal"))
    for m, w in (("tiny-wan", "WanAttention attention"), ("tiny-sana", "SanaLinearAttnProcessor"))])
def test_dgq_attention_on_joint_attention_refuses(model, what, tmp_path):
    msg = one_line_error(cli("quantize", f"zoo:{model}", "--out", tmp_path / "o", "--recipe", "dgq-w8a6"))
    assert "dgq's attention quantizer does not cover" in msg and what in msg and "attention: none" in msg
    assert not (tmp_path / "o").exists()


def test_second_denoiser_left_in_full_precision_is_a_visible_warning(tmp_path, caplog):
    """Wan 2.2 pipelines carry a second transformer for the low-noise steps; quantkit quantizes `transformer`
    only, and says so instead of leaving `transformer_2` in full precision silently."""
    from diffusers import WanPipeline

    from quantkit.models import resolve_path

    src = tmp_path / "wan22"
    pipe = WanPipeline.from_pretrained(resolve_path("zoo:tiny-wan"), local_files_only=True)
    WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, scheduler=pipe.scheduler,
                transformer=pipe.transformer, transformer_2=pipe.transformer, boundary_ratio=0.5).save_pretrained(src)
    caplog.set_level(logging.WARNING)
    res = cli("quantize", str(src), "--out", str(tmp_path / "q"), "--recipe", "rtn-w8a8")
    assert res.exit_code == 0, res.output
    said = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "second denoiser, 'transformer_2'" in said and "'transformer_2' stays in full precision" in said
    q = quantkit.load(tmp_path / "q")  # the warning is true: one quantized transformer, one full precision
    quantized = lambda m: any("Quant" in type(x).__name__ for x in m.modules())  # noqa: E731
    assert quantized(q.transformer) and not quantized(q.transformer_2)
