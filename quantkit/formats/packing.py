"""Dense bit packing of unsigned codes along the last dimension.

b-bit codes are packed little-endian: code i of a row occupies bits [b*i, b*i + b) of the row's
bit stream, byte j holds stream bits [8j, 8j + 8). So 4-bit codes go two per byte (low nibble
first), 2-bit four per byte, 3-bit eight codes per three bytes. Rows whose bit length is not a
multiple of 8 are zero-padded; `unpack` needs the original length.
"""
from __future__ import annotations

import torch


def packed_len(k: int, bits: int) -> int:
    """Bytes per row for k codes of `bits` bits."""
    return (k * bits + 7) // 8


def _chunk(bits: int) -> tuple[int, int]:
    """(codes, bytes) per whole-byte chunk: the smallest number of codes filling whole bytes."""
    codes = next(c for c in range(1, 9) if (c * bits) % 8 == 0)
    return codes, codes * bits // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., K] (each < 2^bits) -> uint8 [..., ceil(K*bits/8)]."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    k = codes.shape[-1]
    n_codes, n_bytes = _chunk(bits)
    if n_bytes == 1:  # 1, 2, 4 bits: whole codes per byte, OR-ed in uint8 (no int64 copy: 8x less memory)
        c = codes.to(torch.uint8)
        pad = (-k) % n_codes
        if pad:
            c = torch.nn.functional.pad(c, (0, pad))
        c = c.reshape(*c.shape[:-1], -1, n_codes)
        out = c[..., 0].clone()
        for i in range(1, n_codes):
            out |= c[..., i] << (i * bits)
        return out.contiguous()
    pad = (-k) % n_codes
    c = codes.to(torch.int64)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, n_codes)
    shifts = torch.arange(n_codes, device=c.device) * bits
    word = (c << shifts).sum(dim=-1, keepdim=True)  # <= 64 bits: n_codes*bits <= 8*8
    byte_shifts = torch.arange(n_bytes, device=c.device) * 8
    out = ((word >> byte_shifts) & 0xFF).to(torch.uint8)
    out = out.reshape(*codes.shape[:-1], -1)
    return out[..., : packed_len(k, bits)].contiguous()


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 [..., ceil(K*bits/8)] -> uint8 codes [..., K]."""
    if bits == 8:
        return packed[..., :k].contiguous()
    n_codes, n_bytes = _chunk(bits)
    if n_bytes == 1:  # 1, 2, 4 bits: shift and mask in uint8
        p = packed.to(torch.uint8)
        mask = (1 << bits) - 1
        codes = torch.stack([(p >> (i * bits)) & mask for i in range(n_codes)], dim=-1)
        return codes.reshape(*packed.shape[:-1], -1)[..., :k].contiguous()
    n_chunks = -(-k // n_codes)
    p = packed.to(torch.int64)
    pad = n_chunks * n_bytes - p.shape[-1]
    if pad:
        p = torch.nn.functional.pad(p, (0, pad))
    p = p.reshape(*p.shape[:-1], n_chunks, n_bytes)
    byte_shifts = torch.arange(n_bytes, device=p.device) * 8
    word = (p << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(n_codes, device=p.device) * bits
    codes = (word >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :k].to(torch.uint8).contiguous()
