"""zoo:shakespeare-moe loads offline with the standard transformers classes and generates."""

import pytest
import torch
from transformers import AutoTokenizer, MixtralForCausalLM

from quantkit.zoo.common import read_metrics
from quantkit.zoo.lm_data import perplexity, shakespeare_splits
from quantkit.zoo.registry import zoo_path


@pytest.fixture(scope="module")
def model_dir():
    return zoo_path("shakespeare-moe")


@pytest.fixture(scope="module")
def model(model_dir):
    return MixtralForCausalLM.from_pretrained(model_dir).eval()


def test_forward_shape_and_fused_experts(model):
    ids = torch.tensor([list(b"ROMEO:\nWhat say")])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    experts = model.model.layers[0].mlp.experts
    # transformers v5 keeps MoE experts as fused 3-D parameters: the layout QuantExperts must handle.
    assert experts.gate_up_proj.shape == (8, 2 * model.config.intermediate_size, model.config.hidden_size)
    assert experts.down_proj.shape == (8, model.config.hidden_size, model.config.intermediate_size)


def test_tokenizer_is_byte_level_and_generates(model, model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "KING HENRY:\nNow, lords"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == list(text.encode())
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 8)
    assert tokenizer.decode(out[0]).startswith(text)


def test_heldout_perplexity_near_recorded(model, model_dir):
    recorded = read_metrics(model_dir)["heldout_perplexity"]
    _, held_out = shakespeare_splits()
    # Eight windows are a noisy sample of the held-out text; the full figure is in zoo_metrics.json.
    assert perplexity(model, held_out, max_windows=8) < 1.5 * recorded
    assert recorded < 8.0
