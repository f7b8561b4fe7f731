"""Load-time preparation of a quantized model for CUDA: repack every weight the packed kernels read
(once, beside the checkpoint's tensors, whose format is unchanged), and say loudly which layers will
dequantize-then-matmul instead of running a Triton kernel, and why."""
from __future__ import annotations

import logging

import torch
from torch import nn

from quantkit.kernels.dispatch import choose_experts_kernel, choose_linear_kernel
from quantkit.kernels.repack import cached_repack, repack_problem

log = logging.getLogger(__name__)


def _model_dtype(root: nn.Module) -> torch.dtype:
    for p in list(root.parameters()) + list(root.buffers()):
        if p.is_floating_point():
            return p.dtype
    return torch.float16


def cuda_fallbacks(root: nn.Module, dtype: torch.dtype | None = None) -> dict[str, str]:
    """{layer name: why it dequantizes and calls torch on CUDA} for every quantized layer without a kernel."""
    from quantkit.nn import QuantConv2d, QuantExperts, QuantLinear
    from quantkit.nn_experts import QuantParallelExperts
    from quantkit.quantizers.activation import ActQuantizer

    dtype = dtype or _model_dtype(root)
    out = {}
    for name, mod in root.named_modules():
        if isinstance(mod, (QuantLinear, QuantConv2d)):
            qw = mod.quantized_weight
            x = torch.empty(0, qw.shape[-1], dtype=dtype, device=qw.packed.device)
            if isinstance(mod, QuantConv2d) and not mod._is_pointwise():
                out[name] = f"{mod.weight_shape[2]}x{mod.weight_shape[3]} convolution: no Triton kernel (F.conv2d)"
                continue
            act = mod.act if isinstance(mod.act, ActQuantizer) else None  # other quantizers run before the GEMM
            rotation = getattr(mod, "rotation", None)
            fused = None if rotation is None else rotation.fused_rotation()
            if act is not None and isinstance(mod, QuantConv2d):
                act = act.along_last_dim()
            choice = choose_linear_kernel(x, qw, act, fused)  # the arguments forward() passes
            if choice.kernel is None:
                out[name] = choice.reason
        elif isinstance(mod, QuantParallelExperts):
            out[name] = "parallel experts (JetMoE layout): one torch matmul per expert (no fused kernel)"
        elif isinstance(mod, QuantExperts):
            h = torch.empty(0, mod.hidden_dim, dtype=dtype, device=mod.gate_up_qweight.device)
            if getattr(mod, "call", "routed") == "dense":
                out[name] = "experts called densely on [E*T, H] inputs (Llama-4 layout): torch bmm (no fused kernel)"
                continue
            if mod.rot_in is not None or mod.rot_mid is not None:
                out[name] = "rotated experts run a per-expert Python loop (no fused kernel)"
                continue
            choice = choose_experts_kernel(h, mod.gate_up, mod.down, mod.act_in, mod.act_mid)
            if choice.kernel is None:
                out[name] = choice.reason
    return out


def prepare_for_cuda(root: nn.Module, dtype: torch.dtype | None = None) -> dict[str, str]:
    """Repack the weights the packed kernels read and warn about every CUDA fallback; returns the fallbacks."""
    from quantkit.nn import QuantConv2d, QuantExperts, QuantLinear

    n = 0
    for mod in root.modules():
        if isinstance(mod, (QuantLinear, QuantConv2d)):
            weights = [mod.quantized_weight]
        elif isinstance(mod, QuantExperts):
            weights = [mod.gate_up, mod.down]
        else:
            continue
        for qw in weights:
            if qw.packed.is_cuda and repack_problem(qw) is None:
                cached_repack(qw)
                n += 1
    fallbacks = cuda_fallbacks(root, dtype)
    by_reason: dict[str, list[str]] = {}
    for name, reason in fallbacks.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        log.warning("%d quantized layer(s) will dequantize then matmul on CUDA (%s): %s", len(names), reason,
                    ", ".join(names))
    log.info("repacked %d weights for the packed Triton kernels", n)
    return fallbacks
