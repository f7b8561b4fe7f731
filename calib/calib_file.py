"""Calibration files: selected samples in safetensors, their structure and provenance as JSON.

FILE (safetensors) holds every tensor of every sample; its metadata key "quantkit_calibration"
holds {"format_version", "provenance", "items"}, where items mirror each sample's call with
tensors replaced by {"__tensor__": key}. FILE.json repeats the provenance for people to read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from quantkit.adapters.base import CallArgs
from quantkit.errors import QuantkitError

META_KEY = "quantkit_calibration"
FORMAT_VERSION = 1


def _encode(v: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(v, torch.Tensor):
        tensors[key] = v.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(v, dict):
        return {"__dict__": {k: _encode(x, f"{key}.{k}", tensors) for k, x in v.items()}}
    if isinstance(v, (list, tuple)):
        return {"__list__": [_encode(x, f"{key}.{i}", tensors) for i, x in enumerate(v)], "tuple": isinstance(v, tuple)}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise QuantkitError(f"cannot store a calibration input of type {type(v).__name__} ({key})")


def _decode(v: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(v, dict):
        if "__tensor__" in v:
            return tensors[v["__tensor__"]]
        if "__dict__" in v:
            return {k: _decode(x, tensors) for k, x in v["__dict__"].items()}
        if "__list__" in v:
            items = [_decode(x, tensors) for x in v["__list__"]]
            return tuple(items) if v.get("tuple") else items
    return v


def save_calibration(path: str | Path, items: list[CallArgs], provenance: dict[str, Any]) -> Path:
    """Write the samples atomically (temp file + rename) and a readable FILE.json next to them."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = [{"args": _encode(list(c.args), f"{i}.args", tensors), "kwargs": _encode(c.kwargs, f"{i}.kwargs", tensors)}
                for i, c in enumerate(items)]
    meta = {"format_version": FORMAT_VERSION, "provenance": provenance, "items": skeleton}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    os.replace(tmp, path)
    path.with_name(path.name + ".json").write_text(json.dumps(provenance, indent=1))
    return path


def load_calibration(path: str | Path) -> tuple[list[CallArgs], dict[str, Any]]:
    """(samples, provenance) of a calibration file; a wrong or damaged file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise QuantkitError(f"calibration file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise QuantkitError(f"calibration file {path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if raw is None:
        raise QuantkitError(f"{path} is not a quantkit calibration file (no {META_KEY} metadata); "
                            "make one with `quantkit calib select`")
    meta = json.loads(raw)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise QuantkitError(f"{path} has calibration format {meta['format_version']}; this quantkit reads up to {FORMAT_VERSION}")
    items = [CallArgs(tuple(_decode(it["args"], tensors)), _decode(it["kwargs"], tensors)) for it in meta["items"]]
    return items, meta["provenance"]


def batch_items(items: list[CallArgs], batch: int) -> list[CallArgs]:
    """Group single-sample calls into root calls of up to `batch` samples (fewer forward passes)."""
    from quantkit.recon.data import collate

    return [collate(items[i:i + batch]) for i in range(0, len(items), max(batch, 1))]
