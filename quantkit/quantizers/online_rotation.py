"""OnlineRotation: the stored DuQuant / DuQuant++ input transform, applied to activations at inference.

Buffers: rot1 [*E, G, b, b], optional perm [*E, K] and rot2 [*E, G, b, b] (E = one per expert for
fused experts). The weights were multiplied by the same transform when quantized, so the layer
computes (x T) (W T)^T = x W^T up to quantization. `record()` / `empty()` let a checkpoint rebuild the
module's geometry before its buffers are loaded.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.quantizers.rotation import apply_blocks, transform_rows


# Rotations are stored in fp16 (2 bytes per entry). Exactness is kept anyway: the weights are
# transformed with the inverse transpose of the *stored* matrices (W' = W T^-T), so (x T)(W')^T = x W^T
# up to float rounding although fp16 T is not exactly orthogonal.
ROT_DTYPE = torch.float16


def perm_dtype(k: int) -> torch.dtype:
    return torch.int16 if k <= torch.iinfo(torch.int16).max else torch.int32


class OnlineRotation(nn.Module):
    def __init__(self, k: int, block: int, permute: bool, experts: int | None = None, shared: bool = False) -> None:
        super().__init__()
        self.k, self.block, self.permute, self.experts, self.shared = k, block, permute, experts, shared
        lead = () if experts is None else (experts,)
        g = 1 if shared else k // block
        self.register_buffer("rot1", torch.zeros(*lead, g, block, block, dtype=ROT_DTYPE))
        self.register_buffer("perm", torch.zeros(*lead, k, dtype=perm_dtype(k)) if permute else None)
        self.register_buffer("rot2", torch.zeros(*lead, g, block, block, dtype=ROT_DTYPE) if permute else None)

    @classmethod
    def from_parts(cls, k: int, rot1: torch.Tensor, perm: torch.Tensor | None, rot2: torch.Tensor | None,
                   experts: int | None = None) -> "OnlineRotation":
        """From fitted parts for an input of K channels: rot [*E, G, b, b] with G = K/b, or G = 1 (one
        matrix shared by every block); with `experts`, the parts carry a leading expert dimension."""
        b = rot1.shape[-1]
        g = rot1.shape[-3]
        if g not in (1, k // b) or k % b:
            raise ValueError(f"rotation blocks {tuple(rot1.shape)} do not fit an input of {k} channels")
        with torch.device("meta"):  # (every buffer is assigned below)
            m = cls(k, b, perm is not None, experts, shared=g == 1 and k // b > 1)
        m.rot1 = rot1.to(ROT_DTYPE).contiguous()
        if perm is not None:
            m.perm = perm.to(perm_dtype(k)).contiguous()
            m.rot2 = rot2.to(ROT_DTYPE).contiguous()
        return m

    def record(self) -> dict[str, Any]:
        return {"k": self.k, "block": self.block, "permute": self.permute, "experts": self.experts,
                "shared": self.shared}

    @classmethod
    def empty(cls, rec: dict[str, Any]) -> "OnlineRotation":
        return cls(int(rec["k"]), int(rec["block"]), bool(rec["permute"]), rec.get("experts"),
                   bool(rec.get("shared", False)))

    def fused_rotation(self) -> torch.Tensor | None:
        """The [K/32, 32, 32] matrix the fused MXFP4 kernels can apply, when that is all there is."""
        if self.block == 32 and not self.permute and self.experts is None:
            return self.rot1
        return None

    def _parts(self, expert: int | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if expert is None:
            return self.rot1, self.perm, self.rot2
        return self.rot1[expert], None if self.perm is None else self.perm[expert], \
            None if self.rot2 is None else self.rot2[expert]

    def forward(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        rot1, perm, rot2 = self._parts(expert)
        x = apply_blocks(x, rot1)
        if perm is not None:
            x = apply_blocks(x[..., perm.long()], rot2)
        return x

    def transform_weight(self, w: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """W [N, K] -> W T^-T in float64 then w's dtype (weights are transformed once, offline).
        T^-T = blockdiag(R1^-T) P blockdiag(R2^-T) of the stored fp16 blocks, so the product with the
        online-rotated activation is exact although fp16 blocks are only nearly orthogonal."""
        rot1, perm, rot2 = self._parts(expert)
        inv_t = lambda r: torch.linalg.inv(r.double()).transpose(-1, -2)  # noqa: E731
        return transform_rows(w, inv_t(rot1), None if perm is None else perm.long(),
                              None if rot2 is None else inv_t(rot2)).to(w.dtype)

    def payload_bytes(self) -> int:
        """Bytes this transform stores (rotations, permutation)."""
        return sum(t.numel() * t.element_size() for t in (self.rot1, self.perm, self.rot2) if t is not None)

    def extra_repr(self) -> str:
        e = "" if self.experts is None else f", experts={self.experts}"
        return f"k={self.k}, block={self.block}, permute={self.permute}, shared={self.shared}{e}"


def rotation_records(qmodule: nn.Module) -> dict[str, Any]:
    """Checkpoint record entries for the rotations a quantized module carries (empty if none)."""
    out = {}
    for attr in ("rotation", "rot_in", "rot_mid"):
        r = getattr(qmodule, attr, None)
        if isinstance(r, OnlineRotation):
            out[attr] = r.record()
    return out


def attach_empty_rotations(qmodule: nn.Module, rec: dict[str, Any] | None) -> nn.Module:
    """Give an empty quantized module the rotation submodules its checkpoint record names."""
    for attr in ("rotation", "rot_in", "rot_mid"):
        if rec and rec.get(attr):
            setattr(qmodule, attr, OnlineRotation.empty(rec[attr]))
    return qmodule


def expert_mlp(m: nn.Module, x: torch.Tensor, e: int, w_gu: torch.Tensor, w_dn: torch.Tensor) -> torch.Tensor:
    """Expert e of a QuantExperts on tokens x [T, H], with its online rotations and activation quantizers;
    w_gu [2I, H] and w_dn [H, I] are its dequantized weights."""
    if m.rot_in is not None:
        x = m.rot_in(x, e)
    if m.act_in is not None:
        x = m.act_in(x)
    gate, up = F.linear(x, w_gu, None if m.gate_up_bias is None else m.gate_up_bias[e]).chunk(2, dim=-1)
    h = m.act_fn(gate) * up
    if m.rot_mid is not None:
        h = m.rot_mid(h, e)
    if m.act_mid is not None:
        h = m.act_mid(h)
    return F.linear(h, w_dn, None if m.down_bias is None else m.down_bias[e])


@torch.no_grad()
def rotated_experts_forward(m: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """QuantExperts forward with per-expert online rotations of the gate/up and down inputs
    (pure torch; the fused MoE kernel has no rotation or activation-quantization path)."""
    out = torch.zeros_like(hidden)
    gate_up, down = m.gate_up, m.down
    # As kernels/reference.py: all experts at once when the weights keep a dense copy; without one (a
    # streamed calibration walk) only the experts this call reaches, one at a time, so that no dense
    # 16-bit (and transient fp32) copy of every expert sits beside the codes.
    whole = gate_up.dense is not None or gate_up.cache is not None
    w_gu = gate_up.dequantize(hidden.dtype) if whole else None  # [E, 2I, H]
    w_dn = down.dequantize(hidden.dtype) if whole else None  # [E, H, I]
    for e in torch.unique(top_k_index).tolist():
        if not 0 <= e < m.num_experts:  # transformers marks masked-out slots with index E
            continue
        token_idx, slot = torch.where(top_k_index == e)
        x = hidden[token_idx]
        wg = w_gu[e] if whole else gate_up.select(e).dequantize(hidden.dtype)  # [2I, H]
        wd = w_dn[e] if whole else down.select(e).dequantize(hidden.dtype)  # [H, I]
        y = expert_mlp(m, x, e, wg, wd)
        out.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(out.dtype))
    return out
