"""quantkit's attention processor for diffusers `Attention` modules (DGQ, METHODS.md §2.3).

Q, K and V ([B, heads, L, d]) go through group activation quantizers; the softmax probabilities
through a log2 quantizer (or, for the per-tensor baseline, a uniform one). In cross-attention the
start token's key and probability column can stay in full precision. The processor is an
nn.Module, so diffusers registers it under `<attn>.processor` and its buffers travel with the model.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.quantizers.group_act import GroupActQuantizer
from quantkit.quantizers.log_attention import LogProbQuantizer


def attention_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """diffusers Attention modules of `root` (and FLUX's FluxAttention), by name."""
    from diffusers.models.attention_processor import Attention

    return [(n, m) for n, m in root.named_modules() if isinstance(m, Attention) or (is_joint(m) and hasattr(m, "to_q"))]


# Processors computing plain softmax(QK^T)V attention, which QuantAttnProcessor reproduces.
STANDARD_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "QuantAttnProcessor")


def is_joint(attn: nn.Module) -> bool:
    from quantkit.adapters.joint_attention import is_joint as joint

    return joint(attn)


def uncovered_attention(root: nn.Module) -> tuple[str, str] | None:
    """(name, why) of the first attention layer of `root` QuantAttnProcessor cannot stand in for, else None.
    Attention layers are found by what they are (q/k projections), whatever their class: FLUX's FluxAttention,
    Wan's WanAttention, SANA's linear-attention processor, SD3/Qwen-Image joint attention are all reported."""
    from diffusers.models.attention_processor import Attention

    for name, m in root.named_modules():
        if not (hasattr(m, "to_q") and hasattr(m, "to_k")):
            continue
        if is_joint(m):
            continue  # SD3 / FLUX / Qwen-Image joint attention: adapters/joint_attention.py
        if not isinstance(m, Attention):
            return name, f"{type(m).__name__} attention"
        proc = type(getattr(m, "processor", None)).__name__
        if proc not in STANDARD_PROCESSORS:
            return name, f"the {proc} attention processor"
        why = unsupported(m)
        if why is not None:
            return name, why
    return None


def unsupported(attn: nn.Module) -> str | None:
    """None if QuantAttnProcessor computes `attn` exactly as diffusers does, else why not."""
    for name in ("add_q_proj", "add_k_proj", "add_v_proj"):
        if getattr(attn, name, None) is not None:
            return "joint (added key/value) attention"
    if getattr(attn, "is_causal", False):
        return "causal attention"
    return None


class QuantAttnProcessor(nn.Module):
    """Attention with quantized Q, K, V and probabilities; see the module docstring."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__()
        self.record = dict(record)
        bits, groups, ta = record["bits"], record["groups"], record["timestep_aware"]
        self.cross = bool(record["cross"])
        self.start_token_fp = bool(record.get("start_token_fp")) and self.cross
        self.q_quant = GroupActQuantizer(bits, groups, "last", ta)
        self.k_quant = GroupActQuantizer(bits, groups, "last", ta)
        self.v_quant = GroupActQuantizer(bits, groups, "last", ta)
        if record["probs"] == "log":
            self.p_quant: nn.Module = LogProbQuantizer(bits, record.get("delta", "prompt"), ta,
                                                       bool(record.get("per_batch_delta", False)))
        elif record["probs"] == "uniform":
            self.p_quant = GroupActQuantizer(bits, 1, "last", ta)
        else:
            raise QuantkitError(f"unknown attention probability quantizer {record['probs']!r}; allowed: log, uniform")

    def quantizers(self) -> list[nn.Module]:
        return [self.q_quant, self.k_quant, self.v_quant, self.p_quant]

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_layout = hidden_states.ndim == 4
        if image_layout:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, kv_len, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # [B, L, heads*d] -> [B, heads, L, d]
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query, value = self.q_quant(query), self.v_quant(value)
        if self.start_token_fp:  # the start token's key stays in full precision
            key = torch.cat([key[:, :, :1], self.k_quant(key[:, :, 1:])], dim=2)
        else:
            key = self.k_quant(key)
        dtype = query.dtype
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale  # [B, heads, Lq, Lk]
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.float().softmax(-1) if attn.upcast_softmax else scores.softmax(-1)
        if self.start_token_fp:  # probability column 0 (the start token) stays in full precision
            probs = torch.cat([probs[..., :1], self.p_quant(probs[..., 1:])], dim=-1)
        else:
            probs = self.p_quant(probs)
        out = torch.matmul(probs.to(value.dtype), value).to(dtype)  # [B, heads, Lq, d]
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if image_layout:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_processor(attn: nn.Module, record: dict[str, Any]) -> QuantAttnProcessor:
    """Give `attn` a fresh QuantAttnProcessor (registered as its `processor` submodule)."""
    if record.get("joint") or is_joint(attn):
        from quantkit.adapters.joint_attention import joint_processor

        record["joint"] = True  # kept in quantization.json: the checkpoint says which processor it holds
        proc: QuantAttnProcessor = joint_processor(attn)(record)
        attn.set_processor(proc)
        return proc
    why = unsupported(attn)
    if why is not None:
        raise QuantkitError(f"attention of type {type(attn).__name__} uses {why}; quantkit's attention quantizer "
                            "does not cover it (use a recipe without attention quantization)")
    proc = QuantAttnProcessor(record)
    attn.set_processor(proc)
    return proc
