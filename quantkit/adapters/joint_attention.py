"""DGQ's attention quantizers on joint (text + image) attention: SD3/SD3.5's MMDiT attention, computed as
diffusers' JointAttnProcessor2_0 does (image tokens first, then text tokens, one softmax over both), and
FLUX.1's (text first, rotary positions; see QuantFluxAttnProcessor).

Q, K and V of the joint sequence go through group activation quantizers; the probabilities through log2
quantizers, one over the image-key columns and one over the text-key columns, each with its own per-prompt
scale (the text columns are the cross-attention part of joint attention, where DGQ's per-prompt scale was
introduced).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantkit.adapters.diffusers_attention import QuantAttnProcessor
from quantkit.quantizers.log_attention import LogProbQuantizer

JOINT_PROCESSORS = ("JointAttnProcessor2_0", "QuantJointAttnProcessor")
FLUX_PROCESSORS = ("FluxAttnProcessor", "QuantFluxAttnProcessor")


def is_joint(attn: nn.Module) -> bool:
    return type(getattr(attn, "processor", None)).__name__ in JOINT_PROCESSORS + FLUX_PROCESSORS


def is_flux(attn: nn.Module) -> bool:
    return type(getattr(attn, "processor", None)).__name__ in FLUX_PROCESSORS


class QuantJointAttnProcessor(QuantAttnProcessor):
    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__({**record, "cross": False, "start_token_fp": False})
        self.record["joint"] = True
        if record["probs"] == "log":
            self.p_txt_quant: nn.Module = LogProbQuantizer(record["bits"], record.get("delta", "prompt"),
                                                           record["timestep_aware"],
                                                           bool(record.get("per_batch_delta", False)))
        else:
            from quantkit.quantizers.group_act import GroupActQuantizer

            self.p_txt_quant = GroupActQuantizer(record["bits"], 1, "last", record["timestep_aware"])

    def quantizers(self) -> list[nn.Module]:
        return super().quantizers() + [self.p_txt_quant]

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **_: Any):
        batch, n_img = hidden_states.shape[0], hidden_states.shape[1]

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, L, heads*d] -> [B, heads, L, d]
            return t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            eq = heads(attn.add_q_proj(encoder_hidden_states))
            ek = heads(attn.add_k_proj(encoder_hidden_states))
            ev = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = torch.cat([query, eq], 2), torch.cat([key, ek], 2), torch.cat([value, ev], 2)
        query, key, value = self.q_quant(query), self.k_quant(key), self.v_quant(value)
        dtype = query.dtype
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale  # [B, heads, Lq, Lk]
        probs = scores.float().softmax(-1).to(dtype)
        if encoder_hidden_states is not None:
            probs = torch.cat([self.p_quant(probs[..., :n_img]), self.p_txt_quant(probs[..., n_img:])], dim=-1)
        else:
            probs = self.p_quant(probs)
        out = torch.matmul(probs, value).transpose(1, 2).reshape(batch, -1, query.shape[1] * query.shape[-1])
        if encoder_hidden_states is not None:
            out, context = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, context) if encoder_hidden_states is not None else out


class QuantFluxAttnProcessor(QuantJointAttnProcessor):
    """FLUX.1's attention as diffusers' FluxAttnProcessor computes it (text tokens first, rotary positions on Q
    and K); in double-stream blocks the text-key columns get their own log2 scale, in single-stream blocks
    (one already-joined sequence) one quantizer covers all columns."""

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, **_: Any):
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            from quantkit.errors import QuantkitError

            raise QuantkitError("FLUX attention with an attention mask is not covered by quantkit's attention quantizer")
        split = lambda t: t.unflatten(-1, (-1, attn.head_dim))  # noqa: E731  [B, L, H*d] -> [B, L, H, d]
        query = attn.norm_q(split(attn.to_q(hidden_states)))
        key = attn.norm_k(split(attn.to_k(hidden_states)))
        value = split(attn.to_v(hidden_states))
        n_txt = 0
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            n_txt = encoder_hidden_states.shape[1]
            query = torch.cat([attn.norm_added_q(split(attn.add_q_proj(encoder_hidden_states))), query], dim=1)
            key = torch.cat([attn.norm_added_k(split(attn.add_k_proj(encoder_hidden_states))), key], dim=1)
            value = torch.cat([split(attn.add_v_proj(encoder_hidden_states)), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        # [B, L, H, d] -> [B, H, L, d]
        query, key, value = (self_q(t.transpose(1, 2)) for self_q, t in
                             ((self.q_quant, query), (self.k_quant, key), (self.v_quant, value)))
        probs = (torch.matmul(query, key.transpose(-1, -2)) * query.shape[-1] ** -0.5).float().softmax(-1).to(query.dtype)
        if n_txt:
            probs = torch.cat([self.p_txt_quant(probs[..., :n_txt]), self.p_quant(probs[..., n_txt:])], dim=-1)
        else:
            probs = self.p_quant(probs)
        out = torch.matmul(probs, value).transpose(1, 2).flatten(2, 3)  # [B, L, H*d]
        if encoder_hidden_states is not None:
            context, out = out[:, :n_txt], out[:, n_txt:]
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(context.contiguous())
        return out
