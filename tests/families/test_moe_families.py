"""Every transformers MoE family quantkit supports: RTN W8A8 (dynamic activations) and W4A16 g32 quantize
every expert weight, save, reload with quantkit.load, and give the in-memory quantized model's output."""
import json

import pytest
import torch

import quantkit
from quantkit.config import Recipe, recipe_with_overrides
from quantkit.inspect_ckpt import inspect_checkpoint
from quantkit.io import save_checkpoint
from quantkit.models import load_model
from quantkit.nn import QuantExperts
from quantkit.nn_experts import QuantParallelExperts
from quantkit.pipeline import quantize_model

from moe_configs import MOE_FAMILIES, build

RECIPES = {"rtn-w8a8": lambda: Recipe.load("rtn-w8a8"),
           "rtn-w4a16-g32": lambda: recipe_with_overrides(Recipe.load("rtn-w4a16-g128"), group_size=32)}
CASES = [pytest.param(f, r, marks=pytest.mark.family(f, r, "moe"), id=f"{f}-{r}") for f in MOE_FAMILIES for r in RECIPES]


def _expert_params(model: torch.nn.Module) -> int:
    """Expert weights (3-D) held in full precision; biases are not weights."""
    from quantkit.adapters.experts import expert_layout

    return sum(p.numel() for m in model.modules() if expert_layout(m) is not None for p in m.parameters(recurse=False) if p.dim() == 3)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family,recipe", CASES)
def test_moe_family_quantize_reload(family, recipe, tmp_path):
    src = tmp_path / "src"
    build(family).save_pretrained(src)
    loaded = load_model(str(src))
    n_expert_params = _expert_params(loaded.root)
    assert n_expert_params > 0
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = _logits(loaded.root, ids)
    rec = RECIPES[recipe]()
    result = quantize_model(loaded, rec)
    q = _logits(loaded.root, ids)
    out = save_checkpoint(loaded, rec, result, tmp_path / "ckpt")
    reloaded = quantkit.load(out)
    assert type(reloaded) is type(loaded.root)
    r = _logits(reloaded, ids)
    assert torch.isfinite(q).all()
    assert torch.allclose(q, r, rtol=1e-4, atol=1e-4), (q - r).abs().max()
    rel = ((q - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.5, rel
    # Every expert weight is quantized: none left as a full-precision 3-D parameter, all counted in inspect.
    assert _expert_params(loaded.root) == 0 and _expert_params(reloaded) == 0
    quantized_experts = [m for m in reloaded.modules() if isinstance(m, (QuantExperts, QuantParallelExperts))]
    assert quantized_experts
    report = inspect_checkpoint(out)
    expert_rows = [lay for lay in report["layers"] if lay["role"] == "expert"]
    assert expert_rows and all(lay["quantized"] for lay in expert_rows)
    assert sum(lay["params"] for lay in expert_rows) == n_expert_params
    # Routers are found by structure and stay in full precision by default.
    assert "router" in result.skipped.values()


@pytest.mark.parametrize("recipe", [pytest.param(r, marks=pytest.mark.family("gpt_oss (hub MXFP4 source)", r, "moe"))
                                    for r in RECIPES])
def test_gpt_oss_native_mxfp4_source(recipe, tmp_path, caplog):
    """A gpt-oss checkpoint as the hub ships it (MXFP4 experts): transformers dequantizes it on load, quantkit says
    so and requantizes from those weights."""
    import logging

    from mxfp4_source import write_native_mxfp4

    fp = build("gpt_oss")
    write_native_mxfp4(fp, tmp_path / "src")
    with caplog.at_level(logging.WARNING):
        loaded = load_model(str(tmp_path / "src"))
    assert any("mxfp4" in r.getMessage() and "requantiz" in r.getMessage() for r in caplog.records)
    src_w = loaded.root.model.layers[0].mlp.experts.gate_up_proj
    ref_w = fp.model.layers[0].mlp.experts.gate_up_proj
    assert 0 < (src_w.float() - ref_w).abs().max() < 0.1  # the MXFP4 source, not the FP model
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    rec = RECIPES[recipe]()
    result = quantize_model(loaded, rec)
    q = _logits(loaded.root, ids)
    reloaded = quantkit.load(save_checkpoint(loaded, rec, result, tmp_path / "ckpt"))
    assert torch.allclose(q, _logits(reloaded, ids), rtol=1e-4, atol=1e-4)
    assert _expert_params(reloaded) == 0
    # The written config carries quantkit's quantization_config only, nothing of the source's mxfp4 block.
    cfg_text = (tmp_path / "ckpt" / "config.json").read_text()
    assert json.loads(cfg_text)["quantization_config"]["quant_method"] == "quantkit" and "mxfp4" not in cfg_text


def test_gpt_oss_native_mxfp4_source_cli(tmp_path):
    """Through the CLI: the checkpoint's config holds quantkit's quantization_config only (plain from_pretrained
    after `import quantkit` reloads it); --stream refuses the pre-quantized source in one line."""
    from mxfp4_source import write_native_mxfp4
    from transformers import AutoModelForCausalLM

    from helpers import cli, one_line_error

    write_native_mxfp4(build("gpt_oss"), tmp_path / "src")
    r = cli("quantize", tmp_path / "src", "--out", tmp_path / "ck", "--recipe", "rtn-w4a16-g128")
    assert r.exit_code == 0, r.output
    cfg_text = (tmp_path / "ck" / "config.json").read_text()
    assert json.loads(cfg_text)["quantization_config"]["quant_method"] == "quantkit" and "mxfp4" not in cfg_text
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert torch.equal(_logits(plain, ids), _logits(quantkit.load(tmp_path / "ck"), ids))
    line = one_line_error(cli("quantize", tmp_path / "src", "--out", tmp_path / "ck2", "--recipe", "rtn-w4a16-g128",
                              "--stream"))
    assert "pre-quantized" in line and "'mxfp4'" in line and not (tmp_path / "ck2").exists()


@pytest.mark.family("phimoe", "eaquant", "moe")
def test_linear_subclass_router_is_quantized_as_a_router(tmp_path):
    """PhiMoE's router is an nn.Linear subclass whose forward returns (logits, weights, experts): a recipe
    that quantizes routers must keep that logic (QuantRouter), not replace it by a plain QuantLinear."""
    from quantkit.quant_router import QuantRouter

    src = tmp_path / "src"
    build("phimoe").save_pretrained(src)
    loaded = load_model(str(src))
    base = Recipe.load("eaquant-w4a4-fast")
    rec = base.replace(calib_size=2, method_options={**base.method_options, "steps": 8})
    result = quantize_model(loaded, rec)
    routers = [n for n, r in result.layers.items() if r["kind"] == "router"]
    assert routers and all(isinstance(loaded.root.get_submodule(n), QuantRouter) for n in routers)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    q = _logits(loaded.root, ids)
    reloaded = quantkit.load(save_checkpoint(loaded, rec, result, tmp_path / "ckpt"))
    assert torch.isfinite(q).all() and torch.allclose(q, _logits(reloaded, ids), rtol=1e-4, atol=1e-4)


NON_STANDARD = {"gpt_oss", "llama4", "jetmoe"}  # refuse calibrated methods (tests/families/test_expert_layouts.py)
CALIBRATED = ("eaquant-w4a4-fast", "duquantpp-mxfp4-fast")
CALIBRATED_CASES = [pytest.param(f, r, marks=pytest.mark.family(f, r.removesuffix("-fast").split("-")[0], "moe"),
                                 id=f"{f}-{r}") for f in MOE_FAMILIES if f not in NON_STANDARD for r in CALIBRATED]


@pytest.mark.parametrize("family,recipe", CALIBRATED_CASES)
def test_moe_family_rotation_methods(family, recipe, tmp_path):
    """EAQuant (smoothing, rotations, router alignment, expert balance) and DuQuant++ (MXFP4 rotation) run on
    every family with standard experts; the checkpoint reloads to the in-memory quantized model's output."""
    src = tmp_path / "src"
    build(family).save_pretrained(src)
    loaded = load_model(str(src))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = _logits(loaded.root, ids)
    base = Recipe.load(recipe)
    rec = base.replace(calib_size=2, method_options={**base.method_options, "steps": 4, "calib_seq_len": 32})
    result = quantize_model(loaded, rec)
    q = _logits(loaded.root, ids)
    assert torch.isfinite(q).all()
    assert 0 < ((q - ref).norm() / ref.norm()).item() < 0.5
    assert _expert_params(loaded.root) == 0
    experts = [r for r in result.layers.values() if r["kind"] == "experts"]
    assert experts and all(r["calibration"]["expert_tokens_used"] for r in experts)
    reloaded = quantkit.load(save_checkpoint(loaded, rec, result, tmp_path / "ckpt"))
    assert torch.allclose(q, _logits(reloaded, ids), rtol=1e-4, atol=1e-4)
