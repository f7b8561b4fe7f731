"""The reusable source-check API (quantkit/source_check.py) on hand-made files."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from quantkit.errors import QuantkitError
from quantkit.source_check import TensorInfo, check_finite, check_tensors, read_header


@pytest.fixture
def shard(tmp_path):
    f = tmp_path / "a.safetensors"
    save_file({"w": torch.zeros(4, 3), "b": torch.zeros(4)}, str(f))
    return f


def test_header_only(shard):
    assert read_header(shard) == {"w": TensorInfo((4, 3), "F32"), "b": TensorInfo((4,), "F32")}


def test_expected_tensors(shard):
    ok = {"w": TensorInfo((4, 3), "torch.float32"), "b": TensorInfo((4,), "torch.bfloat16")}
    check_tensors([shard], ok)
    with pytest.raises(QuantkitError, match="tensor c \\[2\\] is missing"):
        check_tensors([shard], {**ok, "c": TensorInfo((2,), "torch.float32")})
    check_tensors([shard], {**ok, "c": TensorInfo((2,), "torch.float32")}, optional=["c"])
    check_tensors([shard], {**ok, "c": TensorInfo((2,), "torch.float32")}, ignore_missing=[r"^c$"])
    with pytest.raises(QuantkitError, match="tensor w has shape \\[4, 3\\] in a.safetensors, the config needs \\[3, 4\\]"):
        check_tensors([shard], {**ok, "w": TensorInfo((3, 4), "torch.float32")})
    with pytest.raises(QuantkitError, match="tensor b in a.safetensors is not a parameter"):
        check_tensors([shard], {"w": ok["w"]})
    check_tensors([shard], {"w": ok["w"]}, ignore_unexpected=[r"^b$"])


def test_finite():
    check_finite([("a", torch.ones(3))])
    with pytest.raises(QuantkitError, match="weight x contains NaN"):
        check_finite([("a", torch.ones(3)), ("x", torch.tensor([1.0, float("nan")]))])
