"""Machine-code budget of the shipped W4A16 kernels, compiled ahead of time for sm_90a (bench/sass.py's proxy).

Skips where triton's wheel has no ptxas/cuobjdump, or in an interpreted process (no compiler there).
"""
from __future__ import annotations

import importlib.util
import os

import pytest

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="ahead-of-time compilation needs the compiler"),
]

BYTE_LOADS = ("LDG.E.U8", "LDG.E.S8", "LDGSTS.E.U8")


@pytest.fixture(scope="module")
def sass():
    from quantkit.kernels import sass as mod

    problem = mod.toolchain_problem()
    if problem:
        pytest.skip(problem)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return mod


def _report(sass, m: int):
    from quantkit.kernels.sass_cases import PACKED_FORMATS, packed_case

    case = packed_case(*PACKED_FORMATS[0], m=m)  # int4, g128, symmetric, fp16 activations, default tile
    assert "int4-g128" in case.name
    return sass.analyze(case.name, case.compile(), case.weights_per_thread)


def test_w4a16_mma_main_loop_within_4_instructions_per_weight(sass) -> None:
    r = _report(sass, 16)
    assert r.loop_ops.get("HMMA.16816.F32", 0) > 0, "not the MMA main loop"
    assert r.per_weight <= 4.0, r.as_dict()
    assert r.spill_bytes == 0
    assert not any(op.startswith(BYTE_LOADS) for op in r.loop_ops), r.weight_loads
    assert any(op.endswith(".128") for op in r.weight_loads), r.weight_loads  # 16-byte weight loads


def test_w4a16_gemv_main_loop_within_4_instructions_per_weight(sass) -> None:
    r = _report(sass, 1)
    assert r.per_weight <= 4.0, r.as_dict()
    assert r.spill_bytes == 0
    assert not any(op.startswith(BYTE_LOADS) for op in r.loop_ops), r.weight_loads
    assert any(op.endswith(".128") for op in r.weight_loads), r.weight_loads
    assert "HMMA.16816.F32" not in r.loop_ops  # the GEMV path does not use the MMA


@pytest.mark.parametrize("fmt", ["int4-g32-asym", "mxfp4", "int3-g128"])
@pytest.mark.parametrize("m", [2, 64, 256])
def test_large_tiles_of_heavy_decodes_do_not_spill(sass, fmt: str, m: int) -> None:
    """Small groups, MXFP4 and 3-bit (10 chunks a block, a scale per chunk) need the most registers; their
    default large-M tiles must still fit."""
    from quantkit.kernels.sass_cases import PACKED_FORMATS, packed_case

    case = packed_case(*next(f for f in PACKED_FORMATS if f[0] == fmt), m=m)
    r = sass.analyze(case.name, case.compile(), case.weights_per_thread)
    assert r.spill_bytes == 0, r.as_dict()
