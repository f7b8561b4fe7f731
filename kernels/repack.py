"""Load-time repack of a QuantizedWeight into the layout the packed GEMM kernels read (pure torch).

The checkpoint keeps compressed-tensors' packing (codes bit-packed along K, one row per output, read
one byte per code: `LDG.E.U8`, rows 4 KB apart). The kernels want K-packed int32 words stored
N-contiguous, so that a warp reads 32 x 16 consecutive bytes (`LDG.E.128`) and one word feeds
32/bits weights:

    words [E, KW, N] int32, KW = ceil(K / KB) * RB, KB = P * RB, P = 2 * (16 // bits) codes per word

Inside each pack block of KB consecutive k, word row r (0..RB-1) holds at bits [q_j, q_j + bits) the
code of k = block*KB + j*RB + r. So shifting a [RB, BLOCK_N] tile of words by q_j yields the codes of
RB *contiguous* k (chunk j): the kernel pairs each chunk with the matching slice of x and never has to
interleave registers. Codes past K are 0 and meet x = 0.

Each 16-bit half word holds 16 // bits whole codes (q_j = 16 * (j // H) + bits * (j % H), H = 16 // bits),
so no code straddles the halves: the GEMV's magic-exponent decode reads a code where it sits in its
half. For 2, 4 and 8 bits that is q_j = j * bits, a full word; 3, 5, 6 and 7 bits leave 2, 6, 8 and 4
bits of each word unused (3-bit: 10 codes, 3.2 bits per weight in this load-time copy; the checkpoint
keeps its dense packing).

Scales and zeros go N-contiguous too ([E, G, N]), so their loads coalesce like the words'.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.formats.integer import zero_offset
from quantkit.formats.qweight import QuantizedWeight
from quantkit.kernels.configs import codes_per_word
from quantkit.kernels.layout import E8M0_SCALE_MODES

RB = 16  # word rows per pack block: chunk j of a block is 16 contiguous k (one m16n8k16 MMA deep)
PACKED_BITS = (2, 3, 4, 5, 6, 7, 8)


def chunk_shifts(bits: int) -> list[int]:
    """Bit offset q_j of chunk j's code in a word (see the module docstring)."""
    h = 16 // bits
    return [16 * (j // h) + bits * (j % h) for j in range(codes_per_word(bits))]


@dataclass(frozen=True)
class KernelWeight:
    """A weight in the packed kernel layout (built once per weight, kept beside the checkpoint tensors)."""

    words: torch.Tensor  # [E, KW, N] int32
    scale: torch.Tensor  # [E, G, N] fp16 (int) or fp32 2^(E-127) (mxfp4), contiguous
    zero: torch.Tensor  # [E, G, N] uint8 (asymmetric int) or `scale` as a never-read placeholder
    n: int
    k: int
    bits: int
    group: int  # k per scale; 0 = one per row
    is_mx: bool
    has_zero: bool
    sym_offset: int

    @property
    def per_word(self) -> int:
        return codes_per_word(self.bits)

    @property
    def pack_k(self) -> int:
        """k covered by one pack block (RB word rows)."""
        return self.per_word * RB

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.scale, self.zero))

    def constexprs(self) -> dict[str, int]:
        return {"BITS": self.bits, "GROUP": self.group, "IS_MX": self.is_mx, "HAS_ZERO": self.has_zero,
                "SYM_OFFSET": self.sym_offset}


def repack_problem(qw: QuantizedWeight) -> str | None:
    """None if `qw` can be repacked for the packed kernels, else why not."""
    spec = qw.spec
    if spec.kind == "mxfp4":
        if spec.scale_mode not in E8M0_SCALE_MODES:
            return f"mxfp4 scale mode {spec.scale_mode!r} does not store E8M0 exponents"
        return None
    if spec.kind != "int":
        return f"no packed kernel reads {spec.kind} weights"
    if spec.bits not in PACKED_BITS:
        return f"{spec.bits}-bit codes have no packed layout (packed layout: {PACKED_BITS} bits)"
    if spec.granularity == "group" and int(spec.group_size) % RB:
        return f"group size {spec.group_size} is not a multiple of {RB} (a chunk of the packed layout)"
    return None


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [E, N, K] -> int32 words [E, KW, N] in the interleaved pack-block order above."""
    e, n, k = codes.shape
    p = codes_per_word(bits)
    kb = p * RB
    kp = -(-k // kb) * kb
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, kp - k))  # [E, N, Kp]
    c = c.reshape(e, n, kp // kb, p, RB).permute(0, 2, 4, 1, 3)  # [E, blocks, RB, N, P]
    shifts = torch.tensor(chunk_shifts(bits), device=codes.device, dtype=torch.int64)
    word = (c << shifts).sum(dim=-1)  # [E, blocks, RB, N], < 2^32
    word = torch.where(word >= 2**31, word - 2**32, word)  # two's complement: the top code sets the sign
    return word.to(torch.int32).reshape(e, kp // kb * RB, n).contiguous()


def unpack_words(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of pack_words: int32 [E, KW, N] -> uint8 codes [E, N, K] (the tests' check of the layout)."""
    e, kw, n = words.shape
    p = codes_per_word(bits)
    shifts = torch.tensor(chunk_shifts(bits), device=words.device, dtype=torch.int64)
    c = (words.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)  # [E, KW, N, P]
    c = c.reshape(e, kw // RB, RB, n, p).permute(0, 3, 1, 4, 2)  # [E, N, blocks, P, RB]
    return c.reshape(e, n, -1)[..., :k].to(torch.uint8).contiguous()


def repack(qw: QuantizedWeight) -> KernelWeight:
    """The packed kernel layout of `qw` (2-D weights get a leading expert dimension of 1)."""
    problem = repack_problem(qw)
    if problem is not None:
        raise ValueError(f"cannot repack {qw.spec.short}: {problem}")
    spec = qw.spec
    shape = tuple(qw.shape)
    e = shape[0] if len(shape) == 3 else 1
    n, k = shape[-2], shape[-1]
    codes = qw.codes().reshape(e, n, k)
    words = pack_words(codes, spec.bits)
    scale = qw.scale.reshape((1,) * (3 - qw.scale.dim()) + tuple(qw.scale.shape))
    g = scale.shape[-1]
    scale = scale.expand(e, n, g).transpose(1, 2).contiguous()  # [E, G, N]
    is_mx = spec.kind == "mxfp4"
    if is_mx:
        # 2^(E-127) in fp32 once here, instead of decoding E8M0 in the kernel; E = 0 is 2^-127.
        scale = torch.ldexp(torch.ones_like(scale, dtype=torch.float32), scale.to(torch.int32) - 127)
    zero = scale
    if qw.zero is not None:
        z = qw.zero.reshape((1,) * (3 - qw.zero.dim()) + tuple(qw.zero.shape))
        zero = z.expand(e, n, g).transpose(1, 2).contiguous()
    group = int(spec.group_size) if spec.granularity == "group" else 0
    if is_mx:
        group = 32
    return KernelWeight(words, scale, zero, n, k, spec.bits, group, is_mx, qw.zero is not None,
                        0 if is_mx else zero_offset(spec))


def cached_repack(qw: QuantizedWeight) -> KernelWeight:
    """repack(qw), kept in qw.kernel_cache (the module's) so a layer repacks once, not per call."""
    cache = qw.kernel_cache
    if cache is None:
        return repack(qw)
    key = tuple((t.data_ptr(), t._version, t.device) for t in qw.tensors().values())
    hit = cache.get("packed")
    if hit is None or hit[0] != key:
        hit = (key, repack(qw))
        cache["packed"] = hit
    return hit[1]
