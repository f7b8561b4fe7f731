"""GPU timing for the kernel benchmark: L2 flushed before every run, kernel-only (CUDA graph replay) and
end-to-end (the eager call with Python dispatch) figures. Imports nothing from triton; CUDA only when called."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import torch

# Flush buffer: at least twice the largest L2 (H100 50 MiB, H200 60 MiB, B200 126 MiB), so a 32 MiB int4
# weight cannot stay resident between runs while its 128 MiB fp16 counterpart cannot either.
FLUSH_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Timing:
    """Median and spread of one measured callable, in microseconds."""

    median_us: float
    p20_us: float
    p80_us: float
    runs: int


def summarize(samples_us: list[float]) -> Timing:
    """Median and 20th/80th percentiles of a list of run times (pure; tested on CPU)."""
    if not samples_us:
        raise ValueError("no timing samples")
    s = sorted(samples_us)

    def q(f: float) -> float:
        return s[min(len(s) - 1, int(f * (len(s) - 1) + 0.5))]

    return Timing(statistics.median(s), q(0.2), q(0.8), len(s))


def flush_buffer(device: torch.device, nbytes: int = FLUSH_BYTES) -> torch.Tensor:
    return torch.empty(nbytes // 4, dtype=torch.int32, device=device)


def time_eager(fn: Callable[[], object], flush: torch.Tensor, warmup: int = 5, reps: int = 50) -> Timing:
    """End to end: the eager call (host dispatch included), L2 flushed before each run, CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1e3)
    return summarize(out)


def time_graph(fn: Callable[[], object], flush: torch.Tensor, warmup: int = 3, reps: int = 50) -> Timing:
    """Kernel only: fn captured once in a CUDA graph, the replay timed (no Python, no launch overhead)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (and any autotuning / lazy repack) outside the capture
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1e3)
    return summarize(out)
