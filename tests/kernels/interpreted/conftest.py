"""Kernel tests under Triton's CPU interpreter.

TRITON_INTERPRET=1 must be set before triton is imported, so these files are collected only in a
pytest process started with it (tests/kernels/test_interpreter.py starts one); a plain `pytest`
run skips them here.
"""
from __future__ import annotations

import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED:
    collect_ignore_glob = ["test_*.py"]

_real_empty = torch.empty


def _poisoned_empty(*args, **kwargs) -> torch.Tensor:
    t = _real_empty(*args, **kwargs)
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        t.fill_(99)  # outside every value range the kernels write (|q| <= 12 for mxfp4, codes checked exactly)
    return t


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer a launcher allocates starts as NaN / 99, so an element a kernel forgets shows."""
    monkeypatch.setattr(torch, "empty", _poisoned_empty)


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)
