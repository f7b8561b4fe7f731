"""quantkit's low-bit matmul kernels and their dispatch.

Every Triton kernel has a pure-torch reference with the same signature (reference.py,
reference_act.py). Dispatch picks Triton for CUDA tensors when a Triton kernel covers the case and
the reference otherwise; `backend` forces one ("triton" also runs on CPU tensors under
TRITON_INTERPRET=1, which is how the tests check the kernels). Importing this module never imports
triton or touches CUDA: the Triton launchers are imported inside the calls that use them.
"""
from __future__ import annotations

import logging

import torch

from quantkit.formats.qweight import QuantizedWeight
from quantkit.kernels.dispatch import (BACKENDS, KernelChoice, choose_experts_kernel, choose_linear_kernel,
                                       pick_backend)
from quantkit.kernels.reference import ActFn, qexperts_reference, qlinear_reference

log = logging.getLogger(__name__)


def triton_supports(x: torch.Tensor, qweight: QuantizedWeight, act: ActFn | None,
                    rotation: torch.Tensor | None = None) -> bool:
    """Whether a Triton kernel covers this qlinear call (device aside: CPU needs the interpreter)."""
    return choose_linear_kernel(x, qweight, act, rotation).kernel is not None


def resolve_backend(x: torch.Tensor, qweight: QuantizedWeight, act: ActFn | None, backend: str = "auto",
                    rotation: torch.Tensor | None = None) -> str:
    """The backend `qlinear` will use for these arguments ('triton' or 'reference')."""
    choice = choose_linear_kernel(x, qweight, act, rotation)
    return pick_backend(choice, x.is_cuda, backend, f"{qweight.spec.short} with this activation quantizer")


def resolve_experts_backend(hidden: torch.Tensor, gate_up: QuantizedWeight, down: QuantizedWeight,
                            act_in: ActFn | None = None, act_mid: ActFn | None = None,
                            backend: str = "auto") -> str:
    """The backend `qexperts` will use for these arguments ('triton' or 'reference')."""
    choice = choose_experts_kernel(hidden, gate_up, down, act_in, act_mid)
    return pick_backend(choice, hidden.is_cuda, backend, f"experts in {gate_up.spec.short}")


def qlinear(
    x: torch.Tensor,  # [..., K]
    qweight: QuantizedWeight,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    act: ActFn | None = None,
    backend: str = "auto",
    rotation: torch.Tensor | None = None,  # [32, 32] or [K/32, 32, 32], applied to x before act
) -> torch.Tensor:  # [..., N]
    """y = act(rotate(x)) @ dequant(W)^T + b for x [..., K], W [N, K] (W stored already rotated)."""
    choice = choose_linear_kernel(x, qweight, act, rotation)
    used = pick_backend(choice, x.is_cuda, backend, f"{qweight.spec.short} with this activation quantizer")
    if used == "reference":
        if x.is_cuda and choice.kernel is None:  # warned at load (kernels/prepare.py); per call only at DEBUG
            log.debug("qlinear %s: reference (%s)", qweight.spec.short, choice.reason)
        return qlinear_reference(x, qweight, bias, act, rotation)
    if choice.kernel == "wo_gemm":
        from quantkit.kernels.weight_only import weight_only_linear

        return weight_only_linear(x, qweight, bias)
    from quantkit.kernels.aq_gemm import aq_linear_triton

    return aq_linear_triton(x, qweight, bias, act, rotation)


def qexperts(
    hidden: torch.Tensor,  # [T, H]
    top_k_index: torch.Tensor,  # [T, k]
    top_k_weights: torch.Tensor,  # [T, k]
    gate_up: QuantizedWeight,  # [E, 2I, H]
    down: QuantizedWeight,  # [E, H, I]
    act_fn: ActFn,
    act_in: ActFn | None = None,
    act_mid: ActFn | None = None,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    backend: str = "auto",
    gate_fn: ActFn | None = None,
) -> torch.Tensor:  # [T, H]
    """Routed experts over 3-D quantized weights (see qexperts_reference for the contract; gate_fn: a
    layout's own [S, 2I] -> [S, I] step in place of act_fn(gate) * up)."""
    choice = choose_experts_kernel(hidden, gate_up, down, act_in, act_mid)
    used = pick_backend(choice, hidden.is_cuda, backend, f"experts in {gate_up.spec.short}")
    if used == "reference":
        if hidden.is_cuda and choice.kernel is None:
            log.debug("qexperts %s: reference (%s)", gate_up.spec.short, choice.reason)
        return qexperts_reference(hidden, top_k_index, top_k_weights, gate_up, down, act_fn, act_in, act_mid,
                                  gate_up_bias, down_bias, gate_fn)
    from quantkit.kernels.repack import cached_repack, repack_problem

    if repack_problem(gate_up) is None and repack_problem(down) is None:
        from quantkit.kernels.packed_moe import qexperts_packed

        return qexperts_packed(hidden, top_k_index, top_k_weights, cached_repack(gate_up), cached_repack(down),
                               act_fn, gate_up_bias, down_bias, gate_fn=gate_fn)
    from quantkit.kernels.moe import qexperts_triton

    return qexperts_triton(hidden, top_k_index, top_k_weights, gate_up, down, act_fn, None, None,
                           gate_up_bias, down_bias, gate_fn=gate_fn)


__all__ = ["qlinear", "qexperts", "resolve_backend", "resolve_experts_backend", "triton_supports",
           "qlinear_reference", "qexperts_reference", "BACKENDS", "KernelChoice", "choose_linear_kernel",
           "choose_experts_kernel"]
