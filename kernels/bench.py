"""Kernel benchmark on a CUDA GPU: `python -m quantkit.kernels.bench` (`quantkit bench kernels`).

For every kernel, shape, M and dtype: the kernel alone (CUDA-graph replay) and end to end (the eager
call, Python dispatch included), each with L2 flushed before every run; against cuBLAS on the dense
weight in the same dtype, torch's own int4 kernel (`torch._weight_int4pack_mm`, where this torch has
it), GemLite's W4A16 g128 layer where GemLite installs (its output checked against its codes first),
and for MoE a padded grouped GEMM (one bmm per projection). Every quantized output is checked
against its pure-torch reference on the GPU first; a mismatch is reported, not timed away.
`--tune` also measures the packed kernel's tiles and the large-M crossover and saves them for this GPU.
Without CUDA it exits with status 2 and one line.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from quantkit.kernels.bench_cases import KERNELS, LINEAR_SHAPES, M_VALUES, MOE_SHAPES

PEAK_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0,
             "L40S": 864.0, "RTX 4090": 1008.0}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
CHECK_TOL = 2e-2  # relative Frobenius error vs the reference: bf16 output rounding is ~4e-3


@dataclass
class Row:
    kernel: str
    shape: str
    m: int
    dtype: str
    kernel_us: float
    e2e_us: float
    baselines_us: dict
    speedup_vs_cublas: float | None  # cuBLAS time / kernel-only time
    bandwidth_frac: float | None
    rel_err: float
    ok: bool
    notes: list


def parse_list(text: str, allowed: tuple, what: str) -> list[str]:
    """Comma-separated subset of `allowed`; ValueError names the unknown ones."""
    items = [t for t in text.split(",") if t]
    unknown = [t for t in items if t not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(unknown)}; allowed: {', '.join(map(str, allowed))}")
    return items


def parse_ms(text: str) -> list[int]:
    try:
        ms = [int(t) for t in text.split(",") if t]
    except ValueError:
        raise ValueError(f"--m takes comma-separated positive integers, got {text!r}") from None
    if not ms or min(ms) < 1:
        raise ValueError(f"--m takes comma-separated positive integers, got {text!r}")
    return ms


def peak_gbps(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for key, v in PEAK_GBPS.items() if key in name), None)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def measure(case, flush, reps: int, peak: float | None) -> Row:
    from quantkit.kernels.bench_timing import time_eager, time_graph

    err = rel_err(case.quantized(), case.reference())
    ok = err < CHECK_TOL
    notes = list(case.notes)
    if not ok:
        notes.append(f"MISMATCH rel err {err:.3g} >= {CHECK_TOL}")
    t_kernel = time_graph(case.kernel_only, flush, reps=reps).median_us
    t_e2e = time_eager(case.quantized, flush, reps=reps).median_us
    base = {name: time_graph(fn, flush, reps=reps).median_us for name, fn in case.baselines.items()}
    ref = base.get("cublas") or base.get("grouped-gemm")
    frac = None if peak is None else case.weight_bytes / (t_kernel * 1e-6) / (peak * 1e9)
    return Row(case.kernel, case.shape, case.m, {v: k for k, v in DTYPES.items()}[case.dtype], t_kernel, t_e2e,
               base, None if ref is None else ref / t_kernel, frac, err, ok, notes)


def run(kernels: list[str], ms: list[int], dtypes: list[str], reps: int, peak: float | None,
        on_row: Callable[[list[Row]], None] | None = None) -> list[Row]:
    """Measure every case; a case that raises becomes a failed row. on_row(rows so far) after each row."""
    from quantkit.kernels.bench_cases import linear_case, moe_case
    from quantkit.kernels.bench_timing import flush_buffer

    dev = torch.device("cuda")
    flush = flush_buffer(dev)
    rows = []
    for kernel in kernels:
        for dt in dtypes:
            for m in ms:
                if kernel.startswith("moe"):
                    cases = [lambda s=s: moe_case(kernel, m, *s[1:], DTYPES[dt], dev) for s in MOE_SHAPES]
                else:
                    cases = [lambda s=s: linear_case(kernel, m, *s, DTYPES[dt], dev) for s in LINEAR_SHAPES]
                for i, build in enumerate(cases):
                    try:
                        row = measure(build(), flush, reps, peak)
                    except Exception as e:  # one broken case is reported as a failure, the sweep goes on
                        shape = MOE_SHAPES[i][0] if kernel.startswith("moe") else "x".join(map(str, LINEAR_SHAPES[i]))
                        row = Row(kernel, shape, m, dt, float("nan"), float("nan"), {}, None, None, float("inf"),
                                  False, [f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"])
                    rows.append(row)
                    print_row(row)
                    if on_row is not None:
                        on_row(rows)
                    torch.cuda.empty_cache()
    return rows


def print_row(r: Row) -> None:
    base = " ".join(f"{k}={v:.1f}" for k, v in r.baselines_us.items())
    sp = "-" if r.speedup_vs_cublas is None else f"{r.speedup_vs_cublas:.2f}x"
    bw = "-" if r.bandwidth_frac is None else f"{r.bandwidth_frac:.2f}"
    flag = "ok" if r.ok else "FAIL"
    print(f"{r.kernel:<13} {r.shape:<22} {r.dtype:<4} {r.m:>5} {r.kernel_us:>9.1f} {r.e2e_us:>9.1f} {sp:>8} {bw:>6} "
          f"{flag:<4} {base} {'; '.join(r.notes)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table (and optionally JSON); 2 without CUDA or on bad arguments."""
    p = argparse.ArgumentParser(prog="quantkit bench kernels", description=__doc__.splitlines()[0])
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {', '.join(KERNELS)}")
    p.add_argument("--m", default=",".join(map(str, M_VALUES)), help="comma-separated token counts M")
    p.add_argument("--dtypes", default="fp16,bf16", help="comma-separated subset of fp16, bf16")
    p.add_argument("--reps", type=int, default=50, help="timed runs per figure (median reported)")
    p.add_argument("--peak-gbps", type=float, default=None, help="peak DRAM bandwidth (default: by GPU name)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--tune", action="store_true", help="measure tiles and the large-M crossover; save them for this GPU")
    args = p.parse_args(argv)
    try:
        kernels = parse_list(args.kernels, KERNELS, "kernels")
        dtypes = parse_list(args.dtypes, tuple(DTYPES), "dtypes")
        ms = parse_ms(args.m)
    except ValueError as e:
        print(f"quantkit bench kernels: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("quantkit bench kernels: no CUDA GPU found; the Triton kernels can only be timed on one.", file=sys.stderr)
        return 2
    import triton

    name = torch.cuda.get_device_name()
    peak = peak_gbps(name, args.peak_gbps)
    print(f"GPU: {name}  driver/CUDA {torch.version.cuda}  torch {torch.__version__}  triton {triton.__version__}  "
          f"peak {peak or '?'} GB/s  (median of {args.reps}, L2 flushed)")
    if args.tune:
        from quantkit.kernels.bench_tune import tune

        print(f"tuning table saved to {tune(dtypes, args.reps)}")
    print(f"{'kernel':<13} {'shape':<22} {'dt':<4} {'M':>5} {'kern us':>9} {'e2e us':>9} {'vs fp':>8} {'BW':>6} check  baselines (us)")
    def write_json(rows: list[Row]) -> None:  # after every row, so a run cut short keeps what it measured
        with open(args.json, "w") as f:
            json.dump({"gpu": name, "torch": torch.__version__, "triton": triton.__version__,
                       "cuda": torch.version.cuda, "rows": [asdict(r) for r in rows]}, f, indent=1)

    rows = run(kernels, ms, dtypes, args.reps, peak, write_json if args.json else None)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
