"""compressed-tensors export: plain transformers from_pretrained of the export == quantkit.load of the source."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import quantkit
from helpers import cli, one_line_error

pytest.importorskip("compressed_tensors")
from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

FAMILIES = ["tiny-mixtral", "tiny-qwen3-moe", "tiny-deepseek", "tiny-olmoe"]
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _quantize(tmp_path, family: str, *flags: str):
    ck = tmp_path / "ck"
    r = cli("quantize", f"zoo:{family}", "--out", ck, *flags)
    assert r.exit_code == 0, r.output
    return ck


def _export(ck, out):
    r = cli("export", ck, "--format", "compressed-tensors", "--out", out, "--json", "-")
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def _assert_experts_loaded(ref, hf) -> None:
    """Every fused expert weight transformers built equals quantkit's dequantized codes exactly."""
    from quantkit.nn import QuantExperts

    n = 0
    for name, m in ref.named_modules():
        if isinstance(m, QuantExperts):
            other = hf.get_submodule(name)
            assert torch.equal(m.gate_up.dequantize().float(), other.gate_up_proj.float()), name
            assert torch.equal(m.down.dequantize().float(), other.down_proj.float()), name
            n += 1
    assert n > 0


WEIGHT_ONLY = {"w4a16-g128": (("--recipe", "rtn-w4a16-g128"), "pack-quantized"),
               "fp8-w8a16": (("--recipe", "rtn-w8a8", "--format", "fp8", "--abits", "16"), "float-quantized")}


@pytest.mark.parametrize("scheme", sorted(WEIGHT_ONLY))
@pytest.mark.parametrize("family", FAMILIES)
def test_weight_only_loads_in_plain_transformers(tmp_path, family, scheme):
    flags, fmt = WEIGHT_ONLY[scheme]
    ck = _quantize(tmp_path, family, *flags)
    summary = _export(ck, tmp_path / "ct")
    assert summary["format"] == fmt and summary["quantized_linears"] > 8
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert "lm_head" in cfg["ignore"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    ref = quantkit.load(ck)
    _assert_experts_loaded(ref, hf)
    torch.testing.assert_close(_logits(hf), _logits(ref), rtol=0, atol=2e-5)


def _assert_dense_linears_loaded(ref, hf) -> None:
    """Every quantized dense linear of the plain-transformers model holds quantkit's dequantized codes."""
    from quantkit.nn import QuantLinear

    n = 0
    for name, m in ref.named_modules():
        if isinstance(m, QuantLinear):
            w = m.quantized_weight.dequantize().to(torch.bfloat16)
            assert torch.equal(hf.get_submodule(name).weight.to(torch.bfloat16), w), name
            n += 1
    assert n > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_mxfp4_loads_in_transformers(tmp_path, family):
    ck = _quantize(tmp_path, family, "--recipe", "mxfp4-w4a4", "--abits", "16")
    assert _export(ck, tmp_path / "ct")["format"] == "mxfp4-pack-quantized"
    # Plain from_pretrained, no dequantize=True: compressed-tensors 0.20 decompresses MXFP4 to bfloat16
    # (decompress_mx_scale), so the model is loaded in bf16 and compared with quantkit.load in bf16.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.bfloat16)
    ref = quantkit.load(ck, dtype=torch.bfloat16)
    got, want = _logits(hf), _logits(ref)  # the first forward decompresses the dense linears
    _assert_experts_loaded(ref, hf)
    _assert_dense_linears_loaded(ref, hf)
    # Same bf16 weights; bf16 matmuls in a different order: a few bf16 ulps of the logits' size.
    torch.testing.assert_close(got, want, rtol=0, atol=4 * 2 ** -8 * want.abs().max().item())
    # An fp32 model needs dequantize=True (the dense linears would get bf16 weights); the experts arrive in
    # bf16 (exact: E2M1 x 2^e values fit bf16), so casting back to fp32 changes no value.
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", quantization_config=CompressedTensorsConfig(dequantize=True))
    hf = hf.float()
    ref = quantkit.load(ck)
    _assert_experts_loaded(ref, hf)
    torch.testing.assert_close(_logits(hf), _logits(ref), rtol=0, atol=2e-5)


def _check_with_ct_decompressor(ck, ct, fmt: str) -> dict:
    """Every exported weight, decompressed by compressed-tensors' own `fmt` compressor, equals quantkit's
    dequantized codes bit for bit. Returns the export's single config group."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    from quantkit.export.hub_names import hub_slices
    from quantkit.nn import QuantExperts, QuantLinear

    ref = quantkit.load(ck)
    state = load_file(ct / "model.safetensors")
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert qc["format"] == fmt and len(qc["config_groups"]) == 1
    group = qc["config_groups"]["group_0"]
    scheme = QuantizationScheme(**group)
    comp = BaseCompressor.get_value_from_registry(fmt)
    shapes, dense = {}, {}
    for n, m in ref.named_modules():
        if isinstance(m, QuantExperts):
            for attr, qw, shape in (("gate_up_proj", m.gate_up, m.gate_up_shape), ("down_proj", m.down, m.down_shape)):
                shapes[f"{n}.{attr}"], dense[f"{n}.{attr}"] = shape, qw.dequantize().reshape(-1, shape[-1])
        elif isinstance(m, QuantLinear):
            shapes[f"{n}.weight"], dense[f"{n}.weight"] = (m.out_features, m.in_features), m.quantized_weight.dequantize()
    checked = 0
    for src, parts in hub_slices(ref, shapes).items():
        for p in parts:
            mod = p.hub_name.rsplit(".", 1)[0]
            local = {k[len(mod) + 1:]: v for k, v in state.items() if k.startswith(mod + ".")}
            assert torch.equal(comp.decompress(local, scheme)["weight"].float(), dense[src][p.rows]), mod
            checked += 1
    assert checked == qc["quantkit"]["quantized_linears"] > 8
    return group


@pytest.mark.parametrize("family", FAMILIES)
def test_w8a8_int8_decompresses_exactly(tmp_path, family):
    """W8A8 (int-quantized, dynamic per-token int8 inputs, as llm-compressor writes it for vLLM).
    transformers 5.24 cannot load any compressed-tensors MoE checkpoint whose experts are not packed or
    fp8 (its CompressedTensorsDequantize returns nothing for them: "Concatenate on tensors destined for
    ...experts.gate_up_proj. Ckpt contains: 0"; reproduced on a checkpoint compressed-tensors itself writes,
    test_ct_transformers_limits.py), so every weight is checked with compressed-tensors' own decompressor
    against quantkit's dequantized codes, bit for bit."""
    ck = _quantize(tmp_path, family, "--recipe", "rtn-w8a8")
    _export(ck, tmp_path / "ct")
    group = _check_with_ct_decompressor(ck, tmp_path / "ct", "int-quantized")
    assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "token",
                                          "dynamic": True}


@pytest.mark.parametrize("family", ["tiny-mixtral", "tiny-deepseek"])
def test_asymmetric_3bit_group_decompresses_exactly(tmp_path, family):
    """Asymmetric int3 g64 (zero points packed along N). transformers 5.24's expert decompressor drops
    zero points ("Asymmetric quant requires zero-point values"), so this too is checked with
    compressed-tensors' own decompressor."""
    recipe = tmp_path / "asym3.json"
    recipe.write_text(json.dumps({"method": "rtn", "weight": {"kind": "int", "bits": 3, "symmetric": False,
                                                              "granularity": "group", "group_size": 64}}))
    ck = _quantize(tmp_path, family, "--recipe", recipe)
    _export(ck, tmp_path / "ct")
    group = _check_with_ct_decompressor(ck, tmp_path / "ct", "pack-quantized")
    assert group["weights"]["symmetric"] is False and group["weights"]["group_size"] == 64


@pytest.mark.parametrize("flags,why", [
    (("--recipe", "rtn-w4a8"), "int4-ch weights with int8 activations"),
    (("--recipe", "mxfp4-w4a4"), "MXFP4 activations"),
])
def test_refuses_activation_schemes_without_a_runtime(tmp_path, flags, why):
    ck = _quantize(tmp_path, "tiny-mixtral", *flags)
    line = one_line_error(cli("export", ck, "--format", "compressed-tensors", "--out", tmp_path / "ct"))
    assert why in line and "model.layers.0" in line


def test_refuses_pipelines(tmp_path):
    ck = tmp_path / "sd"
    assert cli("quantize", "zoo:tiny-sd", "--out", ck, "--recipe", "rtn-w8a8", "--calib-size", "2").exit_code == 0
    line = one_line_error(cli("export", ck, "--format", "compressed-tensors", "--out", tmp_path / "ct"))
    assert "transformers language models" in line
