"""One quantkit weight as compressed-tensors tensors and quantization args (no compressed-tensors import).

quantkit's codes are the same numbers compressed-tensors stores; only containers differ:
- pack-quantized: codes - 2^(b-1) as signed b-bit ints, densely packed little-endian into int32 words
  along K (quantkit packs the same bit stream into bytes), `weight_shape`, asymmetric zero points packed
  the same way along the output dimension.
- int-quantized (8-bit): signed int8 codes; float-quantized (fp8): float8_e4m3fn codes.
- mxfp4-pack-quantized: E2M1 codes two per byte (low nibble first), E8M0 scales as uint8.
"""
from __future__ import annotations

from typing import Any

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.packing import pack, unpack
from quantkit.formats.spec import FormatSpec


def weight_args(spec: FormatSpec) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs (as JSON) for a quantkit weight spec."""
    if spec.kind == "mxfp4":
        return {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "group", "group_size": 32,
                "dynamic": False, "scale_dtype": "torch.uint8", "zp_dtype": "torch.uint8"}
    strategy = spec.granularity
    args = {"num_bits": spec.bits, "type": "int" if spec.kind == "int" else "float", "symmetric": spec.symmetric,
            "strategy": strategy, "dynamic": False}
    if strategy == "group":
        args["group_size"] = spec.group_size
    return args


def ct_format(spec: FormatSpec, act_args: dict | None) -> str:
    if spec.kind == "mxfp4":
        return "mxfp4-pack-quantized"
    if spec.kind == "fp8":
        return "float-quantized"
    if act_args is None or spec.bits < 8:
        return "pack-quantized"
    return "int-quantized"


def _scale_dtype(scale: torch.Tensor, model_dtype: torch.dtype) -> torch.dtype:
    """The model's dtype where it holds the stored scales exactly, else float32 (never rounds them)."""
    return model_dtype if torch.equal(scale.to(model_dtype).float(), scale.float()) else torch.float32


def _pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [R, K] -> int32 [R, ceil(K*bits/32)]: quantkit's little-endian bit stream in 32-bit words."""
    packed = pack(codes, bits)
    words = -(-codes.shape[-1] * bits // 32)
    pad = words * 4 - packed.shape[-1]
    if pad:
        packed = torch.nn.functional.pad(packed, (0, pad))
    return packed.contiguous().view(torch.int32)


def layer_tensors(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: FormatSpec,
                  fmt: str, model_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one 2-D weight given its unpacked uint8 codes [N, K]."""
    n, k = codes.shape
    if fmt == "mxfp4-pack-quantized":
        if scale.is_floating_point():
            raise QuantkitError("mxfp4 with fp32 scales (duquantpp_log8) has no compressed-tensors form")
        return {"weight_packed": pack(codes, 4), "weight_scale": scale.to(torch.uint8).contiguous()}
    if spec.granularity == "tensor":
        scale, zero = scale.reshape(1), None if zero is None else zero.reshape(1)
    s = scale.to(_scale_dtype(scale, model_dtype)).contiguous()
    if fmt == "float-quantized":
        return {"weight": codes.contiguous().view(torch.float8_e4m3fn), "weight_scale": s}
    off = 1 << (spec.bits - 1)
    out: dict[str, torch.Tensor] = {"weight_scale": s}
    if fmt == "int-quantized":
        out["weight"] = (codes.to(torch.int16) - off).to(torch.int8)
    else:
        out["weight_packed"] = _pack_int32(codes, spec.bits)
        out["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
    if zero is not None:
        if fmt == "pack-quantized" and spec.granularity in ("group", "channel"):
            # compressed-tensors packs zero points along the output dimension
            out["weight_zero_point"] = _pack_int32(zero.t().contiguous(), spec.bits).t().contiguous()
        else:
            out["weight_zero_point"] = (zero.to(torch.int16) - off).to(torch.int8)
    return out


def codes_of(packed: torch.Tensor, spec: FormatSpec, k: int) -> torch.Tensor:
    return unpack(packed, spec.bits, k)
