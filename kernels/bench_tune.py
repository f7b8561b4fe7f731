"""GPU tuning of the packed kernels (`quantkit bench kernels --tune`): best tile per (format, N, K, M bucket),
the large-M crossover per format, and the fused MoE's tile per (format, experts, shapes, pairs per expert),
written to this GPU's table (kernels/tuning.py)."""
from __future__ import annotations

from pathlib import Path

import torch

from quantkit.kernels.bench_cases import LINEAR_SHAPES, MOE_SHAPES
from quantkit.kernels.tuning import M_TUNE_BUCKETS, format_key, load_table, moe_tile_key, save_table, tile_key

MOE_TUNE_TOKENS = (1, 4, 16, 64, 256, 1024, 4096)  # tokens per call; pairs per expert = tokens * top_k / E

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
        save_table(name, table)  # after each format, so a run cut short keeps what it measured
    table.update(tiles=tiles, crossover=crossover, moe_tiles=tune_moe(dtype, flush, reps, table.get("moe_tiles", {})))
    return save_table(name, table)


def tune_moe(dtype: torch.dtype, flush: torch.Tensor, reps: int, known: dict) -> dict:
    """Best fused-MoE tile per (format, experts, shapes, pairs-per-expert bucket) over packed_moe_candidates,
    W4A16 g128 on the benchmark's MoE shapes (SwiGLU experts, so 16-row tiles include the fused epilogue)."""
    import torch.nn.functional as F

    from quantkit.formats import QuantizedWeight
    from quantkit.kernels.bench_timing import time_graph
    from quantkit.kernels.packed_moe import packed_moe_candidates, qexperts_packed
    from quantkit.kernels.repack import repack

    dev = torch.device("cuda")
    tiles = dict(known)
    spec = _spec("int4", 128)
    for _, e, top_k, h, inter in MOE_SHAPES:
        gu = repack(QuantizedWeight.quantize(torch.randn(e, 2 * inter, h, device=dev, dtype=dtype) / h ** 0.5, spec))
        dn = repack(QuantizedWeight.quantize(torch.randn(e, h, inter, device=dev, dtype=dtype) / inter ** 0.5, spec))
        fmt = format_key(gu.bits, gu.group, gu.is_mx)
        for t in MOE_TUNE_TOKENS:
            x = torch.randn(t, h, device=dev, dtype=dtype)
            idx = torch.stack([torch.randperm(e, device=dev)[:top_k] for _ in range(t)])
            wts = torch.rand(t, top_k, device=dev).softmax(-1)
            best = None
            for tile in packed_moe_candidates(t * top_k, e):
                try:
                    us = time_graph(lambda: qexperts_packed(x, idx, wts, gu, dn, F.silu, config=tile), flush,
                                    reps=reps).median_us
                except Exception as err:  # a tile that does not compile or fit is skipped, loudly
                    print(f"  moe {fmt} E{e} T={t} tile {tile}: {type(err).__name__}: {err}")
                    continue
                if best is None or us < best[0]:
                    best = (us, tile)
            if best is not None:
                tile = best[1]
                tiles[moe_tile_key(fmt, e, (gu.n, gu.k), (dn.n, dn.k), t * top_k)] = [
                    tile.block_m, tile.block_n, tile.num_warps, tile.num_stages]
                print(f"  moe {fmt} E{e} top-{top_k} T={t}: best {tile} {best[0]:.1f} us")
    return tiles
