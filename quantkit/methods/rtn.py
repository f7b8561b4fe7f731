"""Round-to-nearest: min-max scales for weights; static activation ranges from calibration min/max."""
from __future__ import annotations

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.layers import LayerTask, build_quantized
from quantkit.methods.base import BlockContext, Method, register
from quantkit.nn import QuantExperts
from quantkit.quantizers.activation import ActQuantizer


def observe_ranges(ctx: BlockContext, tasks: list[LayerTask]) -> dict[str, tuple[ActQuantizer, ...]]:
    """Run the full-precision block on its inputs and record each static layer input's min/max."""
    observers: dict[str, tuple[ActQuantizer, ...]] = {}
    handles = []
    for t in tasks:
        cfg = t.plan.activation
        if cfg is None or cfg.dynamic:
            continue
        obs = tuple(ActQuantizer(cfg.format, dynamic=False) for _ in range(2 if t.kind == "experts" else 1))
        observers[t.name] = obs

        def hook(mod, args, kwargs, obs=obs, kind=t.kind):
            x = args[0] if args else kwargs["hidden_states"]
            obs[0].observe(x)
            if kind == "experts":
                idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
                obs[1].observe(_expert_mid_activations(mod, x, idx))

        handles.append(t.module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        ctx.run()
    finally:
        for h in handles:
            h.remove()
    return observers


@torch.no_grad()
def _expert_mid_activations(experts: nn.Module, x: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
    """The inputs of the down projections of every routed (token, expert) pair, concatenated."""
    mids = []
    for e in torch.unique(top_k_index).tolist():
        if not 0 <= e < experts.gate_up_proj.shape[0]:
            continue
        tok = torch.where(top_k_index == e)[0]
        gate, up = torch.nn.functional.linear(x[tok], experts.gate_up_proj[e]).chunk(2, dim=-1)
        mids.append(experts.act_fn(gate) * up)
    return torch.cat(mids) if mids else x.new_zeros(1, experts.down_proj.shape[-1])


def apply_static_ranges(qmodule: nn.Module, observers: tuple[ActQuantizer, ...]) -> None:
    """Copy observed ranges into the quantized module's static activation quantizers."""
    targets = [qmodule.act_in, qmodule.act_mid] if isinstance(qmodule, QuantExperts) else [qmodule.act]
    for target, obs in zip(targets, observers):
        obs.finalize()
        target.scale = obs.scale.clone()
        if obs.zero is not None:
            target.zero = obs.zero.clone()


@register("rtn")
class RTN(Method):
    data_parallel = True  # static ranges are a min and a max: exact when reduced across ranks' calls

    @classmethod
    def option_defaults(cls) -> dict:
        return {}  # min-max scales: nothing to tune

    def quantize_block(self, ctx: BlockContext) -> dict[str, nn.Module]:
        tasks = [t for t in ctx.tasks if not t.plan.skip]
        observers = observe_ranges(ctx, tasks) if ctx.inputs is not None else {}
        if self.ranks is not None:  # under torchrun each rank saw its share of the calls
            for obs in observers.values():
                for o in obs:
                    o.observed_min, o.observed_max = self.ranks.widen(o.observed_min, o.observed_max)
        out = {}
        for t in tasks:
            q = build_quantized(t)
            if t.name in observers:
                try:
                    apply_static_ranges(q, observers[t.name])
                except QuantkitError as e:
                    raise QuantkitError(f"layer {t.name}: {e}") from None
            out[t.name] = q
        return out
