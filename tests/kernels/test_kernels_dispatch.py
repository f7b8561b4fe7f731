"""Dispatch, references and configuration rules of quantkit.kernels (no triton needed)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from quantkit import kernels
from quantkit.formats import FormatSpec, QuantizedWeight
from quantkit.kernels.aq_rules import max_block_k
from quantkit.kernels.configs import choose_split_k, m_bucket
from quantkit.kernels.dispatch import choose_experts_kernel, choose_linear_kernel
from quantkit.kernels.reference import qlinear_reference
from quantkit.kernels.reference_act import aq_matmul_reference, quantize_act_reference
from quantkit.quantizers.activation import ActQuantizer

G128 = FormatSpec(bits=4, granularity="group", group_size=128)


def _qw(spec: FormatSpec = G128, shape: tuple[int, ...] = (32, 256)) -> QuantizedWeight:
    return QuantizedWeight.quantize(torch.randn(*shape), spec)


def test_import_touches_neither_triton_nor_cuda() -> None:
    code = ("import sys, torch, quantkit, quantkit.kernels, quantkit.kernels.bench; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not torch.cuda.is_initialized(), 'cuda initialised'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_cpu_tensors_use_the_reference() -> None:
    x = torch.randn(4, 256, dtype=torch.float16)
    qw = _qw()
    assert kernels.resolve_backend(x, qw, None) == "reference"
    assert torch.equal(kernels.qlinear(x, qw), qlinear_reference(x, qw))
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.qlinear(x, qw, backend="cuda")


@pytest.mark.parametrize("what,x,qw,act,rotation", [
    ("float16/bfloat16", torch.randn(2, 256), _qw(), None, None),
    ("fp8", torch.randn(2, 256).half(), _qw(FormatSpec(kind="fp8", bits=8)), None, None),
    ("not an ActQuantizer", torch.randn(2, 256).half(), _qw(), torch.relu, None),
    ("asymmetric activations", torch.randn(2, 256).half(), _qw(), ActQuantizer(FormatSpec(bits=8, symmetric=False)), None),
    ("global reduction", torch.randn(2, 256).half(), _qw(), ActQuantizer(FormatSpec(bits=8, granularity="tensor")), None),
    ("mxfp4 activations only", torch.randn(2, 256).half(), _qw(), ActQuantizer(FormatSpec(bits=8)), torch.eye(32)),
    ("with mxfp4 weights", torch.randn(2, 256).half(), _qw(), ActQuantizer(FormatSpec.mxfp4()), None),
    ("do not fit the int8 dot", torch.randn(2, 256).half(), _qw(FormatSpec(bits=8, symmetric=False)),
     ActQuantizer(FormatSpec(bits=8)), None),
])
def test_uncovered_cases_say_why(what, x, qw, act, rotation, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # device aside: the reason must be about the case
    choice = choose_linear_kernel(x, qw, act, rotation)
    assert choice.kernel is None and what in choice.reason
    with pytest.raises(ValueError, match="no Triton kernel"):
        kernels.resolve_backend(x, qw, act, "triton", rotation)


@pytest.mark.parametrize("act,kernel", [
    (None, "wo_gemm"), (ActQuantizer(FormatSpec(bits=8)), "aq_gemm"),
    (ActQuantizer(FormatSpec(bits=4, granularity="group", group_size=64)), "aq_gemm"),
])
def test_covered_cases(act, kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_linear_kernel(torch.randn(2, 256).half(), _qw(), act).kernel == kernel
    mx = _qw(FormatSpec.mxfp4())
    assert choose_linear_kernel(torch.randn(2, 256).half(), mx, ActQuantizer(FormatSpec.mxfp4()),
                                torch.eye(32)).kernel == "aq_gemm"


def test_cpu_without_interpreter_is_not_covered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    choice = choose_linear_kernel(torch.randn(2, 256).half(), _qw(), None)
    assert choice.kernel is None and "CPU" in choice.reason


def test_experts_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gu, dn = _qw(shape=(4, 64, 256)), _qw(shape=(4, 256, 128))
    h = torch.randn(3, 256).half()
    assert choose_experts_kernel(h, gu, dn, None, None).kernel == "moe_gemm"
    act = ActQuantizer(FormatSpec(bits=8))
    assert "weight-only" in choose_experts_kernel(h, gu, dn, act, None).reason
    assert kernels.resolve_experts_backend(h, gu, dn) == "reference"  # auto on CPU


def test_rules() -> None:
    assert [m_bucket(m) for m in (1, 2, 16, 17, 200, 5000)] == [1, 16, 16, 64, 256, 1024]
    assert choose_split_k(1, 4096, 4096, 132) > 1
    assert choose_split_k(1024, 4096, 4096, 132) == 1
    assert choose_split_k(1, 4096, 256, 132) == 1  # too short a K to split
    assert (max_block_k(0, 0), max_block_k(0, 32), max_block_k(64, 128), max_block_k(48, 0)) == (128, 32, 64, 16)


@pytest.mark.parametrize("spec", [FormatSpec(bits=8), FormatSpec(bits=4, granularity="group", group_size=32),
                                  FormatSpec.mxfp4()], ids=lambda s: s.short)
def test_act_reference_is_the_act_quantizer(spec: FormatSpec) -> None:
    x = torch.randn(5, 128, dtype=torch.float16)
    q, scale = quantize_act_reference(x, spec)
    x_hat = q.float() * scale.repeat_interleave(128 // scale.shape[-1], dim=-1)
    assert torch.equal(x_hat.to(x.dtype), ActQuantizer(spec)(x))


def test_integer_gemm_reference_is_the_fake_quant_linear() -> None:
    x = torch.randn(5, 128)
    qw = _qw(FormatSpec(bits=8), (16, 128))
    act = ActQuantizer(FormatSpec(bits=8))
    q, scale = quantize_act_reference(x, act.spec)
    y = aq_matmul_reference(q, scale, qw, None, torch.float64)
    assert torch.allclose(y.float(), qlinear_reference(x, qw, None, act), rtol=1e-4, atol=1e-4)


def test_bench_refuses_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, "-m", "quantkit.kernels.bench"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "no CUDA GPU" in proc.stderr
