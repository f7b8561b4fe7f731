"""The CPU-checkable parts of the GPU kernel benchmark: arguments, statistics, crossover rule, baselines."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from quantkit.kernels import bench
from quantkit.kernels.bench_cases import KERNELS, M_VALUES, grouped_gemm_baseline
from quantkit.kernels.bench_timing import summarize
from quantkit.kernels.bench_tune import crossover_from


def test_default_m_values_cover_decode_to_prefill() -> None:
    assert M_VALUES == (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)


def test_bad_arguments_are_one_line_errors() -> None:
    for argv in (["--kernels", "w4a16-g128,nope"], ["--m", "0"], ["--m", "a,b"], ["--dtypes", "fp8"]):
        proc = subprocess.run([sys.executable, "-m", "quantkit.kernels.bench", *argv], capture_output=True, text=True)
        assert proc.returncode == 2, argv
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_parsers() -> None:
    assert bench.parse_list("w8a8,moe-w4a16", KERNELS, "kernels") == ["w8a8", "moe-w4a16"]
    with pytest.raises(ValueError, match="unknown dtypes fp8"):
        bench.parse_list("fp16,fp8", ("fp16", "bf16"), "dtypes")
    assert bench.parse_ms("1,16,4096") == [1, 16, 4096]


def test_summarize_median_and_spread() -> None:
    t = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_us, t.p20_us, t.p80_us, t.runs) == (3.0, 2.0, 4.0, 5)
    with pytest.raises(ValueError):
        summarize([])


def test_crossover_is_where_dense_wins_from_then_on() -> None:
    times = {1: (10, 50), 64: (20, 30), 256: (40, 35), 1024: (90, 60), 4096: (300, 200)}
    assert crossover_from(times) == 256
    times[512] = (50, 55)  # the packed kernel wins again at 512: dense must win at every larger M
    assert crossover_from(times) == 1024
    assert crossover_from({1: (1, 2), 4096: (10, 20)}) is None


def test_grouped_gemm_baseline_is_the_moe_layer() -> None:
    """The MoE baseline (padded bmm per projection) computes the same layer as a per-expert loop."""
    torch.manual_seed(0)
    e, h, inter, t, k = 4, 32, 16, 7, 2
    w_gu, w_dn = torch.randn(e, 2 * inter, h), torch.randn(e, h, inter)
    x = torch.randn(t, h)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    wts = torch.rand(t, k).softmax(-1)
    ref = torch.zeros(t, h)
    for ti in range(t):
        for s in range(k):
            ex = idx[ti, s]
            g, u = (x[ti] @ w_gu[ex].T).chunk(2)
            ref[ti] += wts[ti, s] * ((F.silu(g) * u) @ w_dn[ex].T)
    # fp32 with outputs ~100: summation order differs (bmm vs vector-matrix), so a relative bound
    assert torch.allclose(grouped_gemm_baseline(x, idx, wts, w_gu, w_dn)(), ref, rtol=1e-4, atol=1e-3)


def test_a_case_that_raises_is_a_failed_row_and_the_sweep_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the first H200 run one kernel's compile error ended the whole sweep; now it is a FAIL row naming the
    error, the other cases still run, and the JSON callback sees every row as it comes."""
    from quantkit.kernels import bench_cases, bench_timing

    monkeypatch.setattr(bench_timing, "flush_buffer", lambda dev: torch.empty(1))
    built = []

    def linear_case(kernel, m, n, k, dtype, dev):
        built.append((n, k))
        raise RuntimeError("CompilationError: at 56:20:\nmore lines")

    monkeypatch.setattr(bench_cases, "linear_case", linear_case)
    seen = []
    rows = bench.run(["w8a8"], [16], ["bf16"], 1, None, on_row=lambda r: seen.append(len(r)))
    assert built == list(bench_cases.LINEAR_SHAPES)  # every shape was tried
    assert [r.ok for r in rows] == [False] * len(built) and seen == list(range(1, len(built) + 1))
    assert rows[0].notes == ["ERROR RuntimeError: CompilationError: at 56:20:"] and rows[0].shape == "8192x8192"
