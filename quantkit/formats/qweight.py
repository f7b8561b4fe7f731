"""QuantizedWeight: packed codes + scales of one weight, the in-memory and the on-disk form."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quantkit.formats import fp8, integer, mxfp4
from quantkit.formats.packing import pack, packed_len, unpack
from quantkit.formats.spec import FormatSpec

# Scales of int and fp8 weights are stored in fp16: 16 bits per group is what "4.125 bits per
# weight at g128" counts. The codes are computed against the rounded scale, so the stored
# checkpoint dequantizes to exactly what was evaluated.
WEIGHT_SCALE_DTYPE = torch.float16


_CHUNK_ELEMS = 1 << 21  # weight elements quantized at a time (8 MB of fp32 temporaries)


@dataclass
class QuantizedWeight:
    """A weight [..., N, K] quantized along K (the input dimension).

    packed: uint8 [..., N, ceil(K*bits/8)] codes, bit-packed along K (see formats/packing.py).
    scale:  int/fp8: fp16 [..., N, G] (G = K/group_size, 1 per channel; all-ones dims per tensor);
            mxfp4: uint8 E8M0 exponents [..., N, K/32].
    zero:   uint8 [..., N, G] integer zero points for asymmetric int, else None.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    shape: tuple[int, ...]
    spec: FormatSpec
    # Optional dict owned by a module: keeps the last dense dequantization so the pure-torch path
    # does not unpack the same codes on every call. Keyed on the buffers' identity and version.
    cache: dict | None = field(default=None, repr=False, compare=False)
    # The dense weight filled once when a checkpoint is loaded (the owning module's non-persistent
    # buffer, see nn.fill_dense): used as is, with no per-call check, so torch.compile sees a plain input.
    dense: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # Optional dict owned by a module for the kernels' own layout (kernels/repack.py): repacked once.
    kernel_cache: dict | None = field(default=None, repr=False, compare=False)

    @classmethod
    def quantize(cls, w: torch.Tensor, spec: FormatSpec) -> "QuantizedWeight":
        """Round-to-nearest quantization of `w` [..., N, K]."""
        if spec.kind == "int" and spec.granularity != "tensor" and w.numel() > 2 * _CHUNK_ELEMS:
            return cls._quantize_rows(w, spec)
        codes, scale, zero = quantize_codes(w, spec)
        return cls.from_codes(codes, scale, zero, spec)

    @classmethod
    def _quantize_rows(cls, w: torch.Tensor, spec: FormatSpec) -> "QuantizedWeight":
        """Rows are independent for per-channel and per-group scales: quantize and pack a few MB of rows
        at a time, so the fp32 temporaries stay in cache (about 2x the throughput; the same codes)."""
        k = w.shape[-1]
        flat = w.reshape(-1, k)
        rows = flat.shape[0]
        step = max(1, _CHUNK_ELEMS // k)
        # Filled chunk by chunk: a list of chunks joined by cat would hold the packed weight twice at the end.
        groups = integer.num_groups(k, spec)
        packed = torch.empty(rows, packed_len(k, spec.bits), dtype=torch.uint8, device=w.device)
        scale = torch.empty(rows, groups, dtype=WEIGHT_SCALE_DTYPE, device=w.device)
        zero = None if spec.symmetric else torch.empty(rows, groups, dtype=torch.uint8, device=w.device)
        for i in range(0, rows, step):
            codes, s, z = quantize_codes(flat[i:i + step], spec)
            packed[i:i + step] = pack(codes, spec.bits)
            scale[i:i + step] = s
            if zero is not None:
                zero[i:i + step] = z
        lead = tuple(w.shape[:-1])
        zero = None if zero is None else zero.reshape(*lead, -1)
        return cls(packed.reshape(*lead, -1), scale.reshape(*lead, -1), zero, tuple(w.shape), spec)

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: FormatSpec
    ) -> "QuantizedWeight":
        return cls(pack(codes, spec.bits), scale, zero, tuple(codes.shape), spec)

    @property
    def k(self) -> int:
        return self.shape[-1]

    def codes(self) -> torch.Tensor:
        """Unpacked uint8 codes [..., N, K]."""
        return unpack(self.packed, self.spec.bits, self.k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Pure-torch reference dequantization to a dense [..., N, K] tensor."""
        if self.dense is not None:
            return self.dense.to(dtype)
        # The keyed cache compares data pointers (not for torch.compile), and the dense copy is a CPU
        # convenience only: on a GPU it would cost 4x the packed weight's memory.
        if self.cache is None or torch.compiler.is_compiling() or self.packed.device.type != "cpu":
            return dequantize_codes(self.codes(), self.scale, self.zero, self.spec, dtype)
        key = (dtype, *[(t.data_ptr(), t._version) for t in self.tensors().values()])
        hit = self.cache.get("dense")
        if hit is not None and hit[0] == key:
            return hit[1]
        dense = dequantize_codes(self.codes(), self.scale, self.zero, self.spec, dtype)
        self.cache["dense"] = (key, dense)
        return dense

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.packed, "scale": self.scale}
        if self.zero is not None:
            out["zero"] = self.zero
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def select(self, index: int) -> "QuantizedWeight":
        """One slice along the leading dimension (one expert of a 3-D expert weight)."""
        return QuantizedWeight(
            self.packed[index],
            self.scale[index] if self.scale.shape[0] == self.shape[0] else self.scale[0],
            None if self.zero is None else self.zero[index],
            self.shape[1:],
            self.spec,
        )


def quantize_codes(
    w: torch.Tensor, spec: FormatSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Unpacked codes, scale, zero of `w` [..., N, K] by round-to-nearest."""
    if spec.kind == "int":
        return integer.quantize_int(w, spec, WEIGHT_SCALE_DTYPE)
    if spec.kind == "mxfp4":
        codes, exps = mxfp4.quantize_mxfp4(w, spec)
        return codes, exps, None
    if spec.kind == "fp8":
        codes, scale = fp8.quantize_fp8(w, spec, WEIGHT_SCALE_DTYPE)
        return codes, scale, None
    raise ValueError(f"format {spec.kind!r} is not a weight format")


def dequantize_codes(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: FormatSpec, dtype: torch.dtype
) -> torch.Tensor:
    if spec.kind == "int":
        return integer.dequantize_int(codes, scale, zero, spec, dtype)
    if spec.kind == "mxfp4":
        return mxfp4.dequantize_mxfp4(codes, scale, dtype)
    if spec.kind == "fp8":
        return fp8.dequantize_fp8(codes, scale, spec, dtype)
    raise ValueError(f"format {spec.kind!r} is not a weight format")
