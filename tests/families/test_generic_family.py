"""A family quantkit has no adapter for: its repeated blocks are found, rtn weight-only / dynamic recipes run
with a warning naming the family and the assumptions, calibrated methods refuse in one line."""
import logging

import pytest
import torch

import quantkit
from quantkit.adapters.generic import GenericAdapter
from quantkit.config import Recipe, recipe_with_overrides
from quantkit.io import save_checkpoint
from quantkit.models import load_model
from quantkit.nn import QuantLinear
from quantkit.pipeline import quantize_model
from helpers import cli, one_line_error

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
FAMILIES = {
    "opt": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=128, word_embed_proj_dim=64)),
    "bert": ("BertConfig", "BertForMaskedLM", dict(intermediate_size=128)),
}
RECIPES = {"rtn-w8a8": lambda: Recipe.load("rtn-w8a8"),
           "rtn-w4a16-g32": lambda: recipe_with_overrides(Recipe.load("rtn-w4a16-g128"), group_size=32)}


def _save(family: str, path) -> None:
    import transformers

    cfg_cls, model_cls, kw = FAMILIES[family]
    torch.manual_seed(0)
    getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**COMMON, **kw)).save_pretrained(path)


@pytest.mark.parametrize("family,recipe", [pytest.param(f, r, marks=pytest.mark.family(f"{f} (generic)", r, "generic"))
                                           for f in FAMILIES for r in RECIPES])
def test_generic_family_quantize_reload(family, recipe, tmp_path, caplog):
    _save(family, tmp_path / "src")
    with caplog.at_level(logging.WARNING):
        loaded = load_model(str(tmp_path / "src"))
    assert isinstance(loaded.adapter, GenericAdapter)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"unknown model family {family}" in warning and "blocks" in warning
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = loaded.root(input_ids=ids).logits
    rec = RECIPES[recipe]()
    result = quantize_model(loaded, rec)
    # Every linear inside the blocks is quantized; the LM head and embeddings stay in full precision.
    block_linears = [n for n, m in loaded.root.named_modules() if ".layer" in n and isinstance(m, torch.nn.Linear)]
    assert not block_linears
    assert "lm_head" in result.skipped.values() and "embedding" in result.skipped.values()
    out = save_checkpoint(loaded, rec, result, tmp_path / "ckpt")
    reloaded = quantkit.load(out)
    with torch.no_grad():
        a = loaded.root(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    assert 0 < ((a - ref).norm() / ref.norm()).item() < 0.5
    assert sum(isinstance(m, QuantLinear) for m in reloaded.modules()) == len(result.layers)


@pytest.mark.parametrize("recipe", [pytest.param(r, marks=pytest.mark.family("opt (generic)", r.rsplit("-w", 1)[0],
                                                                     "refusal")) for r in ("eaquant-w4a4-fast", "eda-dm-w8a8")])
def test_generic_family_refuses_calibrated_methods(recipe, tmp_path):
    _save("opt", tmp_path / "src")
    msg = one_line_error(cli("quantize", tmp_path / "src", "--out", tmp_path / "o", "--recipe", recipe))
    assert "unknown model family" in msg and "allowed: rtn with weight-only or dynamic activations" in msg
    assert not (tmp_path / "o").exists()


def test_no_repeated_blocks_is_one_line(tmp_path):
    from quantkit.adapters import adapter_for
    from quantkit.errors import QuantkitError

    with pytest.raises(QuantkitError, match="no adapter for Sequential"):
        adapter_for(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4)))


def test_unhandled_layers_in_blocks_are_named(caplog):
    import transformers

    from quantkit.adapters import adapter_for

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                                                n_positions=64))
    with caplog.at_level(logging.WARNING):
        adapter_for(gpt2)
    assert any("Conv1D" in r.getMessage() and "full precision" in r.getMessage() for r in caplog.records)
