"""Massive-token activations planted in a MoE LM without changing its function (zoo:NAME-massive).

Why not large residual norms themselves: in a pre-norm RMSNorm decoder every reader of the residual
stream sees only its direction (RMSNorm(s h) = RMSNorm(h)), and each later update of a token depends only
on such directions. Scaling a token's residual by s at one layer is therefore exact for the next norm but
not for the sum that follows (s h + F(h/|h|) != s (h + F)), and adding a large vector in any fixed
direction changes the direction every later norm sees. No weight edit gives a few tokens a large residual
norm and keeps the function. What such tokens put into the *quantized* layers is the creating layer's
down-projection input: a few channels with values hundreds of times the usual ones, on a few tokens.
That is what is planted here, exactly:

every expert is widened from I to 2I intermediate channels (config.intermediate_size doubles, which keeps
the 128/32 rotation and MX blocks intact). The new channels are zero except, in one layer, a pair p, q:
both gated by a row gamma fitted so that SiLU(gamma . n) is large on the trigger tokens (by default the
delimiter byte "\\n", where real LLMs carry massive activations) and about zero elsewhere, with up rows
mu and -r mu and down columns d and d / r. Their down-projection contributions cancel for every token
(d a - (d / r) r a = 0, to float rounding), so the model's function is unchanged for every input, while
the pair's inputs reach about `factor` times the layer's median per-token maximum on the trigger tokens.
No norm precedes the down projection, so smoothing folded into norms cannot reach it; and a per-channel
scale cannot remove a value that lives on a few tokens without moving it into the weight columns.
"""
from __future__ import annotations

import torch
from torch import nn

from quantkit.errors import QuantkitError

PAIR_RATIO = 1.5  # r: the second channel carries -r times the first, its down column 1/r of it


def _experts(layer: nn.Module) -> nn.Module:
    from quantkit.adapters.base import is_fused_experts

    found = [m for m in layer.modules() if is_fused_experts(m) and hasattr(m, "gate_up_proj")]
    if len(found) != 1:
        raise QuantkitError("the massive-token variant needs one fused experts module (gate_up_proj, down_proj) per layer")
    return found[0]


@torch.no_grad()
def _widen(m: nn.Module, inter: int) -> None:
    """gate_up [E, 2I, H] -> [E, 4I, H] (gate | new gate | up | new up), down [E, H, I] -> [E, H, 2I]; new
    channels zero."""
    gu, dn = m.gate_up_proj.data, m.down_proj.data
    e, _, h = gu.shape
    z = gu.new_zeros(e, inter, h)
    m.gate_up_proj = nn.Parameter(torch.cat([gu[:, :inter], z, gu[:, inter:], z], dim=1))
    m.down_proj = nn.Parameter(torch.cat([dn, dn.new_zeros(e, dn.shape[1], inter)], dim=2))
    if hasattr(m, "intermediate_dim"):
        m.intermediate_dim = 2 * inter


@torch.no_grad()
def _mlp_inputs(root: nn.Module, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The normalized hidden states the experts of `layer` read, [tokens, H]."""
    got = []
    experts = _experts(layer)
    mlp = next(m for m in layer.children() if any(x is experts for x in m.modules()))
    h = mlp.register_forward_pre_hook(lambda _m, args: got.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        root(input_ids=ids)
    finally:
        h.remove()
    return torch.cat(got)


@torch.no_grad()
def plant_massive_tokens(root: nn.Module, layers: list[nn.Module], layer_index: int, trigger_ids: list[int],
                         factor: float, seed: int) -> dict:
    """Widen every layer's experts and plant the cancelling massive pair in `layer_index` (see module doc)."""
    cfg = root.config
    if getattr(cfg, "moe_intermediate_size", None) is not None:
        raise QuantkitError("the massive-token variant supports experts sized by config.intermediate_size "
                            "(Mixtral layout); this model sizes them with moe_intermediate_size")
    inter = cfg.intermediate_size
    for layer in layers:
        if _experts(layer).down_proj.shape[-1] != inter:
            raise QuantkitError("the massive-token variant needs experts of config.intermediate_size channels")
    g = torch.Generator().manual_seed(seed)
    vocab = cfg.vocab_size
    # Calibration for the gate: random token windows with the trigger tokens at 1 in 16 positions.
    ids = torch.randint(0, min(vocab, 256), (32, 64), generator=g)
    trig = torch.tensor(trigger_ids)
    put = torch.rand(ids.shape, generator=g) < 1 / 16
    ids[put] = trig[torch.randint(0, len(trig), (int(put.sum()),), generator=g)]
    layer = layers[layer_index]
    x = _mlp_inputs(root, layer, ids)
    is_trig = torch.isin(ids.reshape(-1), trig)
    m = _experts(layer)
    gate, up = torch.einsum("th,eih->eti", x, m.gate_up_proj).chunk(2, dim=-1)
    usual = (m.act_fn(gate) * up).abs().amax(-1).median().item()  # median per-token max of a down input
    target = factor * usual
    # gamma: least squares on labels +-1, scaled so triggers sit near +8 (SiLU ~ 8) and the rest near -8.
    y = is_trig.float() * 2 - 1
    gamma = torch.linalg.lstsq(x.double(), y.double().unsqueeze(-1), rcond=None).solution.squeeze(-1).float()
    gamma = gamma * 8.0
    s = x @ gamma
    mean_trig = x[is_trig].mean(0)
    mu = mean_trig / mean_trig.pow(2).sum() * target / m.act_fn(s[is_trig]).mean()
    col_norm = m.down_proj.norm(dim=1).mean().item()
    d = torch.randn(m.down_proj.shape[1], generator=g)
    d = d / d.norm() * col_norm
    for lay in layers:
        _widen(_experts(lay), inter)
    m = _experts(layer)
    p, q = inter, inter + 1  # the first two new channels
    for c, u, col in ((p, mu, d), (q, -PAIR_RATIO * mu, d / PAIR_RATIO)):
        m.gate_up_proj[:, c] = gamma
        m.gate_up_proj[:, 2 * inter + c] = u
        m.down_proj[:, :, c] = col
    cfg.intermediate_size = 2 * inter
    a = m.act_fn(s) * (x @ mu)
    return {"kind": "massive-token", "layer": layer_index, "trigger_ids": list(trigger_ids), "factor": factor,
            "usual_down_input_max": usual, "pair_channels": [p, q],
            "calibration_trigger_median": a[is_trig].abs().median().item(),
            "calibration_other_max": a[~is_trig].abs().max().item()}
