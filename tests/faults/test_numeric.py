"""Numeric faults: non-finite values met during calibration stop the run naming where they appeared;
degenerate layers (all-zero weights, constant inputs) get valid, finite scales."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import bad_inputs as bi
from helpers import cli
from quantkit.errors import QuantkitError

STATIC_RTN = ("method: rtn\nweight: {kind: int, bits: 4, symmetric: false}\n"
              "activation: {kind: int, bits: 8, symmetric: false, granularity: tensor, dynamic: false}\ncalib_size: 2\n")


def test_overflowing_activations_stop_the_run_naming_the_place(tmp_path: Path) -> None:
    src = bi.dit_variant(tmp_path, bi.huge_weight)  # finite weights whose outputs overflow to Inf
    recipe = bi.write(tmp_path / "r.yaml", STATIC_RTN)
    out = tmp_path / "o"
    r = cli("quantize", src, "--recipe", recipe, "--out", out)
    assert r.exit_code == 2 and "internal error" not in r.output and "Traceback" not in r.output, r.output
    err = r.output[r.output.index("error:"):]
    assert ("Inf" in err or "NaN" in err) and ("transformer_blocks" in err or "proj_out" in err), err
    assert not out.exists()


def test_module_with_nan_scale_is_refused() -> None:
    from quantkit.numeric_guard import check_module_finite

    m = nn.Linear(4, 4)
    m.register_buffer("scale", torch.tensor([1.0, float("nan")]))
    with pytest.raises(QuantkitError, match="layer blocks.0.fc: quantization produced NaN in scale"):
        check_module_finite("blocks.0.fc", m)


def test_non_finite_hessian_is_refused() -> None:
    from quantkit.formats.spec import FormatSpec
    from quantkit.quantizers.gptq import gptq_quantize

    h = torch.eye(8, dtype=torch.float64)
    h[2, 2] = float("inf")
    with pytest.raises(QuantkitError, match="Hessian holds Inf"):
        gptq_quantize(torch.randn(4, 8), h, FormatSpec("int", 4, True, "channel"))


def test_nan_calibration_inputs_are_refused() -> None:
    from quantkit.adapters.base import CallArgs
    from quantkit.numeric_guard import check_inputs_finite

    calls = [CallArgs((torch.ones(2),), {}), CallArgs((), {"x": torch.tensor([0.0, float("nan")])})]
    with pytest.raises(QuantkitError, match="entering block 3 contain NaN \\(calibration call 1\\)"):
        check_inputs_finite(calls, "block 3")


def test_degenerate_layer_gets_a_valid_result(tmp_path: Path) -> None:
    """Documented result (docs/bad-inputs.md): an all-zero weight row gets scale 1 and code zero, so the
    layer stays exactly zero; its zero output (a constant channel downstream) calibrates finite ranges."""
    from safetensors.torch import load_file

    import quantkit

    src = bi.dit_variant(tmp_path, bi.zero_layer)
    recipe = bi.write(tmp_path / "r.yaml", STATIC_RTN)
    out = tmp_path / "o"
    r = cli("quantize", src, "--recipe", recipe, "--out", out)
    assert r.exit_code == 0, r.output
    sd = load_file(str(bi.weight_file(out)))
    name = "transformer_blocks.0.attn1.to_q"
    assert torch.equal(sd[f"{name}.scale"].float(), torch.ones_like(sd[f"{name}.scale"].float()))
    for k, v in sd.items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k
    model = quantkit.load(out)
    layer = model.get_submodule(name)
    x = torch.randn(3, layer.in_features if hasattr(layer, "in_features") else 128)
    assert torch.equal(layer(x), layer.bias.expand(3, -1) if layer.bias is not None else torch.zeros(3, 128))
    assert json.loads((out / "quantization.json").read_text())["layers"][name]


def test_fewer_prompts_than_calib_size_is_announced(tmp_path: Path, caplog) -> None:
    """Documented safe result: prompts are repeated with their own noise, and a warning says so."""
    import logging

    from quantkit.calib.capture import pipeline_calls
    from quantkit.models import load_model

    prompts = bi.write(tmp_path / "p.txt", "a red bus\n")
    caplog.set_level(logging.WARNING)
    calls = pipeline_calls(load_model("zoo:tiny-sd"), 2, 0, steps=1, prompts_file=str(prompts))
    assert calls and "has 1 prompts, fewer than calib_size 2" in caplog.text
