"""zoo:shakespeare-deepseek loads offline with the standard transformers classes and generates."""

import pytest
import torch
from transformers import AutoTokenizer, DeepseekV3ForCausalLM

from quantkit.zoo.common import read_metrics
from quantkit.zoo.registry import zoo_path


@pytest.fixture(scope="module")
def model_dir():
    return zoo_path("shakespeare-deepseek")


@pytest.fixture(scope="module")
def model(model_dir):
    return DeepseekV3ForCausalLM.from_pretrained(model_dir).eval()


def test_forward_shape_and_moe_layout(model):
    ids = torch.tensor([list(b"First Citizen:\nBefore we")])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    cfg = model.config
    moe = model.model.layers[cfg.first_k_dense_replace].mlp
    assert moe.experts.gate_up_proj.shape == (cfg.n_routed_experts, 2 * cfg.moe_intermediate_size, cfg.hidden_size)
    assert moe.shared_experts.gate_proj.weight.shape == (cfg.moe_intermediate_size * cfg.n_shared_experts,
                                                          cfg.hidden_size)
    assert cfg.n_group > 1 and cfg.topk_group < cfg.n_group  # grouped top-k routing is in play
    # The balancing bias is trained state and must survive the round trip through safetensors.
    assert moe.gate.e_score_correction_bias.abs().sum() > 0


def test_generates_bytes(model, model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("ROMEO:\n", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 8)


def test_recorded_perplexity(model_dir):
    assert read_metrics(model_dir)["heldout_perplexity"] < 8.0
