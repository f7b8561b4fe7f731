"""Per-layer size report of a quantkit checkpoint, read from safetensors headers (no tensor data)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from quantkit.errors import QuantkitError
from quantkit.formats.spec import FormatSpec
from quantkit.io import read_quant_json

# Every tensor stored under a quantized layer counts toward its bytes; these carry the weight itself,
# the ones under _ROTATION_PARTS the online rotations/permutations, everything else (bias, static
# activation ranges, per-step parameters) is "other".
_WEIGHT_TENSORS = ("qweight", "scale", "zero", "gate_up_qweight", "gate_up_scale", "gate_up_zero",
                   "down_qweight", "down_scale", "down_zero")
_ROTATION_PARTS = ("rotation", "rot_in", "rot_mid")


def _part(layer: str, key: str) -> str:
    rest = key[len(layer) + 1:]
    if rest in _WEIGHT_TENSORS:
        return "weight"
    return "rotation" if rest.split(".")[0] in _ROTATION_PARTS else "other"


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
    tied: dict[str, str] = meta["weights"].get("tied", {})
    claimed: set[str] = set()
    layers = []
    parts_total = {"weight": 0, "rotation": 0, "other": 0}
    for name in sorted(meta["layers"], key=len, reverse=True):  # a nested layer claims its own tensors first
        rec = meta["layers"][name]
        spec = FormatSpec.from_dict(rec["weight"])
        keys = [k for k in sizes if k.startswith(name + ".") and k not in claimed]
        claimed.update(keys)
        parts = {"weight": 0, "rotation": 0, "other": 0}
        for k in keys:
            parts[_part(name, k)] += sizes[k][1]
        for kind, b in parts.items():
            parts_total[kind] += b
        nbytes = sum(parts.values())
        params = int(rec["params"])
        shared = sorted({_layer_of(src, meta["layers"]) for a, src in tied.items() if a.startswith(name + ".")} - {None})
        layers.append({"name": name, "kind": rec["kind"], "role": rec["role"], "format": spec.short,
                       "bits": spec.bits, "params": params, "bytes": nbytes,
                       "bits_per_weight": round(8 * nbytes / params, 4) if params else 0.0,
                       "bytes_by_part": parts, "shares_tensors_with": shared, "quantized": True})
    layers.sort(key=lambda layer: list(meta["layers"]).index(layer["name"]))
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
    bpw = lambda b: round(8 * b / q_params, 4) if q_params else 0.0  # noqa: E731
    totals = {
        "params_quantized": q_params, "params_total": total_params,
        "fraction_quantized": round(q_params / total_params, 6) if total_params else 0.0,
        "bytes_quantized": q_bytes, "bytes": total_bytes,
        # every byte stored under the quantized layers (codes, scales, rotations, permutations, biases,
        # activation parameters) per quantized weight; the parts below add up to it
        "bits_per_weight_quantized": bpw(q_bytes),
        "bits_per_weight_by_part": {kind: bpw(b) for kind, b in parts_total.items()},
        "compression_vs_fp16": round(2 * total_params / total_bytes, 4) if total_bytes else 0.0,
        "layers_quantized": sum(1 for layer in layers if layer["quantized"]),
        "layers_full_precision": sum(1 for layer in layers if not layer["quantized"]),
    }
    return {"checkpoint": str(ckpt), "model": meta["model"], "recipe": meta["recipe"], "layers": layers, "totals": totals}


def _layer_of(key: str, layers: dict[str, Any]) -> str | None:
    """The quantized layer a stored tensor belongs to (the longest matching name), or None."""
    best = None
    for name in layers:
        if key.startswith(name + ".") and (best is None or len(name) > len(best)):
            best = name
    return best
