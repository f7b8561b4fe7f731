"""Packed kernel layout, tile / split-K / large-M rules, per-GPU tuning tables, load-time fallback report."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from quantkit.formats import FormatSpec, QuantizedWeight
from quantkit.kernels import tuning
from quantkit.kernels.configs import GEMV_MAX_M, TileConfig, packed_split_k, packed_tile
from quantkit.kernels.prepare import cuda_fallbacks
from quantkit.kernels.repack import (RB, chunk_shifts, codes_per_word, pack_words, repack, repack_problem,
                                     unpack_words)
from quantkit.nn import QuantConv2d, QuantLinear


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("k", [1, 37, 128, 203, 512])
def test_pack_words_round_trips(bits: int, k: int) -> None:
    codes = torch.randint(0, 1 << bits, (2, 5, k), dtype=torch.uint8)
    words = pack_words(codes, bits)
    kb = codes_per_word(bits) * RB
    assert words.dtype == torch.int32 and words.shape == (2, -(-k // kb) * RB, 5)
    assert torch.equal(unpack_words(words, bits, k), codes)


@pytest.mark.parametrize("bits,per_word", [(2, 16), (3, 10), (4, 8), (5, 6), (6, 4), (7, 4), (8, 4)])
def test_no_code_straddles_a_half_word(bits: int, per_word: int) -> None:
    """The GEMV decodes a code where it sits in its 16-bit half; 2/4/8 bits keep q_j = j * bits."""
    shifts = chunk_shifts(bits)
    assert codes_per_word(bits) == per_word == len(shifts)
    assert all(q // 16 == (q + bits - 1) // 16 for q in shifts)
    if 16 % bits == 0:
        assert shifts == [j * bits for j in range(per_word)]


def test_chunk_j_of_a_block_is_contiguous_k() -> None:
    """Word row r, bits [4j, 4j+4) hold k = j*RB + r: shifting a tile by 4j gives RB contiguous k."""
    k = 128
    codes = (torch.arange(k) % 16).to(torch.uint8).reshape(1, 1, k)
    words = pack_words(codes, 4)[0, :, 0].to(torch.int64) & 0xFFFFFFFF  # [RB]
    for j in range(8):
        chunk = (words >> (4 * j)) & 15
        assert torch.equal(chunk, (torch.arange(j * RB, (j + 1) * RB) % 16))


def test_repack_layout_of_scales_and_zeros() -> None:
    spec = FormatSpec(bits=4, symmetric=False, granularity="group", group_size=32)
    qw = QuantizedWeight.quantize(torch.randn(6, 96), spec)
    kw = repack(qw)
    assert kw.scale.shape == (1, 3, 6) and kw.scale.is_contiguous()
    assert torch.equal(kw.scale[0], qw.scale.T) and torch.equal(kw.zero[0], qw.zero.T)
    mx = repack(QuantizedWeight.quantize(torch.randn(6, 64), FormatSpec.mxfp4()))
    assert mx.scale.dtype == torch.float32 and mx.group == 32


@pytest.mark.parametrize("spec,why", [
    (FormatSpec(bits=4, granularity="group", group_size=40), "not a multiple of 16"),
    (FormatSpec(kind="fp8", bits=8), "fp8"),
])
def test_what_cannot_be_repacked_says_why(spec: FormatSpec, why: str) -> None:
    qw = QuantizedWeight.quantize(torch.randn(4, 160), spec)
    assert why in repack_problem(qw)
    with pytest.raises(ValueError, match="cannot repack"):
        repack(qw)


def test_tile_rule_gemv_then_mma() -> None:
    assert packed_tile(1).block_m == 1 and packed_tile(GEMV_MAX_M).block_m < 16
    assert packed_tile(GEMV_MAX_M + 1).block_m == 16
    assert packed_tile(1, bits=2).block_m == 16  # every 2-bit GEMV tile spills
    assert packed_tile(1, is_mx=True).block_m == 1 and packed_tile(2, is_mx=True).block_m == 16
    assert packed_tile(4096).block_m >= 64


def test_split_k_fills_the_gpu_with_the_chosen_tile() -> None:
    # 8192 x 8192 int4 at M = 1 on 132 SMs: 16 N tiles of 512 -> split so that >= 264 CTAs pull the weight
    tile = packed_tile(1)
    split = packed_split_k(1, 8192, 8192 // 128, 132, tile)
    assert split * (8192 // tile.block_n) >= 2 * 132
    assert packed_split_k(1, 8192, 8192 // 128, 132, TileConfig(1, 256, 0)) < split  # a narrower tile needs less
    assert packed_split_k(4096, 8192, 64, 132, packed_tile(4096)) == 1  # large M has enough tiles
    assert packed_split_k(1, 64, 3, 132, tile) == 1  # at least 2 pack blocks per slice


def test_tuning_table_round_trip(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTKIT_TUNING_DIR", str(tmp_path))
    tuning.load_table.cache_clear()
    assert tuning.crossover_m("NVIDIA H100 80GB HBM3", "int4-g128") == (tuning.DEFAULT_CROSSOVER_M, False)
    path = tuning.save_table("NVIDIA H100 80GB HBM3", {"crossover": {"int4-g128": 768}})
    assert path.name == "NVIDIA_H100_80GB_HBM3.json"
    assert tuning.crossover_m("NVIDIA H100 80GB HBM3", "int4-g128") == (768, True)
    (tmp_path / "Broken.json").write_text("{not json")
    assert tuning.load_table("Broken") == {}
    tuning.load_table.cache_clear()


def test_shipped_tuning_table_serves_until_the_user_tunes(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The H200 table measured on 2026-12-04 ships with the package; a user's own --tune file replaces it."""
    monkeypatch.setenv("QUANTKIT_TUNING_DIR", str(tmp_path))
    tuning.load_table.cache_clear()
    shipped = json.loads((tuning.SHIPPED_DIR / "NVIDIA_H200.json").read_text())
    assert tuning.crossover_m("NVIDIA H200", "int4-g128") == (shipped["crossover"]["int4-g128"], True)
    assert tuning.crossover_m("NVIDIA H200", "int8-g128") == (tuning.DEFAULT_CROSSOVER_M, False)  # not measured
    tuning.save_table("NVIDIA H200", {"crossover": {"int4-g128": 4096}})
    assert tuning.crossover_m("NVIDIA H200", "int4-g128") == (4096, True)
    tuning.load_table.cache_clear()


def test_moe_tile_from_the_tuning_table(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fused MoE layer takes the table's tile for its format, experts, shapes and pairs per expert; the
    bucket is per expert, so 8 experts x 2 slots at 64 tokens (16 pairs each) share the 16 bucket."""
    monkeypatch.setenv("QUANTKIT_TUNING_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_gpu_name", lambda device: "GPU X")
    spec = FormatSpec(bits=4, granularity="group", group_size=32)
    gu = repack(QuantizedWeight.quantize(torch.randn(8, 128, 64), spec))
    dn = repack(QuantizedWeight.quantize(torch.randn(8, 64, 64), spec))
    tuning.load_table.cache_clear()
    assert tuning.tuned_moe_tile(None, gu, dn, 128) is None
    key = tuning.moe_tile_key("int4-g32", 8, (128, 64), (64, 64), 120)
    assert key == "int4-g32|E8|128x64|64x64|16"
    tuning.save_table("GPU X", {"moe_tiles": {key: [32, 128, 4, 3]}})
    assert tuning.tuned_moe_tile(None, gu, dn, 128) == TileConfig(32, 128, 0, 4, 3)
    assert tuning.tuned_moe_tile(None, gu, dn, 8 * 40) is None  # 40 pairs per expert: another bucket
    tuning.load_table.cache_clear()


def test_tile_keys_bucket_m() -> None:
    assert tuning.tile_key("int4-g128", 8192, 8192, 3) == "int4-g128|8192|8192|4"
    assert tuning.format_key(4, 0, False) == "int4-channel" and tuning.format_key(4, 32, True) == "mxfp4"


def test_load_report_names_every_fallback_layer(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """A 3x3 convolution and an fp8 weight have no kernel: named with their reasons; the int4 linear is not."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # device aside: the reasons must be about the layers
    model = nn.Sequential(
        QuantLinear.from_linear(nn.Linear(64, 32).half(), FormatSpec(bits=4, granularity="group", group_size=32)),
        QuantLinear.from_linear(nn.Linear(32, 32).half(), FormatSpec(kind="fp8", bits=8)),
        QuantConv2d.from_conv(nn.Conv2d(4, 8, 3).half(), FormatSpec(bits=4, granularity="channel")),
        QuantConv2d.from_conv(nn.Conv2d(4, 8, 1).half(), FormatSpec(bits=4, granularity="channel")),
    )
    found = cuda_fallbacks(model)
    assert set(found) == {"1", "2"}
    assert "fp8" in found["1"] and "3x3 convolution" in found["2"]
    from quantkit.kernels.prepare import prepare_for_cuda

    with caplog.at_level(logging.WARNING, logger="quantkit.kernels.prepare"):
        prepare_for_cuda(model)
    assert any("dequantize then matmul" in r.message and "fp8" in r.message and ": 1" in r.message
               for r in caplog.records)


def test_dense_cache_only_on_cpu() -> None:
    qw = QuantizedWeight.quantize(torch.randn(8, 64), FormatSpec(bits=4, granularity="channel"))
    qw.cache = {}
    qw.dequantize(torch.float16)
    assert "dense" in qw.cache  # CPU: kept
    meta = QuantizedWeight(qw.packed.to("meta"), qw.scale.to("meta"), None, qw.shape, qw.spec, {})
    meta.dequantize(torch.float16)
    assert "dense" not in meta.cache  # any other device: never kept
