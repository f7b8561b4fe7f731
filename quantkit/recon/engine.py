"""Block reconstruction (BRECQ / QDrop style): learn the rounding of every weight and the step of
every static activation quantizer of one block so that the quantized block, fed the quantized
model's inputs (mixed with full-precision ones), reproduces the full-precision block's output."""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch
from torch import nn

from quantkit.adapters.base import CallArgs
from quantkit.errors import QuantkitError
from quantkit.layers import LayerTask, make_act, set_submodule
from quantkit.recon.act import LSQActQuantizer, init_static_range
from quantkit.recon.data import collate, main_tensor, mix_inputs, split_call
from quantkit.recon.layers import ROUNDINGS, ReconLayer, make_act_module, make_rounding
from quantkit.recon.losses import FBR_LAYER_SETS, LayerOutputLoss, lp_loss

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
_ACT_SAMPLE = 16384  # input values kept per layer for the activation-range search


@dataclass(frozen=True)
class ReconConfig:
    """Options of one block reconstruction (recipe `method_options` use the same names)."""

    rounding: str = "adaround"  # adaround | flexround | nearest
    iters: int = 200
    batch_size: int = 8
    lr_w: float = 1e-2  # AdaRound alpha / FlexRound log-scales
    # lr_w when rounding is flexround, for recipes whose lr_w is tuned for AdaRound's alpha (None = lr_w)
    lr_w_flexround: float | None = None
    lr_a: float = 1e-4  # LSQ activation steps
    input_prob: float = 0.5  # QDrop: P(quantized-model input) per element; 1 = quantized only, 0 = FP only
    act_drop_prob: float = 0.5  # QDrop inside activation quantizers: P(keep the FP value) while training
    lambda_add: float = 0.0  # EDA-DM FBR weight of the per-layer terms (0 = plain block reconstruction)
    fbr_layers: str = "all"  # all (paper) | code (official code: drop the last registered layer)
    weight_init: str = "mse"  # mse (Lp-2.4 search, EDA-DM) | minmax (= RTN grid)
    act_init: str = "mse"
    learn_act_step: bool = True
    round_reg: bool = False  # AdaRound regularizer; EDA-DM's code trains without it
    round_reg_weight: float = 1e-4
    flexround_s4: bool = True  # paper's per-input-channel s4; the official LLM code has none
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise QuantkitError(f"unknown rounding {self.rounding!r}; allowed: {', '.join(ROUNDINGS)}")
        if self.fbr_layers not in FBR_LAYER_SETS:
            raise QuantkitError(f"unknown fbr_layers {self.fbr_layers!r}; allowed: {', '.join(FBR_LAYER_SETS)}")
        if self.iters < 0 or self.batch_size < 1:
            raise QuantkitError(f"iters must be >= 0 and batch_size >= 1, got {self.iters} and {self.batch_size}")
        for name in ("input_prob", "act_drop_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise QuantkitError(f"{name} must be between 0 and 1, got {getattr(self, name)}")

    @classmethod
    def from_options(cls, options: dict[str, Any], **defaults: Any) -> "ReconConfig":
        """Take the known keys of a recipe's method_options over `defaults`; unknown keys are an error."""
        known = {f.name: f.type for f in fields(cls)}
        merged = {**defaults}
        for k, v in options.items():
            if k in known:
                merged[k] = tuple(v) if isinstance(v, list) else v
        return cls(**merged)


@dataclass
class ReconResult:
    modules: dict[str, nn.Module]  # full layer name -> shipped quantized module
    loss_start: float  # block loss with the initial (hard) rounding, quantized inputs
    loss_end: float  # the same after reconstruction
    history: list[float] = field(default_factory=list)


def _device_of(block: nn.Module) -> torch.device:
    for p in block.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def _collect_inputs(block: nn.Module, tasks: list[LayerTask], local: dict[str, str],
                    calls: list[CallArgs], seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(min, max, subsample) of each static-activation layer's input, block run on `calls`."""
    stats: dict[str, list] = {}
    gen = torch.Generator().manual_seed(seed)
    handles = []
    for t in tasks:
        cfg = t.plan.activation
        if cfg is None or cfg.dynamic:
            continue
        stats[t.name] = [torch.tensor(float("inf")), torch.tensor(float("-inf")), []]

        def hook(_m, args, name=t.name):
            x = args[0].detach().float().reshape(-1).cpu()
            s = stats[name]
            s[0], s[1] = torch.minimum(s[0], x.min()), torch.maximum(s[1], x.max())
            idx = torch.randint(0, x.numel(), (min(x.numel(), _ACT_SAMPLE),), generator=gen)
            s[2].append(x[idx])

        handles.append(block.get_submodule(local[t.name]).register_forward_pre_hook(hook))
    try:
        if stats:
            for c in calls:
                block(*c.args, **c.kwargs)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, (lo, hi, parts) in stats.items():
        sample = torch.cat(parts)
        if sample.numel() > _ACT_SAMPLE:
            sample = sample[torch.randperm(sample.numel(), generator=gen)[:_ACT_SAMPLE]]
        out[name] = (lo, hi, sample)
    return out


def build_recon_block(fp_block: nn.Module, tasks: list[LayerTask], local: dict[str, str], cfg: ReconConfig,
                      q_calls: list[CallArgs]) -> nn.Module:
    """A copy of `fp_block` whose quantized layers are ReconLayers (everything else frozen)."""
    act_stats = _collect_inputs(fp_block, tasks, local, q_calls, cfg.seed)
    qblock = copy.deepcopy(fp_block)
    for p in qblock.parameters():
        p.requires_grad_(False)
    opts = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    for t in tasks:
        static = None
        if t.name in act_stats:
            lo, hi, sample = act_stats[t.name]
            static = init_static_range(lo, hi, sample, make_act(t.plan.activation, t.kind), cfg.act_init)
        rnd = make_rounding(t, cfg.rounding, cfg.weight_init, opts)
        act = make_act_module(t, static, cfg.act_drop_prob, cfg.learn_act_step)
        set_submodule(qblock, local[t.name], ReconLayer(t, rnd, act).to(_device_of(fp_block)))
    return qblock.eval()


def _recon_layers(qblock: nn.Module) -> list[ReconLayer]:
    return [m for m in qblock.modules() if isinstance(m, ReconLayer)]


@torch.no_grad()
def block_loss(qblock: nn.Module, inputs: list[CallArgs], targets: list[torch.Tensor], batch: int) -> float:
    """Mean lp loss of the block in evaluation mode (hard rounding, no dropping) over all samples."""
    qblock.eval()
    total, n = 0.0, 0
    for i in range(0, len(inputs), batch):
        c = collate(inputs[i:i + batch])
        out = main_tensor(qblock(*c.args, **c.kwargs))
        total += lp_loss(out, torch.cat(targets[i:i + batch])).item() * len(targets[i:i + batch])
        n += len(targets[i:i + batch])
    return total / max(n, 1)


def reconstruct_block(name: str, fp_block: nn.Module, tasks: list[LayerTask], q_calls: list[CallArgs],
                      fp_calls: list[CallArgs], cfg: ReconConfig, progress: Progress | None = None) -> ReconResult:
    """Reconstruct the quantized layers `tasks` of `fp_block` (named `name` in the root).

    q_calls: the block's inputs in the partly quantized model; fp_calls: the same calls' inputs in the
    full-precision model (aligned one to one). The target is fp_block(fp input).
    """
    if len(q_calls) != len(fp_calls):
        raise QuantkitError(f"block {name}: {len(q_calls)} quantized-model inputs but {len(fp_calls)} full-precision ones")
    local = {t.name: t.name[len(name) + 1:] if name else t.name for t in tasks}
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    q_items = [s for c in q_calls for s in split_call(c)]
    fp_items = [s for c in fp_calls for s in split_call(c)]
    targets: list[torch.Tensor] = []
    with torch.no_grad():
        for c in fp_calls:  # batched, then one target per split sample
            targets += list(main_tensor(fp_block(*c.args, **c.kwargs)).detach().split(1))
    if len(targets) != len(q_items) or len(fp_items) != len(q_items):
        raise QuantkitError(f"block {name}: inputs and outputs do not split into the same samples")
    qblock = build_recon_block(fp_block, tasks, local, cfg, q_calls)
    layers = _recon_layers(qblock)
    eval_n = min(len(q_items), 64)
    loss_start = block_loss(qblock, q_items[:eval_n], targets[:eval_n], cfg.batch_size)
    w_params = [p for m in layers for p in m.rounding.parameters() if p.requires_grad]
    a_params = [m.act.step for m in layers if isinstance(m.act, LSQActQuantizer) and m.act.step.requires_grad]
    opts = []
    lr_w = cfg.lr_w_flexround if cfg.rounding == "flexround" and cfg.lr_w_flexround is not None else cfg.lr_w
    if w_params and lr_w > 0:
        opts.append(torch.optim.Adam(w_params, lr=lr_w))
    if a_params and cfg.lr_a > 0:
        opts.append(torch.optim.Adam(a_params, lr=cfg.lr_a))
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=max(cfg.iters, 1), eta_min=0.0) for o in opts]
    extra = LayerOutputLoss([local[t.name] for t in tasks], cfg.lambda_add, cfg.fbr_layers) if cfg.lambda_add > 0 else None
    history: list[float] = []
    iters = cfg.iters if opts else 0
    if extra is not None:
        extra.attach(qblock, fp_block)
    try:
        for m in layers:
            m.train()
        for it in range(iters):
            idx = torch.randint(0, len(q_items), (min(cfg.batch_size, len(q_items)),), generator=gen).tolist()
            q_in, fp_in = collate([q_items[i] for i in idx]), collate([fp_items[i] for i in idx])
            target = torch.cat([targets[i] for i in idx])
            x = mix_inputs(q_in, fp_in, cfg.input_prob, gen)
            if extra is not None:
                with torch.no_grad():
                    fp_block(*fp_in.args, **fp_in.kwargs)  # fills the FP layer outputs
            out = main_tensor(qblock(*x.args, **x.kwargs))
            loss = lp_loss(out, target)
            if extra is not None:
                loss = loss + extra().to(loss.device)
            frac = (it + 1) / iters
            reg = sum((m.rounding.reg_loss(frac) for m in layers), torch.zeros((), device=loss.device))
            for o in opts:
                o.zero_grad(set_to_none=True)
            (loss + reg).backward()
            for o, s in zip(opts, scheds):
                o.step()
                s.step()
            history.append(loss.item())
            if not math.isfinite(history[-1]):
                raise QuantkitError(f"block {name}: reconstruction loss is not finite at iteration {it}; lower lr_w / lr_a")
            if progress is not None and (it % 10 == 0 or it + 1 == iters):
                progress(f"{name} loss {history[-1]:.4g}", it + 1, iters)
    finally:
        if extra is not None:
            extra.detach()
    loss_end = block_loss(qblock, q_items[:eval_n], targets[:eval_n], cfg.batch_size)
    modules = {t.name: qblock.get_submodule(local[t.name]).to_quantized(t) for t in tasks}
    log.info("block %s: loss %.5g -> %.5g after %d iterations", name or "(root)", loss_start, loss_end, iters)
    return ReconResult(modules, loss_start, loss_end, history)
