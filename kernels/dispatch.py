"""Which kernel serves a call: pure python, never imports triton (only asks whether it is installed)."""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch

from quantkit.formats.qweight import QuantizedWeight
from quantkit.kernels.aq_rules import act_kernel_problem
from quantkit.kernels.configs import is_interpreter
from quantkit.kernels.layout import weight_supported

BACKENDS = ("auto", "reference", "triton")
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class KernelChoice:
    """The Triton kernel for a call, or None and why not (for logs and `quantkit inspect`)."""

    kernel: str | None  # "wo_gemm" | "aq_gemm" | "moe_gemm" | None
    reason: str


@functools.cache
def triton_installed() -> bool:
    """Whether triton can be imported (looked up once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _device_problem(x: torch.Tensor) -> str | None:
    if not triton_installed():
        return "triton is not installed"
    if not x.is_cuda and not is_interpreter():
        return "tensors are on the CPU (the Triton kernels need CUDA, or TRITON_INTERPRET=1 for tests)"
    if x.dtype not in HALF_DTYPES:
        return f"activations are {x.dtype}; the kernels take float16/bfloat16"
    return None


def choose_linear_kernel(x: torch.Tensor, qweight: QuantizedWeight, act: object | None,
                         rotation: torch.Tensor | None = None) -> KernelChoice:
    """The Triton kernel that computes qlinear(x, qweight, act=act, rotation=rotation), if any."""
    problem = _device_problem(x)
    if problem is None and len(qweight.shape) != 2:
        problem = f"weight has shape {tuple(qweight.shape)}; qlinear takes [N, K]"
    if problem is None and qweight.packed.device != x.device:
        problem = f"weight is on {qweight.packed.device}, activations on {x.device}"
    if problem is None:
        problem = weight_supported(qweight)
    if problem is not None:
        return KernelChoice(None, problem)
    if act is None:
        if rotation is not None:
            return KernelChoice(None, "a rotation without an activation quantizer is left to the reference")
        return KernelChoice("wo_gemm", f"weight-only {qweight.spec.short}")
    problem = act_kernel_problem(x, qweight, act, rotation)
    if problem is not None:
        return KernelChoice(None, problem)
    return KernelChoice("aq_gemm", f"{act.spec.short} activations x {qweight.spec.short} weights")


def choose_experts_kernel(hidden: torch.Tensor, gate_up: QuantizedWeight, down: QuantizedWeight,
                          act_in: object | None, act_mid: object | None) -> KernelChoice:
    """The Triton kernel that computes qexperts(...) for these arguments, if any."""
    problem = _device_problem(hidden)
    if problem is None and (act_in is not None or act_mid is not None):
        problem = "quantized expert activations: the fused MoE kernel is weight-only"
    if problem is None and hidden.dim() != 2:
        problem = f"hidden has shape {tuple(hidden.shape)}; qexperts takes [T, H]"
    for qw in (gate_up, down):
        if problem is None and len(qw.shape) != 3:
            problem = f"expert weight has shape {tuple(qw.shape)}; expected [E, N, K]"
        if problem is None and qw.packed.device != hidden.device:
            problem = f"expert weight is on {qw.packed.device}, hidden states on {hidden.device}"
        problem = problem or weight_supported(qw)
    if problem is not None:
        return KernelChoice(None, problem)
    return KernelChoice("moe_gemm", f"grouped weight-only {gate_up.spec.short}/{down.spec.short}")


def pick_backend(choice: KernelChoice, on_cuda: bool, backend: str, what: str) -> str:
    """'triton' or 'reference' for a requested backend, raising if Triton is forced but cannot serve."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if on_cuda and choice.kernel is not None else "reference"
    if backend == "triton" and choice.kernel is None:
        raise ValueError(f"no Triton kernel for {what}: {choice.reason}")
    return backend
