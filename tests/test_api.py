"""Python API on models in memory: quantize -> save -> load reproduces the in-memory outputs."""
from __future__ import annotations

import pytest
import torch

import quantkit
from quantkit.errors import QuantkitError
from quantkit.nn import QuantExperts, QuantLinear


def _tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64)
    return MixtralForCausalLM(cfg).eval()


IDS = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("calib_kind", ["texts", "forward_loop", "loader"])
def test_quantize_transformers_moe_in_memory(tmp_path, calib_kind):
    model = _tiny_mixtral()
    with torch.no_grad():
        fp = model(IDS).logits
    calib = {"texts": ["to be or not to be", "that is the question"],
             "forward_loop": lambda m: [m(IDS), m(IDS.flip(1))],
             "loader": torch.utils.data.DataLoader([{"input_ids": IDS[0]}], batch_size=1)}[calib_kind]
    q = quantkit.quantize(model, "rtn-w4a8", calib=calib)
    assert q is model
    assert isinstance(q.model.layers[0].mlp.experts, QuantExperts)
    assert isinstance(q.model.layers[0].self_attn.q_proj, QuantLinear)
    with torch.no_grad():
        ql = q(IDS).logits
    assert not torch.equal(ql, fp)  # it did quantize
    quantkit.save(q, tmp_path / "ck")
    back = quantkit.load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, ql)


def test_quantize_diffusers_pipeline_in_memory(tmp_path):
    from quantkit.tiny_models import tiny_model_path
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_model_path("tiny-sd"))
    prompts = ["a red bus", "a small cat"]
    q = quantkit.quantize(pipe, "rtn-w8a8", calib=prompts, calib_steps=2)
    assert any(isinstance(m, QuantLinear) for m in q.unet.modules())
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = q("a red bus", num_inference_steps=2, generator=gen(), output_type="latent").images
    quantkit.save(q, tmp_path / "sd")
    back = quantkit.load(tmp_path / "sd")
    assert type(back) is type(pipe)
    b = back("a red bus", num_inference_steps=2, generator=gen(), output_type="latent").images
    assert torch.equal(a, b)


def test_api_errors(tmp_path):
    with pytest.raises(QuantkitError, match="cannot place"):
        quantkit.quantize(object(), "rtn-w8a8")
    with pytest.raises(QuantkitError, match="not quantized by quantkit.quantize"):
        quantkit.save(_tiny_mixtral(), tmp_path / "x")
    with pytest.raises(QuantkitError, match="calib of type"):
        quantkit.quantize(_tiny_mixtral(), "rtn-w8a8", calib=3.5)


def test_load_dtype_keeps_scales(tmp_path):
    q = quantkit.quantize(_tiny_mixtral(), "rtn-w4a16-g128")
    quantkit.save(q, tmp_path / "ck")
    back = quantkit.load(tmp_path / "ck", dtype=torch.bfloat16)
    lin = back.model.layers[0].self_attn.q_proj
    assert lin.scale.dtype == torch.float16 and back.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = back(IDS).logits
    assert out.dtype == torch.bfloat16
