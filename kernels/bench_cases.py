"""What the kernel benchmark measures: the quantized call, its baselines and its reference, per case.

Every builder returns a BenchCase of closures over tensors already on the GPU; nothing here times.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

LINEAR_SHAPES = ((8192, 8192), (4096, 4096), (14336, 4096), (4096, 14336))  # (N, K)
M_VALUES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
# (name, experts, top_k, hidden, intermediate): Mixtral-8x7B and a 64-expert top-8 (OLMoE / Qwen-MoE-like) layer
MOE_SHAPES = (("moe-8x", 8, 2, 4096, 14336), ("moe-64x", 64, 8, 2048, 1024))
KERNELS = ("w4a16-g128", "w4a16-channel", "w8a16-g128", "w4a16-mxfp4", "w8a8", "w4a4-int", "w4a4-mxfp4",
           "moe-w4a16", "moe-mxfp4")


@dataclass
class BenchCase:
    """One (kernel, shape, M, dtype) point: closures to time and to check."""

    kernel: str
    shape: str
    m: int
    dtype: torch.dtype
    quantized: Callable[[], torch.Tensor]  # the public call (dispatch included)
    kernel_only: Callable[[], torch.Tensor]  # the launch the dispatch ends in (graph-captured for kernel time)
    reference: Callable[[], torch.Tensor]  # pure-torch reference of `quantized`
    baselines: dict[str, Callable[[], object]] = field(default_factory=dict)  # cuBLAS, int4pack, grouped GEMM
    weight_bytes: int = 0  # bytes of quantized weight the call must read (bandwidth figures)
    notes: list[str] = field(default_factory=list)


def _specs(kernel: str):
    from quantkit.formats import FormatSpec

    return {
        "w4a16-g128": (FormatSpec(bits=4, granularity="group", group_size=128), None),
        "w4a16-channel": (FormatSpec(bits=4, granularity="channel"), None),
        "w8a16-g128": (FormatSpec(bits=8, granularity="group", group_size=128), None),
        "w4a16-mxfp4": (FormatSpec.mxfp4(), None),
        "w8a8": (FormatSpec(bits=8), FormatSpec(bits=8)),
        "w4a4-int": (FormatSpec(bits=4), FormatSpec(bits=4)),
        "w4a4-mxfp4": (FormatSpec.mxfp4(), FormatSpec.mxfp4()),
        "moe-w4a16": (FormatSpec(bits=4, granularity="group", group_size=128), None),
        "moe-mxfp4": (FormatSpec.mxfp4(), None),
    }[kernel]


def _int4pack_baseline(w: torch.Tensor, x: torch.Tensor) -> tuple[Callable[[], object] | None, str | None]:
    """torch's own int4 weight-only kernel (tinygemm), g128, if this torch build has it for this dtype."""
    try:
        n, k = w.shape
        wf = w.float()
        g = wf.reshape(n, k // 128, 128)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((hi - lo).clamp(min=1e-6) / 15)
        q = ((g - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        zero = lo + scale * 8  # tinygemm's zero: the value of code 8
        sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1).contiguous().to(x.dtype)
        packed = torch.ops.aten._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8), 8)
        fn = lambda: torch.ops.aten._weight_int4pack_mm(x, packed, 128, sz)  # noqa: E731
        fn()
        return fn, None
    except Exception as e:  # older/newer signatures, unsupported dtype: say so in the table, never guess
        return None, f"torch._weight_int4pack_mm unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80]}"


def _gemlite_baseline(w: torch.Tensor, x: torch.Tensor) -> tuple[Callable[[], object] | None, str | None]:
    """GemLite's Triton W4A16 g128 layer (the best Triton peer), where it installs: asymmetric 4-bit codes with
    its documented pack(W_q, scales, zeros, bias), W = (W_q - zero) * scale. Its output is checked against
    the same codes dequantized in torch before it is timed; any API or result mismatch is a note, not a time."""
    try:
        from gemlite.core import DType
        try:
            from gemlite.core import GemLiteLinearTriton as GemLiteLayer
        except ImportError:
            from gemlite.core import GemLiteLinear as GemLiteLayer
    except ImportError:
        return None, "GemLite not installed"
    try:
        n, k = w.shape
        g = w.float().reshape(n, k // 128, 128)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-8).to(x.dtype).float()
        zero = (-lo / scale).round().clamp(0, 15)
        q = (g / scale + zero).round().clamp(0, 15)
        dense = ((q - zero) * scale).reshape(n, k).to(x.dtype)
        dt = {torch.float16: DType.FP16, torch.bfloat16: DType.BF16}[x.dtype]
        layer = GemLiteLayer(4, group_size=128, in_features=k, out_features=n, input_dtype=dt, output_dtype=dt)
        layer.pack(q.reshape(n, k).to(torch.uint8), scale.reshape(n, -1).to(x.dtype),
                   zero.reshape(n, -1).to(x.dtype), None)
        fn = lambda: layer(x)  # noqa: E731
        want = (x @ dense.T).float()
        err = ((fn().float() - want).norm() / want.norm()).item()
        if not err < 1e-2:
            return None, f"GemLite output differs from its codes (rel err {err:.3g}): not timed"
        return fn, None
    except Exception as e:  # a GemLite version with another API: say so in the table, never guess
        return None, f"GemLite unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def linear_case(kernel: str, m: int, n: int, k: int, dtype: torch.dtype, dev: torch.device) -> BenchCase:
    from quantkit.formats import QuantizedWeight
    from quantkit.kernels import qlinear
    from quantkit.kernels.reference import qlinear_reference
    from quantkit.quantizers.activation import ActQuantizer

    w_spec, a_spec = _specs(kernel)
    gen = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(n, k, device=dev, dtype=dtype, generator=gen) / k ** 0.5
    qw = QuantizedWeight.quantize(w, w_spec)
    qw.kernel_cache = {}  # what a module gives its weights: the packed copy is built once
    x = torch.randn(m, k, device=dev, dtype=dtype, generator=gen)
    act = None if a_spec is None else ActQuantizer(a_spec)
    quantized = lambda: qlinear(x, qw, None, act, backend="triton")  # noqa: E731
    kernel_only = quantized
    if act is None:
        from quantkit.kernels.weight_only import weight_only_linear

        kernel_only = lambda: weight_only_linear(x, qw)  # noqa: E731
    case = BenchCase(kernel, f"{n}x{k}", m, dtype, quantized, kernel_only,
                     lambda: qlinear_reference(x, qw, None, act), weight_bytes=qw.nbytes)
    case.baselines["cublas"] = lambda: torch.matmul(x, w.T)
    if kernel == "w4a16-g128":
        fn, why = _int4pack_baseline(w, x)
        if fn is not None:
            case.baselines["int4pack"] = fn
        else:
            case.notes.append(why)
        fn, why = _gemlite_baseline(w, x)
        if fn is not None:
            case.baselines["gemlite"] = fn
        else:
            case.notes.append(why)
    return case


def grouped_gemm_baseline(x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, w_gu: torch.Tensor,
                          w_dn: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The fp16/bf16 MoE layer as one padded grouped GEMM per projection (bmm over experts), no Python loop."""
    import torch.nn.functional as F

    e = w_gu.shape[0]
    t, top_k = idx.shape
    flat = idx.reshape(-1)
    counts = torch.bincount(flat, minlength=e)
    cap = int(counts.max().item())  # fixed per case (routing is fixed): the padded capacity
    order = torch.argsort(flat, stable=True)
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(flat.numel(), device=x.device) - start[flat[order]]
    slot = torch.empty_like(order)
    slot[order] = pos
    tok = torch.arange(t, device=x.device).repeat_interleave(top_k)
    w_gu_t, w_dn_t = w_gu.transpose(1, 2), w_dn.transpose(1, 2)  # [E, H, 2I], [E, I, H]

    def run() -> torch.Tensor:
        buf = x.new_zeros(e, cap, x.shape[1])
        buf[flat, slot] = x[tok]
        gate, up = torch.bmm(buf, w_gu_t).chunk(2, dim=-1)
        y = torch.bmm(F.silu(gate) * up, w_dn_t)  # [E, cap, H]
        out = y[flat, slot] * wts.reshape(-1, 1).to(y.dtype)
        return out.view(t, top_k, -1).sum(1)

    return run


def moe_case(kernel: str, m: int, e: int, top_k: int, h: int, inter: int, dtype: torch.dtype,
             dev: torch.device) -> BenchCase:
    import torch.nn.functional as F

    from quantkit.formats import QuantizedWeight
    from quantkit.kernels import qexperts
    from quantkit.kernels.reference import qexperts_reference

    spec, _ = _specs(kernel)
    gen = torch.Generator(device=dev).manual_seed(0)
    w_gu = torch.randn(e, 2 * inter, h, device=dev, dtype=dtype, generator=gen) / h ** 0.5
    w_dn = torch.randn(e, h, inter, device=dev, dtype=dtype, generator=gen) / inter ** 0.5
    gu, dn = QuantizedWeight.quantize(w_gu, spec), QuantizedWeight.quantize(w_dn, spec)
    gu.kernel_cache, dn.kernel_cache = {}, {}  # as in a module: repacked once, not inside every timed call
    x = torch.randn(m, h, device=dev, dtype=dtype, generator=gen)
    idx = torch.stack([torch.randperm(e, device=dev, generator=gen)[:top_k] for _ in range(m)])
    wts = torch.rand(m, top_k, device=dev, generator=gen).softmax(-1)
    call = lambda: qexperts(x, idx, wts, gu, dn, F.silu, backend="triton")  # noqa: E731
    hit = int(torch.unique(idx).numel())
    case = BenchCase(kernel, f"{e}x(H{h},I{inter}) top{top_k}", m, dtype, call, call,
                     lambda: qexperts_reference(x, idx, wts, gu, dn, F.silu),
                     weight_bytes=(gu.nbytes + dn.nbytes) * hit // e)
    case.baselines["grouped-gemm"] = grouped_gemm_baseline(x, idx, wts, w_gu, w_dn)
    return case
