"""`quantkit export --format compressed-tensors`: a quantkit LM checkpoint as a compressed-tensors folder
(the format llm-compressor writes; transformers and vLLM load it).

Names are the hub names the model class's own `save_pretrained` writes (fused 3-D experts split back
into per-expert linears, see hub_names.py); layers that stayed in full precision are listed in `ignore`.
What compressed-tensors cannot express is refused with one line naming the layers, never approximated.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.export.ct_layers import codes_of, ct_format, layer_tensors, weight_args
from quantkit.export.hub_names import hub_slices
from quantkit.formats.spec import FormatSpec
from quantkit.nn import QuantConv2d, QuantExperts, QuantLinear
from quantkit.quant_router import QuantRouter
from quantkit.quantizers.activation import ActQuantizer

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _act_args(act: nn.Module | None, name: str, problems: dict[str, list[str]]) -> dict | None:
    """compressed-tensors input_activations for quantkit's activation quantizer (or a recorded problem)."""
    if act is None:
        return None
    if not isinstance(act, ActQuantizer):
        problems["DGQ group activation quantizers (scales vary along K per group) have no compressed-tensors "
                 "scheme"].append(name)
        return None
    s = act.spec
    if act.dynamic and s.kind == "int" and s.symmetric and s.granularity == "channel":
        return {"num_bits": s.bits, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    if act.dynamic and s.kind == "int" and not s.symmetric and s.granularity == "channel":
        return {"num_bits": s.bits, "type": "int", "symmetric": False, "strategy": "token", "dynamic": True}
    if act.dynamic and s.kind == "fp8" and s.granularity == "channel":
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
    if s.kind == "mxfp4":
        problems["MXFP4 activations: compressed-tensors rounds their block maxima to a power of two, quantkit "
                 "floors them (OCP), so a runtime would quantize the inputs differently"].append(name)
        return None
    if not act.dynamic and s.kind == "int" and s.symmetric and s.granularity == "tensor":
        return {"num_bits": s.bits, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}
    problems[f"activation format {s.short} ({'dynamic' if act.dynamic else 'static'}) has no compressed-tensors "
             "scheme with the same rounding"].append(name)
    return None


def _pairs_with(spec: FormatSpec, act: dict) -> bool:
    """Weight / activation pairs with a compressed-tensors scheme: W8A8 int8 (int-quantized), FP8 x FP8."""
    if spec.kind == "int":
        return spec.bits == 8 and spec.granularity != "group" and act["type"] == "int" and act["num_bits"] == 8
    return spec.kind == "fp8" and act["type"] == "float" and act["num_bits"] == 8


def _check(root: nn.Module, meta: dict[str, Any]) -> dict[str, dict]:
    """Per quantized layer: its weight spec and activation args; raises on anything the format cannot carry."""
    problems: dict[str, list[str]] = defaultdict(list)
    if meta.get("attention"):
        problems["log2 attention-probability quantizers run inside quantkit's attention processor"] += list(meta["attention"])
    plans: dict[str, dict] = {}
    for name, m in root.named_modules():
        if isinstance(m, (QuantRouter, QuantConv2d)):
            problems[f"{type(m).__name__} layers are not linear layers compressed-tensors can target"].append(name)
            continue
        if not isinstance(m, (QuantLinear, QuantExperts)):
            continue
        if any(getattr(m, r, None) is not None for r in ("rotation", "rot_in", "rot_mid")):
            problems["online rotations (DuQuant / DuQuant++ / EAQuant) transform activations at run time, "
                     "which compressed-tensors has no place for"].append(name)
        spec: FormatSpec = m.wspec
        if spec.kind == "mxfp4" and spec.scale_mode == "duquantpp_log8":
            problems["mxfp4 duquantpp_log8 scales are fp32 values, not E8M0 exponents"].append(name)
        if spec.kind == "fp8" and spec.granularity == "group":
            problems["fp8 weights with group scales are not loadable as compressed-tensors"].append(name)
        if isinstance(m, QuantExperts):
            if m.gate_up_bias is not None:
                problems["fused experts with biases"].append(name)
            acts = [_act_args(m.act_in, name, problems), _act_args(m.act_mid, name, problems)]
            if acts[0] != acts[1]:
                problems["experts whose gate/up and down inputs are quantized differently"].append(name)
            act = acts[0]
        else:
            act = _act_args(m.act, name, problems)
        if act is not None and not _pairs_with(spec, act):
            problems[f"{spec.short} weights with {act['type']}{act['num_bits']} activations: no compressed-tensors "
                     "scheme transformers or vLLM load (packed int weights are weight-only there)"].append(name)
        plans[name] = {"module": m, "spec": spec, "act": act}
    if problems:
        why, names = next(iter(problems.items()))
        more = f" (and {len(problems) - 1} other reason(s))" if len(problems) > 1 else ""
        raise QuantkitError(f"cannot export to compressed-tensors: {why}: {_names(sorted(set(names)))}{more}")
    return plans


def _weights_of(plan: dict) -> dict[str, tuple[Any, tuple[int, ...]]]:
    """Model tensor name (dense form) -> (QuantizedWeight, dense shape) for one quantized module."""
    m = plan["module"]
    if isinstance(m, QuantLinear):
        return {"weight": (m.quantized_weight, (m.out_features, m.in_features))}
    return {"gate_up_proj": (m.gate_up, m.gate_up_shape), "down_proj": (m.down, m.down_shape)}


def _dense_state(root: nn.Module, plans: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Tensors of everything outside the quantized modules, plus the quantized linears' biases."""
    state = {}
    for k, v in root.state_dict().items():
        owner = next((n for n in plans if k.startswith(n + ".")), None)
        if owner is None:
            state[k] = v
        elif k == owner + ".bias":
            state[k] = v
    return state


def convert(root: nn.Module, meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(hub-named tensors, quantization_config) of a loaded quantkit LM."""
    from transformers.core_model_loading import revert_weight_conversion

    plans = _check(root, meta)
    if not plans:
        raise QuantkitError("cannot export to compressed-tensors: the checkpoint has no quantized linear layers")
    model_dtype = next((p.dtype for p in root.parameters() if p.is_floating_point()), torch.float32)
    shapes, weights = {}, {}
    for name, plan in plans.items():
        for attr, (qw, shape) in _weights_of(plan).items():
            shapes[f"{name}.{attr}"] = shape
            weights[f"{name}.{attr}"] = (qw, plan)
    slices = hub_slices(root, shapes)
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, dict] = {}
    n_linears = 0
    group_of: dict[str, str] = {}
    for src, parts in slices.items():
        qw, plan = weights[src]
        spec, act = plan["spec"], plan["act"]
        fmt = ct_format(spec, act)
        key = json.dumps([weight_args(spec), act, fmt], sort_keys=True)
        gname = group_of.setdefault(key, f"group_{len(group_of)}")
        k = shape_k = shapes[src][-1]
        codes = codes_of(qw.packed, spec, k).reshape(-1, shape_k)
        scale = qw.scale.reshape(-1, qw.scale.shape[-1]) if qw.scale.dim() > 1 else qw.scale
        zero = None if qw.zero is None else qw.zero.reshape(-1, qw.zero.shape[-1])
        if spec.granularity == "tensor":  # one scale per expert (or per tensor): broadcast to rows
            rows_total = codes.shape[0]
            per = rows_total // max(1, scale.numel())
            scale = scale.reshape(-1, 1).repeat_interleave(per, 0)
            zero = None if zero is None else zero.reshape(-1, 1).repeat_interleave(per, 0)
        for part in parts:
            r = part.rows
            z = None if zero is None else zero[r]
            s = scale[r]
            if spec.granularity == "tensor":
                if not bool((s == s[0]).all()):
                    raise QuantkitError(f"{part.hub_name} mixes experts with different per-tensor scales")
                s, z = s[:1], None if z is None else z[:1]
            module = part.hub_name.rsplit(".", 1)[0]
            n_linears += 1
            for t_name, t in layer_tensors(codes[r], s, z, spec, fmt, model_dtype).items():
                tensors[f"{module}.{t_name}"] = t
            if act is not None and act.get("dynamic") is False:
                tensors[f"{module}.input_scale"] = plan["module"].act.scale.reshape(1).float()
            groups.setdefault(gname, {"targets": [], "weights": weight_args(spec), "input_activations": act,
                                      "output_activations": None, "format": fmt})["targets"].append(module)
    dense = revert_weight_conversion(root, _dense_state(root, plans))
    for k, v in dense.items():
        if k in tensors:
            raise QuantkitError(f"tensor name {k} clashes between quantized and full-precision layers")
        tensors[k] = v
    ignore = sorted({k.rsplit(".", 1)[0] for k, v in dense.items()
                     if k.endswith(".weight") and v.dim() == 2 and not _is_embedding(root, k)})
    config_groups = {}
    for gname, g in groups.items():
        # Class-name target when one scheme covers every quantized linear (ignore lists the rest),
        # exact-name regexes when the recipe mixes schemes.
        targets = ["Linear"] if len(groups) == 1 else [f"re:^{t.replace('.', '[.]')}$" for t in sorted(g["targets"])]
        config_groups[gname] = {**g, "targets": targets}
    fmts = {g["format"] for g in groups.values()}
    qconfig = {"quant_method": "compressed-tensors", "format": fmts.pop() if len(fmts) == 1 else "mixed-precision",
               "quantization_status": "compressed", "config_groups": config_groups, "ignore": ignore,
               "kv_cache_scheme": None, "global_compression_ratio": None,
               "quantkit": {"method": meta.get("recipe", {}).get("method"),
                            "quantkit_version": meta.get("quantkit_version"), "quantized_linears": n_linears}}
    return tensors, qconfig


def _is_embedding(root: nn.Module, hub_key: str) -> bool:
    try:
        return isinstance(root.get_submodule(hub_key.rsplit(".", 1)[0]), nn.Embedding)
    except AttributeError:
        return "embed" in hub_key


def export(ckpt: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write `out` (atomically): config.json with a compressed-tensors quantization_config, tokenizer files,
    model.safetensors. Returns a summary."""
    from quantkit.io import check_output_dir, load_quantized_root, read_quant_json
    from quantkit.io import _is_weight_file, _replace_dir  # noqa: PLC2701  (shared helpers)

    ckpt, out = Path(ckpt), Path(out)
    meta = read_quant_json(ckpt)
    if meta["model"].get("kind") != "transformers-model" or meta["model"].get("component"):
        raise QuantkitError(f"compressed-tensors export is for transformers language models; {ckpt} holds a "
                            f"{meta['model'].get('kind')} ({meta['model'].get('class')})")
    check_output_dir(out, overwrite)
    root = load_quantized_root(ckpt, meta)
    tensors, qconfig = convert(root, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for f in ckpt.iterdir():
            if f.is_file() and not _is_weight_file(f.name) and f.name != "quantization.json":
                shutil.copy2(f, tmp / f.name)
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["quantization_config"] = qconfig
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_q = qconfig["quantkit"]["quantized_linears"]
    return {"out": str(out), "format": qconfig["format"], "quantized_linears": n_q, "ignored": len(qconfig["ignore"]),
            "groups": {k: {"format": g["format"], "targets": g["targets"] if len(g["targets"]) == 1 and not
                           g["targets"][0].startswith("re:") else len(g["targets"])}
                       for k, g in qconfig["config_groups"].items()}}
