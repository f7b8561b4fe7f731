"""Per-layer size report of a quantkit checkpoint, read from safetensors headers (no tensor data)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from quantkit.errors import QuantkitError
from quantkit.formats.spec import FormatSpec
from quantkit.io import read_quant_json

# Tensors of a quantized layer that carry its weight (bias and activation ranges stay full precision).
_WEIGHT_TENSORS = ("qweight", "scale", "zero", "gate_up_qweight", "gate_up_scale", "gate_up_zero",
                   "down_qweight", "down_scale", "down_zero")


def _tensor_sizes(folder: Path, files: list[str]) -> dict[str, tuple[int, int]]:
    """name -> (numel, bytes) for every tensor of the checkpoint."""
    out = {}
    for name in files:
        p = folder / name
        if not p.is_file():
            raise QuantkitError(f"checkpoint file {p} is missing (listed in quantization.json)")
        try:
            with safe_open(str(p), framework="pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    numel = 1
                    for s in sl.get_shape():
                        numel *= s
                    itemsize = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I32": 4, "I64": 8,
                                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2}.get(sl.get_dtype(), 4)
                    out[k] = (numel, numel * itemsize)
        except (SafetensorError, OSError) as e:
            raise QuantkitError(f"checkpoint file {p} is truncated or corrupted ({str(e).splitlines()[0]})") from None
    return out


def inspect_checkpoint(ckpt: str | Path) -> dict[str, Any]:
    """{"layers": [...], "totals": {...}} for the checkpoint at `ckpt`."""
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise QuantkitError(f"checkpoint path {ckpt} does not exist")
    meta = read_quant_json(ckpt)
    comp = meta["model"]["component"]
    folder = ckpt / comp if comp else ckpt
    sizes = _tensor_sizes(folder, meta["weights"]["files"])
    claimed: set[str] = set()
    layers = []
    for name, rec in meta["layers"].items():
        spec = FormatSpec.from_dict(rec["weight"])
        keys = [f"{name}.{t}" for t in _WEIGHT_TENSORS if f"{name}.{t}" in sizes]
        claimed.update(keys)
        nbytes = sum(sizes[k][1] for k in keys)
        params = int(rec["params"])
        layers.append({"name": name, "kind": rec["kind"], "role": rec["role"], "format": spec.short,
                       "bits": spec.bits, "params": params, "bytes": nbytes,
                       "bits_per_weight": round(8 * nbytes / params, 4) if params else 0.0,
                       "quantized": True})
    fp_params = fp_bytes = 0
    for name, role in meta["skipped"].items():
        keys = [k for k in sizes if k.startswith(name + ".") and k not in claimed]
        params = sum(sizes[k][0] for k in keys)
        nbytes = sum(sizes[k][1] for k in keys)
        layers.append({"name": name, "kind": "full precision", "role": role, "format": "fp", "bits": 16,
                       "params": params, "bytes": nbytes, "bits_per_weight": round(8 * nbytes / params, 4) if params else 0.0,
                       "quantized": False})
    q_params = sum(layer["params"] for layer in layers if layer["quantized"])
    q_bytes = sum(layer["bytes"] for layer in layers if layer["quantized"])
    for k, (numel, nbytes) in sizes.items():
        if k not in claimed:
            fp_params += numel
            fp_bytes += nbytes
    total_params = q_params + fp_params
    total_bytes = q_bytes + fp_bytes
    totals = {
        "params_quantized": q_params, "params_total": total_params,
        "fraction_quantized": round(q_params / total_params, 6) if total_params else 0.0,
        "bytes_quantized": q_bytes, "bytes": total_bytes,
        "bits_per_weight_quantized": round(8 * q_bytes / q_params, 4) if q_params else 0.0,
        "compression_vs_fp16": round(2 * total_params / total_bytes, 4) if total_bytes else 0.0,
        "layers_quantized": sum(1 for layer in layers if layer["quantized"]),
        "layers_full_precision": sum(1 for layer in layers if not layer["quantized"]),
    }
    return {"checkpoint": str(ckpt), "model": meta["model"], "recipe": meta["recipe"], "layers": layers, "totals": totals}
