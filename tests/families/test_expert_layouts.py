"""Experts and routers are classified by what they are: layouts, non-experts with 3-D weights, routers
under any name, the `.weight` view of replaced linears, and one-line refusals for methods a layout excludes."""
import pytest
import torch
from torch import nn

from quantkit.adapters import adapter_for
from quantkit.adapters.experts import classify_experts, expert_layout, moe_roles
from quantkit.config import Recipe
from quantkit.errors import QuantkitError
from quantkit.formats.spec import FormatSpec
from quantkit.layers import plan_layers
from quantkit.nn import QuantLinear

from moe_configs import build


def _experts(model):
    return [m for m in model.modules() if expert_layout(m) is not None]


def test_layouts_of_each_family():
    gpt = expert_layout(_experts(build("gpt_oss"))[0])
    assert (gpt.transposed, gpt.interleaved, gpt.custom_gate, gpt.has_bias, gpt.call) == (True, True, True, True, "routed")
    llama = expert_layout(_experts(build("llama4"))[0])
    assert (llama.transposed, llama.call, llama.standard) == (True, "dense", False)
    jet = _experts(build("jetmoe"))
    assert jet and all(expert_layout(m).kind == "parallel" for m in jet)
    assert expert_layout(_experts(build("mixtral"))[0]).standard


def test_conv1d_and_modulation_tables_are_not_experts():
    model = build("qwen3_next")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert convs and convs[0].weight.dim() == 3
    assert all(classify_experts(c) is None for c in convs)

    class Modulated(nn.Module):  # a 3-D parameter table that is not an experts class
        def __init__(self):
            super().__init__()
            self.scale_shift_table = nn.Parameter(torch.zeros(1, 6, 8))

    assert classify_experts(Modulated()) is None


def test_unknown_experts_layout_is_an_error_not_a_skip():
    class WeirdExperts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4, 8, 8))

    assert isinstance(classify_experts(WeirdExperts()), str)


def test_routers_found_by_structure_whatever_their_name():
    model = build("hunyuan_v1_moe")
    roles = moe_roles(model)
    wg = model.model.layers[0].mlp.gate.wg
    assert roles[id(wg)] == "router"
    jet = build("jetmoe")
    assert moe_roles(jet)[id(jet.model.layers[0].mlp.router.layer)] == "router"
    qwen_next = build("qwen3_next")
    moe = qwen_next.model.layers[0].mlp
    r = moe_roles(qwen_next)
    assert r[id(moe.shared_expert_gate)] == "router" and r[id(moe.shared_expert.down_proj)] == "shared_expert"


def test_weight_view_of_replaced_linear():
    lin = nn.Linear(32, 16)
    q = QuantLinear.from_linear(lin, FormatSpec(kind="int", bits=8, symmetric=True, granularity="channel"))
    assert q.weight.shape == (16, 32) and q.weight.dtype == torch.float32 and q.weight.device == lin.weight.device
    q = q.to(torch.bfloat16)
    assert q.weight.dtype == torch.bfloat16
    assert torch.allclose(q.weight.dequantize().float(), lin.weight, atol=0.02)


@pytest.mark.parametrize("family,recipe", [pytest.param(f, r, marks=pytest.mark.family(f, r.split("-")[0], "refusal"))
                                           for f in ("gpt_oss", "llama4", "jetmoe")
                                           for r in ("eaquant-w4a4-fast", "duquantpp-mxfp4-fast")])
def test_calibrated_method_refuses_non_standard_experts(family, recipe):
    model = build(family)
    with pytest.raises(QuantkitError, match="allowed for this layout: rtn with weight-only or dynamic activations"):
        plan_layers(model, adapter_for(model), Recipe.load(recipe))


def test_smoothing_folds_only_where_exact():
    """Scales are folded into a norm's gain only when that is exact: not into Qwen3-Next's (1 + w) gains, not into
    OLMo-2-style post-norms (FlexOlmo); Mixtral's pre-norm RMSNorms take them."""
    from quantkit.adapters.moe_lm import gain_is_linear

    mixtral, qnext, flex = build("mixtral"), build("qwen3_next"), build("flex_olmo")
    assert gain_is_linear(mixtral.model.layers[0].input_layernorm)
    assert not gain_is_linear(qnext.model.layers[1].input_layernorm)
    assert len(adapter_for(mixtral).norm_consumers(mixtral.model.layers[0])) == 2
    assert adapter_for(qnext).norm_consumers(qnext.model.layers[1]) == []
    assert adapter_for(flex).norm_consumers(flex.model.layers[0]) == []


def test_cuda_load_report_names_expert_layouts_without_a_fused_kernel(monkeypatch):
    """Llama-4's dense call and JetMoE's parallel experts run torch matmuls on CUDA: the load report names
    them; gpt-oss's routed experts run the fused kernels (its gate between the GEMMs), so they are not named."""
    from quantkit.kernels.prepare import cuda_fallbacks
    from quantkit.nn_experts import build_experts

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # device aside: the reasons must be about the layers
    spec = FormatSpec(kind="int", bits=4, symmetric=True, granularity="channel")
    found = {}
    for family in ("gpt_oss", "llama4", "jetmoe"):
        holder = nn.ModuleList(build_experts(m, spec, None, None) for m in _experts(build(family)))
        found[family] = cuda_fallbacks(holder.half(), torch.float16)
    assert found["gpt_oss"] == {}
    assert found["llama4"] and all("dense" in r for r in found["llama4"].values())
    assert found["jetmoe"] and all("parallel experts" in r for r in found["jetmoe"].values())
