"""DGQ's attention quantizers on joint (text + image) attention: SD3/SD3.5's MMDiT attention, computed as
diffusers' JointAttnProcessor2_0 does (image tokens first, then text tokens, one softmax over both), and
FLUX.1's and Qwen-Image's (text first, rotary positions; QuantFluxAttnProcessor,
QuantQwenDoubleStreamAttnProcessor).

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
QWEN_PROCESSORS = ("QwenDoubleStreamAttnProcessor2_0", "QuantQwenDoubleStreamAttnProcessor")


def is_joint(attn: nn.Module) -> bool:
    return type(getattr(attn, "processor", None)).__name__ in JOINT_PROCESSORS + FLUX_PROCESSORS + QWEN_PROCESSORS


def joint_processor(attn: nn.Module) -> type:
    """The quantized processor class standing in for `attn`'s joint-attention processor."""
    name = type(getattr(attn, "processor", None)).__name__
    if name in FLUX_PROCESSORS:
        return QuantFluxAttnProcessor
    if name in QWEN_PROCESSORS:
        return QuantQwenDoubleStreamAttnProcessor
    return QuantJointAttnProcessor


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


class QuantQwenDoubleStreamAttnProcessor(QuantJointAttnProcessor):
    """Qwen-Image's double-stream attention as diffusers' QwenDoubleStreamAttnProcessor2_0 computes it (text
    tokens first, complex rotary positions per stream, the text padding mask over the keys)."""

    # diffusers' Attention.forward passes only the keyword arguments its processor's __call__ names.
    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 encoder_hidden_states_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: Any = None):
        return nn.Module.__call__(self, attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                  attention_mask, image_rotary_emb)

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                encoder_hidden_states_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                image_rotary_emb: Any = None, **_: Any):
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        from quantkit.errors import QuantkitError

        if encoder_hidden_states is None or attention_mask is not None:
            raise QuantkitError("Qwen-Image attention takes a text stream and no external attention mask")
        n_txt, head_dim = encoder_hidden_states.shape[1], attn.inner_dim // attn.heads
        split = lambda t: t.unflatten(-1, (-1, head_dim))  # noqa: E731  [B, L, H*d] -> [B, L, H, d]
        iq, ik, iv = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        tq, tk = split(attn.add_q_proj(encoder_hidden_states)), split(attn.add_k_proj(encoder_hidden_states))
        tv = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_q is not None:
            iq = attn.norm_q(iq)
        if attn.norm_k is not None:
            ik = attn.norm_k(ik)
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            iq, ik = apply_rotary_emb_qwen(iq, img_freqs, use_real=False), apply_rotary_emb_qwen(ik, img_freqs, use_real=False)
            tq, tk = apply_rotary_emb_qwen(tq, txt_freqs, use_real=False), apply_rotary_emb_qwen(tk, txt_freqs, use_real=False)
        # [B, L, H, d] -> [B, H, L, d], text first
        query = self.q_quant(torch.cat([tq, iq], dim=1).transpose(1, 2))
        key = self.k_quant(torch.cat([tk, ik], dim=1).transpose(1, 2))
        value = self.v_quant(torch.cat([tv, iv], dim=1).transpose(1, 2))
        scores = torch.matmul(query, key.transpose(-1, -2)) * head_dim ** -0.5  # [B, H, Lq, Lk]
        if encoder_hidden_states_mask is not None:
            keep = torch.cat([encoder_hidden_states_mask.bool(),
                              torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)], 1)
            scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        probs = scores.float().softmax(-1).to(query.dtype)
        probs = torch.cat([self.p_txt_quant(probs[..., :n_txt]), self.p_quant(probs[..., n_txt:])], dim=-1)
        out = torch.matmul(probs, value).transpose(1, 2).flatten(2, 3)  # [B, L, H*d]
        txt, img = out[:, :n_txt], out[:, n_txt:]
        img = attn.to_out[0](img.contiguous())
        if len(attn.to_out) > 1:
            img = attn.to_out[1](img)
        return img, attn.to_add_out(txt.contiguous())
