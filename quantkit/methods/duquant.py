"""DuQuant (block-128 rotation, zigzag permutation, second rotation) and DuQuant++ (one block-32
rotation for MXFP4, optional GPTQ); METHODS.md §5. Also the engine EAQuant builds on.

Per decoder block: optional smoothing folded into the norms, one capture of every quantized
layer's calibration inputs, then per layer: fit the rotation on its (smoothed) inputs, rotate the
weight along its input dimension, quantize it (MSE clipping for int, or GPTQ), and store the
rotation in the quantized module, which applies it to activations online. Fused experts are
handled per expert on the tokens routed to each (every expert, never skipped).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from quantkit.adapters import adapter_for
from quantkit.errors import QuantkitError
from quantkit.expert_shard import fill_rows
from quantkit.formats.qweight import QuantizedWeight
from quantkit.formats.spec import FormatSpec
from quantkit.layers import LayerTask, build_quantized, make_act
from quantkit.methods.base import BlockContext, Method, register
from quantkit.methods.expert_balance import BALANCE_MODES, select_expert_tokens, token_target
from quantkit.nn import QuantExperts, QuantLinear
from quantkit.progress import track
from quantkit.quant_router import QuantRouter
from quantkit.quantizers.clip_search import mse_clip_quantize
from quantkit.quantizers.gptq import gptq_quantize, hessian
from quantkit.quantizers.online_rotation import ROT_DTYPE, OnlineRotation, perm_dtype
from quantkit.quantizers.rotation import RotationConfig, fit_rotation
from quantkit.quantizers.smoothing import SmoothingStats, fold_scale, group_smoothquant_scale, norm_groups

log = logging.getLogger(__name__)

# Official DuQuant defaults (run.sh); DuQuant++ recipes set block 32, steps 128, permute false.
DEFAULTS: dict[str, Any] = {
    "smooth": True, "alpha": 0.6, "rotate": True, "block": 128, "steps": 256, "permute": True,
    "shared_rotation": True, "row_index_quirk": False, "rotation_seed": 0, "weight_clip": "mse",
    # What the greedy rotation search computes in: "float32" halves its cost (the code searches in the
    # activations' dtype); "float64" is kept as the default so existing checkpoints and BENCHMARKS' rows stay.
    "rotation_search_dtype": "float64",
    "gptq": False, "gptq_percdamp": 0.01, "rotate_router": True,
    "balance": "none", "expert_token_ratio": 2.0, "expert_token_target": None, "balance_pool": 4,
    # Tokens per calibration sequence for LMs (the papers: 2048, EAQuant 4096; the -fast recipes 128).
    "calib_seq_len": 128,
    # What the rotation of a dense layer (attention, router, shared experts) is searched on: "mean_sample"
    # = the official code's input, the mean of the calibration samples' block inputs pushed through the
    # block (one sequence), or "all_tokens" = every calibration token (cost grows with the set: 128 x
    # 2048 tokens x 256 greedy steps in float64). Experts always use their own routed tokens.
    "rotation_input": "mean_sample",
    # An expert is calibrated (rotation, GPTQ Hessian) on at most its first T routed tokens, as the official
    # EAQuant code caches them; False = every token routed to it (grows with the calibration set).
    "cap_expert_tokens": True,
}
ROTATION_INPUTS = ("mean_sample", "all_tokens")


class _Capture:
    """Inputs of every quantized layer (and router outputs) over the block's calibration calls."""

    def __init__(self, tasks: list[LayerTask], routers: dict[str, nn.Module]) -> None:
        self.x: dict[str, list[torch.Tensor]] = {}
        self.idx: dict[str, list[torch.Tensor]] = {}
        self.logits: dict[str, list[torch.Tensor]] = {}
        self.handles = []
        for t in tasks:
            self.handles.append(t.module.register_forward_pre_hook(self._pre(t.name, t.kind), with_kwargs=True))
        for name, r in routers.items():
            self.handles.append(r.register_forward_hook(self._out(name)))

    def _pre(self, name: str, kind: str):
        def hook(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            self.x.setdefault(name, []).append(x.detach().reshape(-1, x.shape[-1]))
            if kind == "experts":
                idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
                self.idx.setdefault(name, []).append(idx.detach().reshape(-1, idx.shape[-1]))
        return hook

    def _out(self, name: str):
        def hook(_m, _a, out):
            logits = out[0] if isinstance(out, (tuple, list)) else out
            self.logits.setdefault(name, []).append(logits.detach().reshape(-1, logits.shape[-1]))
            if isinstance(out, (tuple, list)):
                idx = next((o for o in out if isinstance(o, torch.Tensor) and not o.is_floating_point()), None)
                if idx is not None:
                    self.idx.setdefault(name, []).append(idx.detach().reshape(-1, idx.shape[-1]))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    @staticmethod
    def cat(d: dict[str, list[torch.Tensor]], name: str) -> torch.Tensor | None:
        return torch.cat(d[name]) if d.get(name) else None


def _stack(parts: list[tuple | None], shape: tuple[int, ...], spec: FormatSpec) -> QuantizedWeight:
    """Experts' (codes, scales, zero points) as one [E, ...] weight; None: another rank's expert, its rows left
    unwritten."""
    rows = [[None if p is None else p[i] for p in parts] for i in range(3)]
    have = next(p for p in parts if p is not None)
    return QuantizedWeight(fill_rows(rows[0]), fill_rows(rows[1]), None if have[2] is None else fill_rows(rows[2]),
                           tuple(shape), spec)


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


@register("duquant")
class DuQuant(Method):
    """Options (recipe method_options) and defaults: see DEFAULTS."""

    defaults = DEFAULTS
    expert_parallel = True  # quantize_experts splits its per-expert loop across ranks (RankShare)
    fits_on_data = True  # the rotation is searched on calibration inputs (a fixed rotation needs no mean-sample pass)

    @classmethod
    def option_defaults(cls) -> dict:
        return cls.defaults

    def __init__(self, recipe) -> None:
        super().__init__(recipe)
        unknown = set(self.options) - set(self.defaults)
        if unknown:
            raise QuantkitError(f"unknown {self.name} option(s) {sorted(unknown)}; allowed: {', '.join(sorted(self.defaults))}")
        self.opt = {**self.defaults, **self.options}
        if not isinstance(self.opt["calib_seq_len"], int) or self.opt["calib_seq_len"] < 2:
            raise QuantkitError(f"calib_seq_len must be an integer of at least 2, got {self.opt['calib_seq_len']!r}")
        if self.opt["balance"] not in BALANCE_MODES:
            raise QuantkitError(f"balance must be one of {', '.join(BALANCE_MODES)}, got {self.opt['balance']!r}")
        if self.opt["rotation_input"] not in ROTATION_INPUTS:
            raise QuantkitError(f"rotation_input must be one of {', '.join(ROTATION_INPUTS)}, "
                                f"got {self.opt['rotation_input']!r}")
        if self.opt["weight_clip"] not in ("mse", "none"):
            raise QuantkitError(f"weight_clip must be 'mse' or 'none', got {self.opt['weight_clip']!r}")
        self.rot_cfg = RotationConfig(int(self.opt["block"]), int(self.opt["steps"]), bool(self.opt["permute"]),
                                      bool(self.opt["shared_rotation"]), bool(self.opt["row_index_quirk"]),
                                      int(self.opt["rotation_seed"]), str(self.opt["rotation_search_dtype"]))

    def needs_calibration(self, tasks: list[LayerTask]) -> bool:
        return True

    def build_calibration(self, loaded, steps, prompts_file, text_file, progress=None):
        """balance "more_data": also draw balance_pool x calib_size further calibration samples, kept
        aside and used only for experts under their token target (the paper's rule)."""
        self._extra_calls = []
        from quantkit.calib.capture import calibration_calls

        n = self.recipe.calib_size
        seq = int(self.opt["calib_seq_len"])
        if self.opt["balance"] != "more_data":
            return calibration_calls(loaded, n, self.recipe.seed, steps, prompts_file, text_file, seq, progress)
        calls = calibration_calls(loaded, n * (1 + int(self.opt["balance_pool"])), self.recipe.seed, steps,
                                  prompts_file, text_file, seq, progress=progress)
        self._extra_calls = calls[n:]
        return calls[:n]

    @torch.no_grad()
    def _extra_expert_tokens(self, ctx: BlockContext, tasks: list[LayerTask], cap: "_Capture") -> dict:
        """For balance "more_data": {experts task: (x_extra, idx_extra)} from further calibration samples,
        read chunk by chunk until every expert of the block reaches its target (or the pool runs out)."""
        from quantkit.pipeline import capture_block_inputs

        experts = [t for t in tasks if t.kind == "experts"]
        extra_calls = getattr(self, "_extra_calls", [])
        if not experts:
            return {}
        if not extra_calls:
            log.warning("%s: balance more_data has no extra calibration samples (a --calib file was given?); "
                        "experts under target use their natural tokens only", ctx.name)
            return {}
        if any(p.is_meta for p in ctx.root.parameters()):
            # Layer streaming: the earlier blocks are no longer in memory to carry extra samples here.
            log.warning("%s: balance more_data needs the whole model in memory (not with --stream); experts under "
                        "target use their natural tokens only (balance: force works when streaming)", ctx.name)
            return {}

        def under(t, idx_parts) -> bool:
            n_exp = t.module.gate_up_proj.shape[0]
            target = self.opt["expert_token_target"]
            if target is None:
                target = token_target(idx_parts[0].shape[-1], n_exp, self.tokens_per_sample,
                                      float(self.opt["expert_token_ratio"]))
            idx = torch.cat(idx_parts)
            return any(int((idx == e).any(-1).sum()) < target for e in range(n_exp))

        got: dict[str, tuple[list, list]] = {t.name: ([], []) for t in experts}
        chunk = max(1, len(ctx.calls or []) or self.recipe.calib_size)
        for i in range(0, len(extra_calls), chunk):
            todo = [t for t in experts if under(t, cap.idx[t.name] + got[t.name][1])]
            if not todo:
                break
            inputs = capture_block_inputs(ctx.root, ctx.block, extra_calls[i:i + chunk])
            c2 = _Capture(todo, {})
            try:
                for c in inputs:
                    ctx.block(*c.args, **c.kwargs)
            finally:
                c2.remove()
            for t in todo:
                got[t.name][0].extend(c2.x.get(t.name, []))
                got[t.name][1].extend(c2.idx.get(t.name, []))
        return {n: (torch.cat(x), torch.cat(i)) for n, (x, i) in got.items() if x}

    # ---- the block ---------------------------------------------------------------------------
    def quantize_block(self, ctx: BlockContext) -> dict[str, nn.Module]:
        if ctx.inputs is None:
            raise QuantkitError(f"method {self.name} needs calibration data")
        adapter = adapter_for(ctx.root)
        tasks = [t for t in ctx.tasks if not t.plan.skip]
        if self.opt["smooth"] and adapter.kind == "lm":
            self.smooth(ctx, adapter)
        routers = {n: m for n, m in ctx.block.named_modules() if n and adapter.role(n, m) == "router"
                   and not isinstance(m, nn.Linear)}
        cap = _Capture(tasks, routers)
        try:
            ctx.run()
        finally:
            cap.remove()
        self._rotation_x = self._mean_sample_inputs(ctx, tasks) if self._rotates_on_mean() else {}
        self.tokens_per_sample = max(1, sum(x.shape[0] for x in next(iter(cap.x.values()), [])) // len(ctx.inputs))
        # Layers that read the very same input tensors (q/k/v, gate/up, router and shared experts) get
        # one rotation, fitted once and stored once (the checkpoint ties the copies), as the official
        # code copies q_proj's rotation to k_proj and v_proj.
        self._rot_cache: dict[tuple, OnlineRotation | None] = {}
        extra = self._extra_expert_tokens(ctx, tasks, cap) if self.opt["balance"] == "more_data" else {}
        out = {}
        for t in track(tasks, f"{ctx.name or 'model'}: layers"):
            x = _Capture.cat(cap.x, t.name)
            if x is None:
                raise QuantkitError(f"{t.name} received no calibration input; cannot quantize it with {self.name}")
            self._input_key = tuple((c.data_ptr(), tuple(c.shape)) for c in cap.x[t.name])
            self._fit_x = self._rotation_x.get(t.name)
            if t.kind == "linear":
                out[t.name] = self.quantize_linear(t, x)
            elif t.kind == "router":
                local = t.name[len(ctx.name) + 1:] if ctx.name else t.name
                out[t.name] = self.quantize_router(t, x, _Capture.cat(cap.idx, local))
            elif t.kind == "experts":
                local = t.name[len(ctx.name) + 1:] if ctx.name else t.name
                logits = next((_Capture.cat(cap.logits, r) for r in routers if _parent(r) == _parent(local)), None)
                out[t.name] = self.quantize_experts(t, x, _Capture.cat(cap.idx, t.name), logits, extra.get(t.name))
            else:
                log.warning("%s: %s has no %s path; round-to-nearest", t.name, t.kind, self.name)
                out[t.name] = build_quantized(t)
        self._input_key, self._rot_cache, self._fit_x, self._rotation_x = None, {}, None, {}
        return out

    def _rotates_on_mean(self) -> bool:
        return self.fits_on_data and bool(self.opt["rotate"]) and self.opt["rotation_input"] == "mean_sample"

    def _mean_sample_inputs(self, ctx: BlockContext, tasks: list[LayerTask]) -> dict[str, torch.Tensor]:
        """Each dense layer's input when the block runs on the mean of its calibration samples (one
        sequence): what the official code fits rotations on. {} (all tokens, warned) when the samples
        differ in shape and have no mean."""
        from quantkit.recon.data import _rows, call_row

        calls = list(ctx.inputs or [])
        rows = [call_row(c, j, _rows(c)) for c in calls for j in range(_rows(c))]
        hidden = [r.args[0] if r.args else r.kwargs.get("hidden_states") for r in rows]
        if not hidden or any(not isinstance(h, torch.Tensor) or h.shape != hidden[0].shape for h in hidden):
            log.warning("%s: calibration samples differ in shape; rotations are fitted on all their tokens",
                        ctx.name or "model")
            return {}
        mean = torch.stack([h.float() for h in hidden]).mean(0).to(hidden[0].dtype)
        one = rows[0]
        one = (type(one)((mean, *one.args[1:]), one.kwargs) if one.args
               else type(one)((), {**one.kwargs, "hidden_states": mean}))
        dense = [t for t in tasks if t.kind != "experts"]
        cap = _Capture(dense, {})
        try:
            with torch.no_grad():
                ctx.block(*one.args, **one.kwargs)
        finally:
            cap.remove()
        return {t.name: _Capture.cat(cap.x, t.name) for t in dense if cap.x.get(t.name)}

    def smooth(self, ctx: BlockContext, adapter) -> None:
        """Fold smoothing scales into the block's norms (SmoothQuant over all consumers)."""
        groups = norm_groups(ctx.block, adapter)
        with SmoothingStats(groups) as stats:
            ctx.run()
        for gi, g in enumerate(groups):
            if gi in stats.act and g.weights():
                fold_scale(g, self.smoothing_scale(g, stats, gi), self.expert_shard)

    def smoothing_scale(self, g, stats: SmoothingStats, gi: int) -> torch.Tensor:
        return group_smoothquant_scale(stats.act[gi], g, float(self.opt["alpha"]), self.expert_shard)

    # ---- layers ------------------------------------------------------------------------------
    def fit(self, x: torch.Tensor) -> tuple | None:
        return fit_rotation(x, self.rot_cfg) if self.opt["rotate"] else None

    def quantize_weight(self, w: torch.Tensor, spec: FormatSpec, x_in: torch.Tensor) -> QuantizedWeight:
        """Rotated weight [N, K] -> codes; x_in: the layer's rotated, fake-quantized inputs (GPTQ's Hessian)."""
        if self.opt["gptq"]:
            return gptq_quantize(w, hessian(x_in), spec, percdamp=float(self.opt["gptq_percdamp"]))
        if self.opt["weight_clip"] == "mse" and spec.kind == "int":
            return mse_clip_quantize(w, spec)
        return QuantizedWeight.quantize(w, spec)

    def _shared_rotation(self, x: torch.Tensor) -> OnlineRotation | None:
        """The rotation of the current layer's input, fitted once per distinct input."""
        key = getattr(self, "_input_key", None)
        cache = getattr(self, "_rot_cache", {})
        if key is None or key not in cache:
            fit_x = getattr(self, "_fit_x", None)
            parts = self.fit(x if fit_x is None else fit_x)
            rot = None if parts is None else OnlineRotation.from_parts(x.shape[-1], *parts)
            if key is None:
                return rot
            cache[key] = rot
        return cache[key]

    def _rotated(self, x: torch.Tensor, w: torch.Tensor, rot: OnlineRotation | tuple | None
                 ) -> tuple[torch.Tensor, torch.Tensor, OnlineRotation | None]:
        if rot is None:
            return x, w, None
        if isinstance(rot, tuple):
            rot = OnlineRotation.from_parts(x.shape[-1], *rot)
        return rot(x), rot.transform_weight(w.detach()), rot

    @torch.no_grad()
    def quantize_linear(self, t: LayerTask, x: torch.Tensor) -> nn.Module:
        act = make_act(t.plan.activation, "linear")
        xr, wr, rot = self._rotated(x, t.module.weight, self._shared_rotation(x))
        qw = self.quantize_weight(wr, t.plan.weight, act(xr) if act is not None else xr)
        q = QuantLinear.from_linear(t.module, t.plan.weight, act, qw)
        q.rotation = rot
        return q

    @torch.no_grad()
    def quantize_router(self, t: LayerTask, x: torch.Tensor, idx: torch.Tensor | None) -> nn.Module:
        act = make_act(t.plan.activation, "linear")
        rot = self._shared_rotation(x) if self.opt["rotate_router"] else None
        xr, wr, rot = self._rotated(x, t.module.weight, rot)
        x_in = act(xr) if act is not None else xr
        qw, info = self.router_weight(wr, t.plan.weight, x_in, idx)
        q = QuantRouter.from_router(t.module, t.plan.weight, act, qw)
        q.rotation = rot
        if info:
            q.calibration_info = {"router": info}
        return q

    def router_weight(self, w: torch.Tensor, spec: FormatSpec, x_in: torch.Tensor,
                      idx: torch.Tensor | None) -> tuple[QuantizedWeight, dict | None]:
        return self.quantize_weight(w, spec, x_in), None

    @torch.no_grad()
    def quantize_experts(self, t: LayerTask, x: torch.Tensor, idx: torch.Tensor, logits: torch.Tensor | None,
                         extra: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
        m, spec = t.module, t.plan.weight
        gu, dn = m.gate_up_proj.detach(), m.down_proj.detach()
        n_exp = gu.shape[0]
        target = self.opt["expert_token_target"]
        if target is None:
            target = token_target(idx.shape[-1], n_exp, self.tokens_per_sample, float(self.opt["expert_token_ratio"]))
        sel, info = select_expert_tokens(idx, logits, n_exp, int(target), self.opt["balance"], self.recipe.seed,
                                         None if extra is None else extra[1], bool(self.opt["cap_expert_tokens"]))
        if extra is not None:
            x = torch.cat([x, extra[0]])  # extra tokens are only ever selected for experts under target
        act_in, act_mid = make_act(t.plan.activation, "experts"), make_act(t.plan.activation, "experts")
        share = self.ranks  # under torchrun: this rank's experts; the others' come from their ranks
        # (or stay there: with rows_only this rank keeps only its experts' rows, see quantkit.expert_shard)
        rows_only = self.expert_shard is not None and self.expert_shard.rows_only
        mine = [e for e in range(n_exp) if share is None or share.owns(e)]
        done: dict[int, tuple] = {}
        for e in track(mine, f"{t.name}: experts"):
            xe = x[sel[e]]
            p_in = self.fit(xe)
            xr, wr, rot = self._rotated(xe, gu[e], p_in)
            q_gu = self.quantize_weight(wr, spec, act_in(xr) if act_in is not None else xr)
            g, u = torch.nn.functional.linear(xe, gu[e]).chunk(2, dim=-1)
            h = m.act_fn(g) * u
            p_mid = self.fit(h)
            hr, wr, _ = self._rotated(h, dn[e], p_mid)
            q_dn = self.quantize_weight(wr, spec, act_mid(hr) if act_mid is not None else hr)
            done[e] = (_codes(q_gu), _codes(q_dn), p_in, p_mid)
        if share is None or rows_only:
            results = [done.get(e) for e in range(n_exp)]  # (None: another rank's expert)
        else:
            results = share.gather(done, n_exp)
        q = QuantExperts.from_experts(m, spec, act_in, act_mid, _stack([r and r[0] for r in results], gu.shape, spec),
                                      _stack([r and r[1] for r in results], dn.shape, spec),
                                      rows=share.owns if rows_only else None)
        if self.opt["rotate"]:
            q.rot_in = _stacked_rotation([r and r[2] for r in results], n_exp, gu.shape[-1])
            q.rot_mid = _stacked_rotation([r and r[3] for r in results], n_exp, dn.shape[-1])
        if rows_only:
            self.expert_shard.adopt(q)
        q.calibration_info = info
        log.info("%s: tokens per expert %s (target %d)", t.name, info["expert_tokens"], info["token_target"])
        return q


def _codes(q: QuantizedWeight) -> tuple:
    """What another rank needs to rebuild `q` (the shape and format it knows already)."""
    return q.packed, q.scale, q.zero


def _stacked_rotation(parts: list[tuple | None], n_exp: int, k: int) -> OnlineRotation:
    """Experts' fitted rotations as one module; None: another rank's expert, its rows left unwritten (each part
    is cast to the stored dtype first, so those rows are never copied)."""
    have = next(p for p in parts if p is not None)
    dtypes = (ROT_DTYPE, perm_dtype(k), ROT_DTYPE)
    rot1, perm, rot2 = (None if have[i] is None else fill_rows([None if p is None else p[i].to(dtypes[i]) for p in parts])
                        for i in range(3))
    return OnlineRotation.from_parts(k, rot1, perm, rot2, experts=n_exp)
