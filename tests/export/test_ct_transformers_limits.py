"""What plain transformers 5.24 cannot load, shown on checkpoints written by compressed-tensors' own
ModelCompressor (the per-expert layout llm-compressor writes), not by quantkit's exporter.

If transformers starts loading one of these, the failing case here fails and the export tests should switch
that scheme from the decompressor check to a plain `from_pretrained` check (docs/export-formats.md)."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationConfig,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402


def _linear_tree(state: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, list[str]]:
    """nn.Linear modules at the hub names of every 2-D weight (per-expert names included), nothing else."""
    root, names = torch.nn.Module(), []
    for key, w in state.items():
        if not key.endswith(".weight") or w.dim() != 2 or "embed" in key:
            continue
        name = key[: -len(".weight")]
        parent = root
        for part in name.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = w.clone()
        parent.add_module(name.rsplit(".", 1)[-1], lin)
        names.append(name)
    return root, names


def _write_with_compressed_tensors(tmp: Path, preset: str) -> Path:
    """A tiny Mixtral, every linear but the LM head and routers quantized with `preset` and compressed by
    compressed-tensors' own ModelCompressor; weight qparams from compressed-tensors' calculate_qparams."""
    dense, out = tmp / "dense", tmp / preset
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=128, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    MixtralForCausalLM(cfg).save_pretrained(dense)
    state = load_file(dense / "model.safetensors")
    root, names = _linear_tree(state)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    apply_quantization_config(root, QuantizationConfig(config_groups={"group_0": scheme},
                                                       ignore=["lm_head", "re:.*block_sparse_moe.gate$"]))
    for _, m in root.named_modules():
        if not hasattr(m, "weight_scale"):
            continue
        w = m.weight.data
        gs = scheme.weights.group_size
        view = w.reshape(w.shape[0], -1, gs) if gs else w
        scale, zp = calculate_qparams(view.amin(-1), view.amax(-1), scheme.weights)
        m.weight_scale.data = scale.reshape(m.weight_scale.shape).to(m.weight_scale.dtype)
        if hasattr(m, "weight_zero_point"):
            m.weight_zero_point.data = zp.reshape(m.weight_zero_point.shape).to(m.weight_zero_point.dtype)
    compressor = ModelCompressor.from_pretrained_model(root)
    compressor.compress_model(root)
    tensors = {k: v for k, v in state.items() if not (k.endswith(".weight") and k[: -len(".weight")] in names)}
    tensors.update({k: v.contiguous() for k, v in root.state_dict().items()})
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text((dense / "config.json").read_text())
    compressor.update_config(out)
    return out


def _load(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path)


def test_control_symmetric_w4a16_written_the_same_way_loads(tmp_path):
    """The builder is sound: the scheme transformers does handle loads, experts equal to the dense weights'
    compressed-tensors round trip (not random init)."""
    model = _load(_write_with_compressed_tensors(tmp_path, "W4A16"))
    dense = load_file(tmp_path / "dense" / "model.safetensors")
    w1 = dense["model.layers.0.block_sparse_moe.experts.2.w1.weight"]
    loaded = model.model.layers[0].mlp.experts.gate_up_proj[2, : w1.shape[0]]
    assert (loaded.float() - w1).abs().max() < w1.abs().max() / 7  # int4 rounding, not a fresh init
    assert not torch.equal(loaded.float(), w1)


@pytest.mark.parametrize("preset,error", [
    ("W8A8", "Concatenate on tensors destined for model.layers.0.mlp.experts.gate_up_proj. Ckpt contains: 0"),
    ("W4A16_ASYM", "Asymmetric quant requires zero-point values"),
])
def test_transformers_cannot_load_compressed_tensors_moe(tmp_path, preset, error):
    path = _write_with_compressed_tensors(tmp_path, preset)
    report = _Records()
    hf_logger = transformers_logging.get_logger("transformers")  # its load report goes here, not to root
    hf_logger.addHandler(report)
    try:
        with pytest.raises(RuntimeError, match="automatic conversion of the weights"):
            _load(path)
    finally:
        hf_logger.removeHandler(report)
    assert any(error in text for text in report.texts), report.texts


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(record.getMessage())
