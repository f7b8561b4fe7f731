"""MXFP4 (OCP MX v1.0): E2M1 elements, one E8M0 power-of-two scale per 32 elements along K.

Codes are the 4-bit E2M1 bit patterns (sign << 3 | exponent-mantissa index), one per uint8;
exponents are E8M0 (uint8, bias 127). Default scale rule (spec, "ocp_floor"):
X = 2^(floor(log2 amax) - 2); values beyond 6*X saturate to 6*X.
"""
from __future__ import annotations

import torch

from quantkit.formats.spec import MX_BLOCK, FormatSpec

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring magnitudes; a tie rounds to the even index (even mantissa).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E8M0_BIAS = 127
EMAX_ELEM = 2


def e2m1_table(device: torch.device | None = None) -> torch.Tensor:
    """The 16 values of the E2M1 codes, indexed by code."""
    mags = torch.tensor(E2M1_VALUES, device=device)
    return torch.cat([mags, -mags])


def encode_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Round scaled values to the nearest E2M1 code (ties to even, saturating at 6)."""
    mag = v.abs().float().contiguous()
    bounds = torch.tensor(_MIDPOINTS, device=v.device)
    idx = torch.bucketize(mag, bounds, right=False)  # mag == bound -> lower index
    at_tie = mag == bounds[idx.clamp(max=len(_MIDPOINTS) - 1)]
    idx = idx + (at_tie & (idx % 2 == 1)).long()
    sign = (v < 0).long() << 3
    # -0.0 and values rounding to 0 keep code 0 so that codes are canonical.
    sign = torch.where(idx == 0, torch.zeros_like(sign), sign)
    return (sign | idx).to(torch.uint8)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    return e2m1_table(codes.device)[codes.long()]


def _blocks(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // MX_BLOCK, MX_BLOCK)


def mx_exponents(x: torch.Tensor, scale_mode: str = "ocp_floor") -> torch.Tensor:
    """E8M0 exponent codes [..., K/32] for `x` [..., K] (power-of-two scale modes)."""
    amax = _blocks(x.float()).abs().amax(dim=-1)
    tiny = torch.finfo(torch.float32).tiny
    log2 = torch.log2(amax.clamp(min=tiny))
    if scale_mode == "ocp_floor":
        e = torch.floor(log2) - EMAX_ELEM
    elif scale_mode == "ceil":
        # Smallest power of two with amax / X <= 6: never clips.
        e = torch.ceil(torch.log2(amax.clamp(min=tiny) / 6.0))
    elif scale_mode == "rceil":
        e = torch.ceil(log2 - EMAX_ELEM)
    else:
        raise ValueError(f"scale_mode {scale_mode!r} has no E8M0 exponent; see duquantpp_log8_scales")
    e = torch.where(amax > 0, e, torch.full_like(e, -E8M0_BIAS))
    return (e.clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).to(torch.uint8)


def exponent_scale(exps: torch.Tensor) -> torch.Tensor:
    """2^(E - 127) as fp32, exact."""
    return torch.exp2(exps.float() - E8M0_BIAS)


def quantize_mxfp4(x: torch.Tensor, spec: FormatSpec | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [..., K], exponents uint8 [..., K/32]) of `x` [..., K]."""
    spec = spec or FormatSpec.mxfp4()
    spec.check_k(x.shape[-1])
    if spec.scale_mode == "duquantpp_log8":
        exps = duquantpp_log8_scales(x)  # fp32 scale values, not E8M0 exponents
    else:
        exps = mx_exponents(x, spec.scale_mode)
    scaled = _blocks(x.float()) / block_scale(exps).unsqueeze(-1)
    return encode_e2m1(scaled).reshape(x.shape), exps


def block_scale(exps: torch.Tensor) -> torch.Tensor:
    """Per-32 scale values: E8M0 codes (uint8) decoded, fp32 log8 scales passed through."""
    return exps.float() if exps.is_floating_point() else exponent_scale(exps)


def duquantpp_log8_scales(x: torch.Tensor) -> torch.Tensor:
    """The official DuQuant++ code's scale rule (`cast_to_eBm0_improved`), kept for reproduction.

    s = amax/6 per 32-block, then snapped down onto a 256-level log-uniform grid spanning the
    smallest..largest block scale of the whole tensor passed in: finer than E8M0 powers of two and
    not an OCP MX format. Returned as the fp32 scale values [..., K/32] (the stored form)."""
    amax = _blocks(x.float()).abs().amax(dim=-1)
    s = amax / 6.0
    pos = s > 0
    if not bool(pos.any()):
        return torch.ones_like(s)
    ls = torch.log2(torch.where(pos, s, s[pos].min()))
    lo, hi = ls.min(), ls.max()
    span = hi - lo
    if float(span) == 0.0:
        return torch.where(pos, torch.exp2(ls), torch.ones_like(s))
    code = torch.floor(255.0 * (ls - lo) / span).clamp(0, 255)
    snapped = torch.exp2(lo + span * code / 255.0)
    # An all-zero block encodes exactly with any positive scale.
    return torch.where(pos, snapped, torch.ones_like(s))


def dequantize_mxfp4(codes: torch.Tensor, exps: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    vals = _blocks(decode_e2m1(codes)) * block_scale(exps).unsqueeze(-1)
    return vals.reshape(codes.shape).to(dtype)


def fake_quant_mxfp4(x: torch.Tensor, spec: FormatSpec | None = None) -> torch.Tensor:
    codes, exps = quantize_mxfp4(x, spec)
    return dequantize_mxfp4(codes, exps, x.dtype)
