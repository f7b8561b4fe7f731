"""Per-GPU tuning data of the packed kernels: tiles and the large-M crossover (pure python + json).

One JSON file per GPU model, written by the GPU benchmark (`quantkit.kernels.bench --tune`):

    {"gpu": "NVIDIA H100 80GB HBM3", "triton": "3.9.0",
     "crossover": {"int4-g128": 768, ...},            # M from which dequantize + cuBLAS is faster
     "tiles": {"int4-g128|8192|8192|16": [16, 128, 4, 4, 8], ...},  # fmt|N|K|M bucket -> tile
     "moe_tiles": {"int4-g128|E8|28672x4096|4096x14336|16": [16, 256, 4, 4], ...}}
     # fused MoE: fmt|experts|gate/up NxK|down NxK|pairs-per-expert bucket -> tile of both launches

Files live in $QUANTKIT_TUNING_DIR, else ~/.cache/quantkit/kernels. A GPU with no file there uses the
table shipped in kernels/tuned/ for its model, if one was measured (BENCHMARKS.md, "GPU timings"). Without
an entry the defaults below apply, and they are not measurements.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
from pathlib import Path

from quantkit.kernels.configs import TileConfig

log = logging.getLogger(__name__)

# Above this M, weight-only calls dequantize into a temporary fp16/bf16 weight and call cuBLAS.
# Pending measurement: chosen from the arithmetic intensity where an H100 turns compute-bound
# (~300 flop/byte of fp16 weight), to be replaced by the per-GPU table.
DEFAULT_CROSSOVER_M = 512
M_TUNE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)


SHIPPED_DIR = Path(__file__).parent / "tuned"  # tables measured on a GPU model and shipped with quantkit


def tuning_dir() -> Path:
    return Path(os.environ.get("QUANTKIT_TUNING_DIR", Path.home() / ".cache" / "quantkit" / "kernels"))


def gpu_file_name(gpu_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", gpu_name).strip("_") + ".json"


@functools.cache
def load_table(gpu_name: str) -> dict:
    """The tuning table of a GPU model: the user's own (`--tune`), else the shipped one, else {}.
    A broken file is a warning, then {}."""
    path = tuning_dir() / gpu_file_name(gpu_name)
    if not path.is_file():
        path = SHIPPED_DIR / gpu_file_name(gpu_name)
        if not path.is_file():
            return {}
        log.info("kernel tuning: using the table shipped for %s (%s)", gpu_name, path.name)
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable kernel tuning file %s: %s", path, e)
        return {}
    if not isinstance(table, dict):
        log.warning("ignoring kernel tuning file %s: not a JSON object", path)
        return {}
    return table


def save_table(gpu_name: str, table: dict) -> Path:
    """Write a GPU's table atomically into tuning_dir() (the benchmark's --tune)."""
    folder = tuning_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / gpu_file_name(gpu_name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
    tmp.replace(path)
    load_table.cache_clear()
    return path


def format_key(bits: int, group: int, is_mx: bool) -> str:
    if is_mx:
        return "mxfp4"
    return f"int{bits}-" + (f"g{group}" if group else "channel")


def m_tune_bucket(m: int) -> int:
    return next((b for b in M_TUNE_BUCKETS if m <= b), M_TUNE_BUCKETS[-1])


def tile_key(fmt: str, n: int, k: int, m: int) -> str:
    return f"{fmt}|{n}|{k}|{m_tune_bucket(m)}"


def _gpu_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device)


def tuned_tile(device, kw, m: int) -> TileConfig | None:
    """The measured best tile for this GPU, format, shape and M bucket, if the table has one."""
    row = load_table(_gpu_name(device)).get("tiles", {}).get(
        tile_key(format_key(kw.bits, kw.group, kw.is_mx), kw.n, kw.k, m))
    if not row:
        return None
    bm, bn, warps, stages, group_m = row
    if bm < 16 and bm < m:
        return None  # a GEMV tile cannot take more rows than it has
    return TileConfig(bm, bn, 0, warps, stages, group_m)


def moe_tile_key(fmt: str, experts: int, gate_up_nk: tuple[int, int], down_nk: tuple[int, int],
                 n_pairs: int) -> str:
    """Key of a fused MoE layer's tile: format, experts, both projections' shapes, pairs per expert (bucketed)."""
    per_expert = -(-n_pairs // max(1, experts))
    return (f"{fmt}|E{experts}|{gate_up_nk[0]}x{gate_up_nk[1]}|{down_nk[0]}x{down_nk[1]}|"
            f"{m_tune_bucket(per_expert)}")


def tuned_moe_tile(device, gate_up, down, n_pairs: int) -> TileConfig | None:
    """The measured best tile of a fused MoE layer (kernels/packed_moe.py) on this GPU, if the table has one."""
    key = moe_tile_key(format_key(gate_up.bits, gate_up.group, gate_up.is_mx), gate_up.words.shape[0],
                       (gate_up.n, gate_up.k), (down.n, down.k), n_pairs)
    row = load_table(_gpu_name(device)).get("moe_tiles", {}).get(key)
    if not row:
        return None
    bm, bn, warps, stages = row
    return TileConfig(bm, bn, 0, warps, stages)


def crossover_m(gpu_name: str, fmt: str) -> tuple[int, bool]:
    """(M from which dequantize + cuBLAS serves, whether that number was measured on this GPU)."""
    value = load_table(gpu_name).get("crossover", {}).get(fmt)
    if isinstance(value, int) and value > 0:
        return value, True
    return DEFAULT_CROSSOVER_M, False
