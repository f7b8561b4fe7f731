"""Benchmark of the Triton kernels against fp16 cuBLAS: `python -m quantkit.kernels.bench` (`quantkit bench kernels`).

Times each kernel (CUDA events, warm-up, median of many runs) against torch.matmul in fp16 on shapes
of real models, and prints the speedup and the achieved memory bandwidth as a fraction of peak.
Needs a CUDA GPU; without one it refuses with a one-line message.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Callable

import torch

LINEAR_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192))  # (N, K)
M_VALUES = (1, 16, 64, 256, 1024)
# (name, experts, top_k, hidden, intermediate): Mixtral-8x7B and OLMoE/Qwen-MoE-like layers.
MOE_SHAPES = (("moe-8x", 8, 2, 4096, 14336), ("moe-64x", 64, 8, 2048, 1024))
# Peak DRAM bandwidth in GB/s by device-name fragment; --peak-gbps overrides.
PEAK_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0,
             "L40S": 864.0, "RTX 4090": 1008.0}
KERNELS = ("w4a16-g128", "w4a16-mxfp4", "w8a8", "w4a4-int", "w4a4-mxfp4", "moe-w4a16", "moe-mxfp4")


@dataclass
class Row:
    kernel: str
    shape: str
    m: int
    fp16_us: float
    kernel_us: float
    speedup: float
    bandwidth_frac: float | None


def time_us(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median wall time of fn in microseconds, measured with CUDA events after a warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def _linear_case(kernel: str, m: int, n: int, k: int, dev: torch.device):
    from quantkit.formats import FormatSpec, QuantizedWeight
    from quantkit.kernels import qlinear
    from quantkit.quantizers.activation import ActQuantizer

    w_spec, a_spec = {
        "w4a16-g128": (FormatSpec(bits=4, granularity="group", group_size=128), None),
        "w4a16-mxfp4": (FormatSpec.mxfp4(), None),
        "w8a8": (FormatSpec(bits=8), FormatSpec(bits=8)),
        "w4a4-int": (FormatSpec(bits=4), FormatSpec(bits=4)),
        "w4a4-mxfp4": (FormatSpec.mxfp4(), FormatSpec.mxfp4()),
    }[kernel]
    w = torch.randn(n, k, device=dev, dtype=torch.float16)
    qw = QuantizedWeight.quantize(w, w_spec)
    x = torch.randn(m, k, device=dev, dtype=torch.float16)
    act = None if a_spec is None else ActQuantizer(a_spec)
    moved = qw.nbytes + x.numel() * 2 + m * n * 2
    return (lambda: torch.matmul(x, w.T)), (lambda: qlinear(x, qw, None, act, backend="triton")), moved


def _moe_case(kernel: str, m: int, e: int, top_k: int, h: int, inter: int, dev: torch.device):
    import torch.nn.functional as F

    from quantkit.formats import FormatSpec, QuantizedWeight
    from quantkit.kernels import qexperts

    spec = FormatSpec.mxfp4() if kernel == "moe-mxfp4" else FormatSpec(bits=4, granularity="group", group_size=128)
    w_gu = torch.randn(e, 2 * inter, h, device=dev, dtype=torch.float16)
    w_dn = torch.randn(e, h, inter, device=dev, dtype=torch.float16)
    gu, dn = QuantizedWeight.quantize(w_gu, spec), QuantizedWeight.quantize(w_dn, spec)
    x = torch.randn(m, h, device=dev, dtype=torch.float16)
    idx = torch.stack([torch.randperm(e, device=dev)[:top_k] for _ in range(m)])
    wts = torch.rand(m, top_k, device=dev).softmax(-1)

    def dense() -> torch.Tensor:  # the fp16 layer as transformers runs it: a loop over hit experts
        out = torch.zeros_like(x)
        for ex in torch.unique(idx).tolist():
            tok, slot = torch.where(idx == ex)
            g, u = (x[tok] @ w_gu[ex].T).chunk(2, dim=-1)
            out.index_add_(0, tok, ((F.silu(g) * u) @ w_dn[ex].T) * wts[tok, slot, None].half())
        return out

    hit = min(e, m * top_k)
    moved = (gu.nbytes + dn.nbytes) * hit // e + m * h * 4
    return dense, (lambda: qexperts(x, idx, wts, gu, dn, F.silu, backend="triton")), moved


def peak_gbps(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for key, v in PEAK_GBPS.items() if key in name), None)


def run(kernels: list[str], ms: list[int], warmup: int, iters: int, peak: float | None) -> list[Row]:
    dev = torch.device("cuda")
    rows = []
    for kernel in kernels:
        cases = ([(f"{n}x{k}", n, k) for n, k in LINEAR_SHAPES] if not kernel.startswith("moe")
                 else [(name, e, tk, h, i) for name, e, tk, h, i in MOE_SHAPES])
        for case in cases:
            for m in ms:
                if kernel.startswith("moe"):
                    base, fast, moved = _moe_case(kernel, m, *case[1:], dev)
                else:
                    base, fast, moved = _linear_case(kernel, m, case[1], case[2], dev)
                t_base, t_fast = time_us(base, warmup, iters), time_us(fast, warmup, iters)
                frac = None if peak is None else moved / (t_fast * 1e-6) / (peak * 1e9)
                rows.append(Row(kernel, case[0], m, t_base, t_fast, t_base / t_fast, frac))
                torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table (and optionally JSON); 2 without CUDA."""
    p = argparse.ArgumentParser(prog="quantkit bench kernels", description=__doc__.splitlines()[0])
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {', '.join(KERNELS)}")
    p.add_argument("--m", default=",".join(map(str, M_VALUES)), help="comma-separated token counts M")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50, help="timed runs per case (median reported)")
    p.add_argument("--peak-gbps", type=float, default=None, help="peak DRAM bandwidth (default: by GPU name)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("quantkit bench kernels: no CUDA GPU found; the Triton kernels can only be timed on one.", file=sys.stderr)
        return 2
    kernels = [k for k in args.kernels.split(",") if k]
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        print(f"unknown kernels {', '.join(unknown)}; allowed: {', '.join(KERNELS)}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    peak = peak_gbps(name, args.peak_gbps)
    rows = run(kernels, [int(m) for m in args.m.split(",")], args.warmup, args.iters, peak)
    print(f"GPU: {name}  torch {torch.__version__}  peak {peak or '?'} GB/s  (median of {args.iters} runs)")
    print(f"{'kernel':<12} {'shape':<11} {'M':>5} {'fp16 us':>9} {'kernel us':>10} {'speedup':>8} {'BW/peak':>8}")
    for r in rows:
        bw = "-" if r.bandwidth_frac is None else f"{r.bandwidth_frac:.2f}"
        print(f"{r.kernel:<12} {r.shape:<11} {r.m:>5} {r.fp16_us:>9.1f} {r.kernel_us:>10.1f} {r.speedup:>7.2f}x {bw:>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": name, "torch": torch.__version__, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
