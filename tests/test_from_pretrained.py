"""Plain transformers / diffusers from_pretrained on quantkit checkpoints (after `import quantkit`), and
save_pretrained round trips that reload to identical outputs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantkit
from quantkit.nn import QuantExperts, QuantLinear
from helpers import cli

IDS = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
DATA = Path(__file__).parent / "data"


def _ckpt(tmp_path, model, *flags):
    out = tmp_path / "ck"
    r = cli("quantize", model, "--out", out, *flags)
    assert r.exit_code == 0, r.output
    return out


def _logits(m):
    with torch.no_grad():
        return m(IDS).logits


def _latents(pipe, **kw):
    out = pipe(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images
    return torch.as_tensor(out)  # DiTPipeline returns numpy


@pytest.mark.parametrize("recipe", ["duquantpp-mxfp4-fast", "eaquant-w4a4-fast"])
def test_moe_lm_with_rotations(tmp_path, recipe):
    """Online rotations (DuQuant++), EAQuant's smoothing + quantized routers (QuantRouter)."""
    from transformers import AutoModelForCausalLM

    ck = _ckpt(tmp_path, "zoo:tiny-mixtral", "--recipe", recipe, "--calib-size", "2")
    ref = _logits(quantkit.load(ck))
    m = AutoModelForCausalLM.from_pretrained(ck)
    assert isinstance(m.model.layers[0].mlp.experts, QuantExperts)
    assert m.model.layers[0].self_attn.q_proj.rotation is not None
    assert torch.equal(_logits(m), ref)
    m.save_pretrained(tmp_path / "resaved")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")), ref)
    quantkit.load(ck).save_pretrained(tmp_path / "resaved2")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "resaved2")), ref)


def test_sd_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    ck = _ckpt(tmp_path, "zoo:tiny-sd", "--recipe", "rtn-w4a8", "--calib-size", "2")
    ref = _latents(quantkit.load(ck), prompt="a red bus")
    pipe = DiffusionPipeline.from_pretrained(ck)
    assert any(isinstance(m, QuantLinear) for m in pipe.unet.modules())
    assert torch.equal(_latents(pipe, prompt="a red bus"), ref)
    pipe.save_pretrained(tmp_path / "resaved")
    assert torch.equal(_latents(DiffusionPipeline.from_pretrained(tmp_path / "resaved"), prompt="a red bus"), ref)


def test_dit_pipeline_with_dgq(tmp_path):
    from diffusers import DiffusionPipeline

    from quantkit.quantizers.group_act import GroupActQuantizer

    ck = _ckpt(tmp_path, "zoo:digits-dit", "--recipe", "dgq-w8a6", "--calib-size", "2", "--calib-steps", "2")
    ref = _latents(quantkit.load(ck), class_labels=[3])
    pipe = DiffusionPipeline.from_pretrained(ck)
    assert any(isinstance(m, GroupActQuantizer) for m in pipe.transformer.modules())
    assert torch.equal(_latents(pipe, class_labels=[3]), ref)
    pipe.save_pretrained(tmp_path / "resaved")
    assert torch.equal(_latents(DiffusionPipeline.from_pretrained(tmp_path / "resaved"), class_labels=[3]), ref)


def test_in_memory_quantized_model_save_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    m = MixtralForCausalLM(MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                                         num_experts_per_tok=1, max_position_embeddings=32)).eval()
    q = quantkit.quantize(m, "rtn-w4a8")
    q.save_pretrained(tmp_path / "hf")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")), _logits(q))


def test_without_quantkit_from_pretrained_refuses(tmp_path):
    """Without quantkit's quantizer, transformers only warns about the unknown quant_method; the zero-byte
    sentinels under the original weight names make it fail on the size mismatch instead of loading random
    weights, for quantkit's own folder and for one written by save_pretrained."""
    ck = _ckpt(tmp_path, "zoo:tiny-mixtral", "--recipe", "rtn-w4a16-g128")
    quantkit.load(ck).save_pretrained(tmp_path / "resaved")
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            "for folder in sys.argv[1:]:\n"
            "    try:\n        AutoModelForCausalLM.from_pretrained(folder)\n"
            "    except RuntimeError as e:\n        print('refused', folder)\n")
    # cwd: from the repository root, transformers' probe of the `kernels` package would find ./kernels,
    # which imports quantkit (and so registers it).
    # Nor from PYTHONPATH (a worktree run puts the repository root there).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code, str(ck), str(tmp_path / "resaved")], capture_output=True,
                       text=True, timeout=600, cwd=tmp_path, env=env)
    assert r.stdout.count("refused") == 2, r.stdout + r.stderr[-2000:]
    assert "Unknown quantization type, got quantkit" in r.stderr


def test_without_quantkit_diffusers_refuses(tmp_path):
    ck = _ckpt(tmp_path, "zoo:tiny-sd", "--recipe", "rtn-w8a8", "--calib-size", "2")
    code = ("import sys\nfrom diffusers import DiffusionPipeline\n"
            "try:\n    DiffusionPipeline.from_pretrained(sys.argv[1])\n"
            "except ValueError as e:\n    print('refused', e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(ck)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert "refused Unknown quantization type, got quantkit" in r.stdout, r.stdout + r.stderr[-2000:]


def test_format_version_1_checkpoint_still_loads(tmp_path):
    """A checked-in version-1 checkpoint (quantized.safetensors, no quantization_config) loads unchanged,
    and its save_pretrained is a version-2 folder that plain from_pretrained reloads the same."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ck = DATA / "ckpt-v1-mixtral-w4"
    expected = load_file(DATA / "ckpt-v1-mixtral-w4.expected.safetensors")
    m = quantkit.load(ck)
    stored = load_file(ck / "quantized.safetensors")
    state = m.state_dict()
    assert all(torch.equal(state[k], v) for k, v in stored.items())  # every stored tensor loads bit for bit
    with torch.no_grad():
        logits = m(expected["input_ids"]).logits
    # The expected logits were recorded on another CPU: its fp32 matmul kernels round differently
    # (seen: 6e-8 on logits up to 0.65), so the recorded values match to fp32 rounding, not bit for bit.
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)
    m.save_pretrained(tmp_path / "v2")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "v2")
    assert isinstance(again.model.layers[0].mlp.experts, QuantExperts)
    with torch.no_grad():
        assert torch.equal(again(expected["input_ids"]).logits, logits)  # same machine: bit for bit
