"""Which weight-only kernel runs a qlinear call: packed (GEMV / MMA), large-M dequantize + cuBLAS,
or the byte-layout kernel for widths the packed layout does not hold (3, 5, 6, 7 bits)."""
from __future__ import annotations

import logging

import torch

from quantkit.formats.qweight import QuantizedWeight
from quantkit.kernels.repack import cached_repack, repack_problem

log = logging.getLogger(__name__)


def large_m_threshold(x: torch.Tensor, qweight: QuantizedWeight) -> int | None:
    """M from which this call dequantizes and calls cuBLAS (None off CUDA: the interpreter has no cuBLAS)."""
    if not x.is_cuda:
        return None
    from quantkit.kernels.tuning import crossover_m, format_key

    spec = qweight.spec
    group = int(spec.group_size) if spec.granularity == "group" else 0
    m, _measured = crossover_m(torch.cuda.get_device_name(x.device),
                               format_key(spec.bits, group, spec.kind == "mxfp4"))
    return m


def weight_only_linear(x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(W)^T + b through the Triton kernel that suits this M and format."""
    if repack_problem(qweight) is not None:
        from quantkit.kernels.wo_gemm import wo_linear_triton

        return wo_linear_triton(x, qweight, bias)
    kw = cached_repack(qweight)
    m = x.numel() // max(1, x.shape[-1])
    threshold = large_m_threshold(x, qweight)
    if threshold is not None and m >= threshold:
        from quantkit.kernels.packed_linear import large_m_linear

        return large_m_linear(x, kw, bias)
    from quantkit.kernels.packed_linear import packed_linear_triton

    return packed_linear_triton(x, kw, bias)
