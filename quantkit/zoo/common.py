"""Helpers every zoo trainer shares: seeding, data lookup, metric files, timing."""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)

PACKAGE_DATA = Path(__file__).parent / "data"
METRICS_FILE = "zoo_metrics.json"


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def find_data_file(name: str) -> Path:
    """Locate a data file: the copy shipped in the package, $QUANTKIT_DATA, or ../shared/data."""
    candidates = [PACKAGE_DATA / name]
    if os.environ.get("QUANTKIT_DATA"):
        candidates.append(Path(os.environ["QUANTKIT_DATA"]) / name)
    candidates.append(Path(__file__).resolve().parents[2].parent / "shared" / "data" / name)
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise QuantkitError(f"data file {name!r} not found; tried {tried} (set QUANTKIT_DATA to its folder)")


def _cpu_name() -> str:
    """CPU model for the record ("x86_64" alone says little); /proc/cpuinfo where there is one."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def write_metrics(out_dir: Path, metrics: dict) -> Path:
    """Write `zoo_metrics.json` next to the weights, with the machine and date that measured it."""
    record = dict(metrics)
    record.setdefault("machine", f"{_cpu_name()}, {os.cpu_count()} cores")
    record.setdefault("date", time.strftime("%Y-%m-%d"))
    record.setdefault("torch", torch.__version__)
    record.setdefault("threads", torch.get_num_threads())
    path = out_dir / METRICS_FILE
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    log.info("wrote %s", path)
    return path


def read_metrics(model_dir: Path) -> dict:
    """Read the recorded full-precision metrics of a zoo model folder."""
    return json.loads((model_dir / METRICS_FILE).read_text())


@contextmanager
def timed(label: str, into: dict) -> Iterator[None]:
    """Record wall-clock seconds of the block under `into[label]`."""
    start = time.perf_counter()
    yield
    into[label] = round(time.perf_counter() - start, 1)


def cosine_lr(step: int, total: int, warmup: int, peak: float, floor_ratio: float = 0.1) -> float:
    """Linear warmup then cosine decay to `floor_ratio * peak`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + np.cos(np.pi * min(1.0, progress))))
