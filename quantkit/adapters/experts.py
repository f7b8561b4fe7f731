"""What an experts module is, decided from what it is (its type and structure), never from a tensor's rank.

transformers 5 keeps MoE experts in a few layouts:
- the experts interface (`@use_experts_implementation`): `gate_up_proj` + `down_proj` 3-D parameters, flags
  `is_transposed` ([E, H, 2I] / [E, I, H], input dimension first: gpt-oss, Aria), `is_concatenated`
  (False: gate/up rows interleaved, gpt-oss), `has_bias`, `has_gate`, and the class's own `_apply_gate`
  (gpt-oss clamps and uses (up + 1) * glu); called as experts(hidden [T, H], top_k_index, top_k_weights);
- Llama-4's `Llama4TextExperts`: transposed, concatenated, called densely on [E*T, H] inputs that the MoE
  block already scaled by the router scores;
- JetMoE's `JetMoeParallelExperts`: one [E, out, in] `weight` per projection, called as (inputs, expert_size).
An experts class (its name says Expert) that holds 3-D parameters in none of these layouts is reported as an
unknown layout (an error unless a rule skips it); other 3-D parameters (Conv1d of linear-attention / state-space
blocks, adaLN modulation tables) are never taken for experts.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

# Per-family knowledge for experts classes outside transformers' experts interface.
DENSE_EXPERTS = {"Llama4TextExperts"}  # gate_up [E, H, 2I], down [E, I, H], forward(hidden [E*T, H])
PARALLEL_EXPERTS = {"JetMoeParallelExperts"}  # weight [E, out, in], forward(inputs, expert_size)
# torch layers whose multi-dimensional weights are what their type says (convolutions), never experts.
TORCH_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                nn.ConvTranspose3d, nn.Embedding, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class ExpertLayout:
    """How one experts module stores and uses its weights."""

    kind: str  # "fused": gate_up + down pair; "parallel": one [E, out, in] weight (JetMoE)
    num_experts: int
    in_dim: int  # K of the (first) projection: H for fused, input_size for parallel
    out_dim: int  # 2I for fused (gate_up rows), output_size for parallel
    mid_dim: int = 0  # I (fused only): the down projection's input
    transposed: bool = False  # stored input dimension first
    interleaved: bool = False  # gate/up rows alternate (gpt-oss)
    custom_gate: bool = False  # the class defines its own _apply_gate
    call: str = "routed"  # "routed": (hidden, top_k_index, top_k_weights); "dense": (hidden [E*T, H]) ; "parallel"
    has_bias: bool = False
    cls: str = ""

    @property
    def standard(self) -> bool:
        """gate_up [E, 2I, H] / down [E, H, I], chunked gate/up, act_fn(gate) * up, routed: what every method
        and kernel handles directly."""
        return (self.kind == "fused" and not self.transposed and not self.interleaved and not self.custom_gate
                and self.call == "routed")

    @property
    def kernel_ready(self) -> bool:
        """Standard once the weights are stored [E, N, K] (transposition happens at quantization)."""
        return self.kind == "fused" and not self.interleaved and not self.custom_gate and self.call == "routed"

    def describe(self) -> str:
        bits = [self.cls or self.kind]
        if self.transposed:
            bits.append("input-dimension-first storage")
        if self.interleaved:
            bits.append("interleaved gate/up")
        if self.custom_gate:
            bits.append("custom gate function")
        if self.call != "routed":
            bits.append(f"{self.call} call")
        if self.has_bias:
            bits.append("expert biases")
        return ", ".join(bits)


def _own_3d(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3]


def _default_gate() -> object | None:
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # older transformers: no experts interface
        return None
    return _default_apply_gate


def _fused(module: nn.Module, transposed: bool, interleaved: bool, call: str, custom_gate: bool,
           has_bias: bool) -> ExpertLayout | str:
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(dn, torch.Tensor) or gu.dim() != 3 or dn.dim() != 3:
        return "no 3-D gate_up_proj/down_proj pair"
    if transposed:
        e, h, two_i = gu.shape
        want = (e, two_i // 2, h)
    else:
        e, two_i, h = gu.shape
        want = (e, h, two_i // 2)
    if two_i % 2 or tuple(dn.shape) != want:
        return (f"shapes gate_up_proj {tuple(gu.shape)} / down_proj {tuple(dn.shape)} do not match its "
                f"{'transposed ' if transposed else ''}layout")
    if not custom_gate and not hasattr(module, "act_fn"):
        return "no act_fn attribute"
    if has_bias and (getattr(module, "gate_up_proj_bias", None) is None or getattr(module, "down_proj_bias", None) is None):
        return "declares biases but has no gate_up_proj_bias/down_proj_bias"
    return ExpertLayout("fused", e, h, two_i, two_i // 2, transposed, interleaved, custom_gate, call, has_bias,
                        type(module).__name__)


def classify_experts(module: nn.Module) -> ExpertLayout | str | None:
    """The layout of an experts module; a reason string for an experts-like module quantkit cannot handle
    (3-D parameters of an unknown layout); None for anything that is not experts."""
    if isinstance(module, TORCH_LAYERS):
        return None
    name = type(module).__name__
    if name in PARALLEL_EXPERTS:
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            return f"{name} has no 3-D weight"
        e, out_dim, in_dim = w.shape
        return ExpertLayout("parallel", e, in_dim, out_dim, call="parallel", cls=name)
    if name in DENSE_EXPERTS:
        return _fused(module, True, False, "dense", False, False)
    if hasattr(module, "is_transposed") and hasattr(module, "has_gate") and hasattr(module, "down_proj"):
        # transformers' experts interface: the class says how it stores its weights.
        if not module.has_gate:
            return "experts without a gate projection (up_proj only) are not supported yet"
        if getattr(module, "has_post_expert_norm", False):
            return "experts with a post-expert norm are not supported yet"
        gate_fn = getattr(type(module), "_apply_gate", None)
        custom = gate_fn is not None and gate_fn is not _default_gate()
        return _fused(module, bool(module.is_transposed), not getattr(module, "is_concatenated", True), "routed",
                      custom, bool(getattr(module, "has_bias", False)))
    three_d = _own_3d(module)
    if not three_d or "expert" not in name.lower():
        # 3-D tensors of something that is not an experts class (a modulation table, a position table): not
        # a weight quantkit quantizes, and not guessed to be one from its rank.
        return None
    if hasattr(module, "gate_up_proj") and hasattr(module, "down_proj"):
        # Older transformers (no interface flags): [E, 2I, H] / [E, H, I] called with routing indices.
        params = list(inspect.signature(module.forward).parameters)
        if len(params) >= 3:
            layout = _fused(module, False, False, "routed", False, getattr(module, "gate_up_proj_bias", None) is not None)
            if isinstance(layout, ExpertLayout):
                return layout
    return f"{name} holds 3-D parameters {three_d} of a layout quantkit does not recognise as experts"


def expert_layout(module: nn.Module) -> ExpertLayout | None:
    c = classify_experts(module)
    return c if isinstance(c, ExpertLayout) else None


def canonical_weights(module: nn.Module, layout: ExpertLayout) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Expert weights as [E, N, K] (quantized along K, the input dimension): (gate_up, down) or (weight, None)."""
    if layout.kind == "parallel":
        return module.weight.detach(), None
    gu, dn = module.gate_up_proj.detach(), module.down_proj.detach()
    if layout.transposed:
        gu, dn = gu.transpose(1, 2).contiguous(), dn.transpose(1, 2).contiguous()
    return gu, dn


def _out_in(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a linear-like module: nn.Linear, a custom router with a 2-D `weight`, or their quantized
    replacements (QuantLinear / QuantRouter)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, TORCH_LAYERS):
        return None
    w = module._parameters.get("weight")
    if isinstance(w, nn.Parameter) and w.dim() == 2:
        return tuple(w.shape)  # type: ignore[return-value]
    if hasattr(module, "qweight") and hasattr(module, "out_features") and hasattr(module, "in_features") \
            and not hasattr(module, "num_experts"):
        return module.out_features, module.in_features
    return None


def _experts_geometry(module: nn.Module) -> tuple[int, int] | None:
    """(num_experts, input dim) of an experts module, full precision or already quantized."""
    lay = expert_layout(module)
    if lay is not None:
        return lay.num_experts, lay.in_dim
    if hasattr(module, "qweight") or hasattr(module, "gate_up_qweight"):
        if hasattr(module, "num_experts") and hasattr(module, "hidden_dim"):
            return module.num_experts, module.hidden_dim  # QuantExperts
        if hasattr(module, "num_experts") and hasattr(module, "in_features"):
            return module.num_experts, module.in_features  # QuantParallelExperts
    return None


def moe_roles(root: nn.Module) -> dict[int, str]:
    """Roles of the modules of every MoE block, found from the block's structure (keyed by id(module)).

    The MoE block is the parent of an experts module. In it, a linear (or custom router) reading the hidden
    state whose output has one entry per expert is the router (its output is what picks the experts), one
    with a single output is a shared expert's gate; the experts are experts; every other linear of the
    block belongs to a shared expert. Names (`gate`, `router`, `wg`, ...) play no part. Works on a quantized
    model too (quantized experts and routers keep their geometry)."""
    roles: dict[int, str] = {}
    modules = dict(root.named_modules())
    for name, module in modules.items():
        geo = _experts_geometry(module)
        if geo is None:
            continue
        n_experts, hidden = geo
        block = modules.get(name.rpartition(".")[0], root)
        experts = [m for m in block.modules() if _experts_geometry(m) is not None]
        inside = {id(s) for m in experts for s in m.modules()}
        for sub in block.modules():
            if id(sub) in inside:
                roles[id(sub)] = "expert"
                continue
            shape = _out_in(sub)
            if shape is None:
                continue
            if shape[1] == hidden and shape[0] in (n_experts, 1):
                roles[id(sub)] = "router"
            elif id(sub) not in roles:
                roles[id(sub)] = "shared_expert"
    return roles


# The experts implementations whose arithmetic quantkit.expert_shard reproduces when each rank computes only
# its own experts: transformers' grouped one (sort pairs by expert, grouped matmul, per-token sum over the
# top-k slots) and its eager per-expert loop (index_add_ in expert order).
SPLIT_IMPLEMENTATIONS = ("grouped_mm", "eager")


def _eager_loop_source() -> str | None:
    """transformers' eager per-expert loop as its experts-interface families share it (modular transformers
    copies one text into each; OLMoE's copy is the reference)."""
    try:
        from transformers.models.olmoe.modeling_olmoe import OlmoeExperts
    except ImportError:
        return None
    fn = getattr(OlmoeExperts.forward, "__wrapped__", None)
    return inspect.getsource(fn) if fn is not None else None


def experts_implementation(module: nn.Module) -> str:
    """The transformers experts implementation this module's forward runs ('eager' when it names none)."""
    return getattr(getattr(module, "config", None), "_experts_implementation", None) or "eager"


def expert_split_problem(module: nn.Module) -> str | None:
    """None if one rank can compute this experts module's output from its own experts' outputs and the other
    ranks' (quantkit.expert_shard) bit for bit; else why not."""
    layout = expert_layout(module)
    name = type(module).__name__
    if layout is None or layout.kind != "fused" or layout.call != "routed":
        return f"{name} is not a routed experts module of transformers' experts interface"
    fn = getattr(type(module).forward, "__wrapped__", None)  # the interface's dispatching forward wraps it
    if fn is None or not hasattr(module, "has_gate"):
        return f"{name} does not dispatch through transformers' experts interface"
    impl = experts_implementation(module)
    if impl not in SPLIT_IMPLEMENTATIONS:
        return f"{name} runs the {impl!r} experts implementation (split: {', '.join(SPLIT_IMPLEMENTATIONS)})"
    if impl == "eager" and inspect.getsource(fn) != _eager_loop_source():
        return f"{name}'s eager forward is not transformers' standard per-expert loop"
    return None
