"""Write a gpt-oss checkpoint the way the hub ships it: experts as MXFP4 `*_blocks` (two E2M1 codes a byte, low
nibble first) and `*_scales` (E8M0, bias 127) per 32 inputs, `quantization_config: {quant_method: mxfp4}`."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def to_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] -> blocks [E, N, K/32, 16] uint8, scales [E, N, K/32] uint8."""
    from transformers.integrations.mxfp4 import FP4_VALUES

    lut = torch.tensor(FP4_VALUES)
    e, n, k = w.shape
    g = w.reshape(e, n, k // 32, 32)
    exp = torch.floor(torch.log2(g.abs().amax(-1).clamp(min=2 ** -126))) - 2  # E2M1's largest value is 1.5 * 2^2
    codes = ((g / torch.exp2(exp)[..., None])[..., None] - lut).abs().argmin(-1).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exp + 127).to(torch.uint8)


def write_native_mxfp4(model: torch.nn.Module, out: Path) -> None:
    from safetensors.torch import load_file, save_file

    tmp = out.parent / (out.name + ".fp")
    model.save_pretrained(tmp)
    state = {}
    for k, v in load_file(tmp / "model.safetensors").items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            # gpt-oss stores experts input-first [E, K, N]; the hub's blocks run along K per output row.
            state[k + "_blocks"], state[k + "_scales"] = to_mxfp4(v.transpose(1, 2).contiguous())
        else:
            state[k] = v
    out.mkdir(parents=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(cfg))
