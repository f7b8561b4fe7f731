"""Python API for models already in memory: quantize, save, load.

    pipe = quantkit.quantize(pipe, "rtn-w8a8", calib=["a red bus", "a cat"])   # in place; returns it
    quantkit.save(pipe, "out/sd-w8a8")
    pipe = quantkit.load("out/sd-w8a8")

`calib` is a list of prompts (pipelines) or texts (language models), a callable `forward_loop(model)`
whose calls of the quantized module are recorded (as ModelOpt's), or an iterable / DataLoader of batches
(a dict of keyword arguments, a tensor of input ids, or a tuple of positional arguments).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)

_STATE = "_quantkit_quantized"  # attribute on the returned object: (recipe, result, loaded)
DENOISERS = ("unet", "transformer")


def _loaded_from_memory(obj: Any) -> Any:
    from quantkit.adapters import adapter_for
    from quantkit.models import LoadedModel

    component = None
    if not isinstance(obj, nn.Module):
        component = next((c for c in DENOISERS if isinstance(getattr(obj, c, None), nn.Module)), None)
        if component is None:
            raise QuantkitError(f"cannot place a {type(obj).__name__}: quantkit.quantize takes a transformers or "
                                "diffusers model, or a diffusers pipeline with a unet or transformer")
    loaded = LoadedModel(obj, f"memory:{type(obj).__name__}", None, component, None)  # type: ignore[arg-type]
    loaded.adapter = adapter_for(loaded.root)
    loaded.root.eval()
    return loaded


def _calls_from(loaded: Any, calib: Any, seed: int) -> tuple[list | None, str | None, dict[str, Any]]:
    """(recorded calls or None, a temp text file for list calibration or None, provenance)."""
    from quantkit.adapters.base import CallArgs
    from quantkit.calib.capture import _detach, record_calls

    if calib is None:
        return None, None, {"calib": "builtin"}
    if isinstance(calib, (list, tuple)) and calib and all(isinstance(c, str) for c in calib):
        fd, path = tempfile.mkstemp(suffix=".txt", prefix="quantkit-calib-")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(c.replace("\n", " ") for c in calib) + "\n")
        return None, path, {"calib": f"{len(calib)} texts in memory"}
    if callable(calib) and not isinstance(calib, Iterable):
        calls, handle = record_calls(loaded.root)
        try:
            with torch.no_grad():
                calib(loaded.obj)
        finally:
            handle.remove()
        if not calls:
            raise QuantkitError("calib forward_loop(model) never called the module being quantized")
        return calls, None, {"calib": f"forward_loop ({len(calls)} calls)"}
    if isinstance(calib, Iterable) and not isinstance(calib, (str, bytes)):
        calls = []
        for batch in calib:
            if isinstance(batch, dict):
                calls.append(CallArgs((), _detach(dict(batch))))
            elif isinstance(batch, torch.Tensor):
                key = "input_ids" if loaded.adapter.kind == "lm" else "sample"
                calls.append(CallArgs((), {key: batch.detach().clone()}))
            elif isinstance(batch, (list, tuple)):
                calls.append(CallArgs(_detach(tuple(batch)), {}))
            else:
                raise QuantkitError(f"calibration batch of type {type(batch).__name__}; allowed: dict of keyword "
                                    "arguments, tensor, tuple of positional arguments")
        if not calls:
            raise QuantkitError("calibration data loader yielded no batches")
        device = next(loaded.root.parameters()).device
        return [c.to(device) for c in calls], None, {"calib": f"data loader ({len(calls)} batches)"}
    raise QuantkitError(f"calib of type {type(calib).__name__}; allowed: list of prompts/texts, "
                        "forward_loop(model) callable, DataLoader / iterable of batches, or None (built-in data)")


def quantize(model: Any, recipe: Any = "rtn-w8a8", calib: list[str] | Callable[[Any], Any] | Iterable | None = None,
             *, calib_steps: int | None = None) -> Any:
    """Quantize a transformers / diffusers model or a diffusers pipeline in place and return it.

    recipe: a built-in recipe name, a YAML/JSON path, a dict or a `quantkit.config.Recipe`."""
    from quantkit.config import Recipe
    from quantkit.pipeline import quantize_model

    if isinstance(recipe, Recipe):
        rec = recipe
    elif isinstance(recipe, dict):
        rec = Recipe.from_dict(recipe)
    else:
        rec = Recipe.load(str(recipe))
    loaded = _loaded_from_memory(model)
    calls, text_file, prov = _calls_from(loaded, calib, rec.seed)
    kw: dict[str, Any] = {}
    if text_file:
        kw["calib_prompts" if loaded.is_pipeline else "calib_text"] = text_file
    try:
        result = quantize_model(loaded, rec, calls=calls, calib_steps=calib_steps, **kw)
    finally:
        if text_file:
            os.unlink(text_file)
    result.calibration.update(prov)
    setattr(loaded.obj, _STATE, (rec, result))
    mark_quantized_config(loaded.root, result.layers, result.extras.get("attention", {}))
    return loaded.obj


def mark_quantized_config(root: nn.Module, layers: dict[str, Any], attention: dict[str, Any]) -> None:
    """Put quantkit's quantization_config on the quantized module's config, so that the library's own
    save_pretrained writes a folder that reloads through quantkit's quantizer (never random weights)."""
    from quantkit.io import quantization_config

    qc = quantization_config(layers, attention)
    if hasattr(root, "register_to_config"):  # diffusers ModelMixin
        root.register_to_config(quantization_config=qc)
    elif getattr(root, "config", None) is not None and hasattr(root, "save_pretrained"):  # transformers
        from quantkit.hf_quantizers import attach_transformers_quantizer

        attach_transformers_quantizer(root, qc)
    else:
        log.warning("%s has no config: its save_pretrained cannot record the quantization; use quantkit.save",
                    type(root).__name__)


def _write_source(obj: Any, component: str | None, folder: Path) -> None:
    """The config / tokenizer / scheduler files a checkpoint keeps next to the quantized tensors."""
    if component is None:
        if hasattr(obj, "config") and hasattr(obj.config, "save_pretrained"):
            obj.config.save_pretrained(folder)
            gen = getattr(obj, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(folder)
        elif hasattr(obj, "save_config"):
            obj.save_config(folder)
        else:
            raise QuantkitError(f"cannot save a {type(obj).__name__}: it has no transformers or diffusers config")
        return
    obj.save_config(folder)  # model_index.json
    for name in obj.components:
        part = getattr(obj, name, None)
        if part is None:
            continue
        if name == component:
            part.save_config(folder / name)
        elif hasattr(part, "save_pretrained"):
            part.save_pretrained(folder / name)


def save(model: Any, out: str | Path, *, overwrite: bool = False, tokenizer: Any = None) -> Path:
    """Write a model returned by `quantkit.quantize` as a quantkit checkpoint (see docs/checkpoint-format.md)."""
    from quantkit.io import check_output_dir, save_checkpoint

    state = getattr(model, _STATE, None)
    if state is None:
        raise QuantkitError(f"{type(model).__name__} was not quantized by quantkit.quantize; nothing to save "
                            "(a model from quantkit.load is already a checkpoint)")
    rec, result = state
    out = Path(out)
    check_output_dir(out, overwrite)
    loaded = _loaded_from_memory(model)
    src = Path(tempfile.mkdtemp(prefix="quantkit-src-"))
    try:
        _write_source(model, loaded.component, src)
        if tokenizer is not None:
            tokenizer.save_pretrained(src)
        loaded.path = src
        return save_checkpoint(loaded, rec, result, out, overwrite=overwrite)
    finally:
        shutil.rmtree(src, ignore_errors=True)


def cast_dtype(obj: Any, dtype: torch.dtype) -> Any:
    """Cast a loaded model's compute tensors to `dtype`; quantized codes, scales and rotations keep theirs
    (casting an fp16 scale to bf16 would change the stored weights)."""
    from quantkit.layers import QUANT_MODULES

    modules = [obj] if isinstance(obj, nn.Module) else [getattr(obj, n) for n in getattr(obj, "components", {})
                                                       if isinstance(getattr(obj, n, None), nn.Module)]
    with torch.no_grad():
        for root in modules:
            quant = [m for m in root.modules() if isinstance(m, QUANT_MODULES)]
            inside = {id(t) for q in quant for t in list(q.buffers())}
            for m in root.modules():
                for n, p in m._parameters.items():
                    if p is not None and p.is_floating_point():
                        p.data = p.data.to(dtype)
                for n, b in m._buffers.items():
                    keep = id(b) in inside and n not in ("bias", "gate_up_bias", "down_bias")
                    if b is not None and b.is_floating_point() and not keep:
                        m._buffers[n] = b.to(dtype)
            for q in quant:  # the dense dequantization cache was built for the old dtype
                q.__dict__.pop("_dequant_cache", None)
    return obj
