"""GPU tuning of the packed kernels (`quantkit bench kernels --tune`): best tile per (format, N, K, M bucket)
and the large-M crossover per format, written to this GPU's table (kernels/tuning.py)."""
from __future__ import annotations

from pathlib import Path

import torch

from quantkit.kernels.bench_cases import LINEAR_SHAPES
from quantkit.kernels.tuning import M_TUNE_BUCKETS, format_key, load_table, save_table, tile_key

TUNE_SPECS = (("int4", 128), ("int4", 0), ("int8", 128), ("mxfp4", 32))


def _spec(kind: str, group: int):
    from quantkit.formats import FormatSpec

    if kind == "mxfp4":
        return FormatSpec.mxfp4()
    bits = int(kind[3:])
    return FormatSpec(bits=bits, granularity="group", group_size=group) if group else FormatSpec(bits=bits, granularity="channel")


def crossover_from(times: dict[int, tuple[float, float]]) -> int | None:
    """Smallest M from which dequantize + cuBLAS beats the packed kernel at every larger measured M.

    times: M -> (packed us, dense us). None if the packed kernel wins at the largest M measured.
    """
    best = None
    for m in sorted(times, reverse=True):
        packed, dense = times[m]
        if dense < packed:
            best = m
        else:
            break
    return best


def tune(dtypes: list[str], reps: int) -> Path:
    from quantkit.formats import QuantizedWeight
    from quantkit.kernels.bench_timing import flush_buffer, time_graph
    from quantkit.kernels.configs import packed_candidates
    from quantkit.kernels.packed_linear import large_m_linear, packed_linear_triton
    from quantkit.kernels.repack import repack

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    table = dict(load_table(name))
    table.update(gpu=name, torch=torch.__version__)
    tiles, crossover = dict(table.get("tiles", {})), dict(table.get("crossover", {}))
    flush = flush_buffer(dev)
    dtype = torch.float16 if "fp16" in dtypes else torch.bfloat16
    for kind, group in TUNE_SPECS:
        spec = _spec(kind, group)
        for n, k in LINEAR_SHAPES:
            kw = repack(QuantizedWeight.quantize(torch.randn(n, k, device=dev, dtype=dtype) / k ** 0.5, spec))
            fmt = format_key(kw.bits, kw.group, kw.is_mx)
            times = {}
            for m in M_TUNE_BUCKETS:
                x = torch.randn(m, k, device=dev, dtype=dtype)
                best = None
                for tile in packed_candidates(m, kw.bits, kw.group, kw.is_mx):
                    try:
                        t = time_graph(lambda: packed_linear_triton(x, kw, config=tile), flush, reps=reps).median_us
                    except Exception as e:  # a tile that does not compile or fit is skipped, loudly
                        print(f"  {fmt} {n}x{k} M={m} tile {tile}: {type(e).__name__}: {e}")
                        continue
                    if best is None or t < best[0]:
                        best = (t, tile)
                if best is None:
                    continue
                tile = best[1]
                tiles[tile_key(fmt, n, k, m)] = [tile.block_m, tile.block_n, tile.num_warps, tile.num_stages, tile.group_m]
                times[m] = (best[0], time_graph(lambda: large_m_linear(x, kw), flush, reps=reps).median_us)
                print(f"  {fmt} {n}x{k} M={m}: best {tile} {best[0]:.1f} us, dequantize+cuBLAS {times[m][1]:.1f} us")
            if (n, k) == LINEAR_SHAPES[0]:
                cross = crossover_from(times)
                crossover[fmt] = cross if cross is not None else 1 << 30  # packed wins everywhere measured
    table.update(tiles=tiles, crossover=crossover)
    return save_table(name, table)
