"""quantize under torchrun (2 ranks, gloo): the checkpoint equals the single-process one bit for bit, for
independent blocks (RTN) and for a calibrated MoE method whose experts are split across the ranks (EAQuant)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import cli
from test_streaming import comparable, make_unet, same_bits, tensors

HERE = Path(__file__).parent


def make_moe8(out: Path) -> Path:
    """A bf16 OLMoE with 8 experts per block, sharded as the hub does."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    cfg = OlmoeConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                      max_position_embeddings=128, tie_word_embeddings=False, eos_token_id=1, pad_token_id=0)
    OlmoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, max_shard_size="200KB")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    # one thread per process: a matmul's reduction order may depend on the thread count, so the single-process
    # reference of a calibrated run uses the ranks' count
    # (no empty entry: it would put the working directory, the repository root, on sys.path)
    path = [str(HERE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path),
            "OMP_NUM_THREADS": "1", **extra}


def torchrun(*args: str, entry: list[str] | None = None, **extra: str) -> subprocess.CompletedProcess:
    env = _env(**extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), *(entry or ["-m", "quantkit.cli"]), "quantize", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def moe8(tmp_path_factory) -> Path:
    return make_moe8(tmp_path_factory.mktemp("src") / "moe8")


@pytest.fixture(scope="module")
def unet(tmp_path_factory) -> Path:
    return make_unet(tmp_path_factory.mktemp("src") / "unet")


def _equal(a_dir: Path, b_dir: Path) -> None:
    a, ma = tensors(a_dir)
    b, mb = tensors(b_dir)
    assert a and not same_bits(a, b)
    assert comparable(ma) == comparable(mb)


@pytest.mark.parametrize("which,flags,share", [("moe8", ["--stream"], 2), ("unet", ["--no-stream"], 7)])
def test_two_ranks_equal_one_process(which, flags, share, moe8, unet, tmp_path):
    src = moe8 if which == "moe8" else unet
    args = [src, "--method", "rtn", "--wbits", "4", "--group-size", "32", *flags]
    r = cli("quantize", *args, "--out", tmp_path / "one")
    assert r.exit_code == 0, r.output
    p = torchrun(*args, "--out", tmp_path / "two")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 ranks" in p.stdout and f"rank 0: {share} blocks quantized" in p.stdout  # half the units
    # rank 0's writing pass reuses every unit: one summary line, not a "killed run" warning per block
    assert f"took {2 * share} blocks from the ranks' shares" in p.stdout
    assert "finished by an earlier run" not in p.stdout + p.stderr
    _equal(tmp_path / "one", tmp_path / "two")
    assert not list(tmp_path.glob(".two.*"))  # progress folder and lock gone


def test_killed_rank_resumes_and_equals(moe8, tmp_path):
    args = [moe8, "--method", "rtn", "--wbits", "4", "--group-size", "32", "--stream"]
    assert cli("quantize", *args, "--out", tmp_path / "one").exit_code == 0
    p = torchrun(*args, "--out", tmp_path / "two", entry=[str(HERE / "dist_kill_entry.py")])
    assert p.returncode != 0
    assert not (tmp_path / "two").exists()  # nothing half-written in place
    kept = sorted(f.name for f in (tmp_path / ".two.progress" / "walk").glob("*.json") if f.name != "run.json")
    assert "00001.json" in kept and "00003.json" not in kept  # rank 1 finished unit 1, died at unit 3
    mine = len([k for k in kept if k in ("00000.json", "00002.json")])  # rank 0's, as far as it got
    p = torchrun(*args, "--out", tmp_path / "two")
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"rank 0: {2 - mine} blocks quantized, {mine} reused" in p.stdout  # finished blocks are not redone
    _equal(tmp_path / "one", tmp_path / "two")


def one_process(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "quantkit.cli", "quantize", *map(str, args)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def eaquant(tmp_path_factory) -> list:
    """EAQuant W4A4 as eaquant-w4a4-fast (smoothing over the router and every expert, router alignment, "more
    data" balance, rotations), made small for CI: 4 calibration windows of 32 tokens, 8 rotation steps. Each MoE
    layer's 8 experts split 4 + 4 across the ranks."""
    import json

    from quantkit.config import Recipe

    rec = Recipe.load("eaquant-w4a4-fast").to_dict()
    rec["calib_size"] = 4
    rec["method_options"] = {**rec["method_options"], "steps": 8, "calib_seq_len": 32}
    path = tmp_path_factory.mktemp("recipe") / "eaquant-small.yaml"
    path.write_text(json.dumps(rec))  # (JSON is YAML)
    return ["--recipe", path]


@pytest.mark.parametrize("flags", [["--no-stream"], ["--stream"]])
def test_eaquant_experts_split_across_ranks_equal_one_process(flags, moe8, eaquant, tmp_path):
    args = [moe8, *eaquant, *flags]
    r = one_process(*args, "--out", tmp_path / "one")
    assert r.returncode == 0, r.stdout + r.stderr
    # (the quantize command, with rank 1 recording which experts it quantized itself)
    p = torchrun(*args, "--out", tmp_path / "two", entry=[str(HERE / "dist_share_entry.py")])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 ranks" in p.stdout and "every rank walks the calibrated blocks" in p.stdout
    assert "rank 1 quantized experts [1, 3, 5, 7] of every layer (4 layers)" in p.stdout  # its half, no more
    if "--stream" in flags:  # and it read only those experts' weights (gate_up and down of 4 layers) ...
        assert "rank 1 read experts [1, 3, 5, 7] of every fused experts tensor (8 tensors)" in p.stdout, p.stdout
        # ... and never held the other rank's quantized experts: each rank wrote its rows into the checkpoint
        assert "rank 1 gathered the experts of 0 layers" in p.stdout, p.stdout
    else:  # whole blocks: every rank gathers every layer's quantized experts
        assert "rank 1 gathered the experts of 4 layers" in p.stdout, p.stdout
    _equal(tmp_path / "one", tmp_path / "two")  # smoothing folded into the norms, router alignment, experts
    assert not list(tmp_path.glob(".two.*"))


@pytest.mark.parametrize("flags", [["--no-stream"], ["--stream"]])  # (streamed: each rank kept its experts' rows)
def test_killed_rank_of_a_calibrated_run_resumes_and_equals(flags, moe8, eaquant, tmp_path):
    args = [moe8, *eaquant, *flags]
    r = one_process(*args, "--out", tmp_path / "one")
    assert r.returncode == 0, r.stdout + r.stderr
    p = torchrun(*args, "--out", tmp_path / "two", entry=[str(HERE / "dist_kill_entry.py")],
                 QK_KILL_METHOD="eaquant", QK_KILL_AT="2")
    assert p.returncode != 0
    assert not (tmp_path / "two").exists()  # nothing half-written in place
    kept = sorted(f.name for f in (tmp_path / ".two.progress" / "walk").glob("*.json") if f.name != "run.json")
    # rank 0 kept block 0 before the ranks met in block 1; block 2 (where rank 1 died) was never finished
    assert "00000.json" in kept and "00002.json" not in kept and "00003.json" not in kept
    rows = sorted(f.name for f in (tmp_path / ".two.progress" / "walk").glob("*.rows-*"))
    if "--stream" in flags:  # both ranks' rows of blocks 0 and 1; rank 0's of block 2 maybe (rank 1 died first)
        assert rows[:4] == ["00000.rows-0.safetensors", "00000.rows-1.safetensors", "00001.rows-0.safetensors",
                            "00001.rows-1.safetensors"] and "00002.rows-1.safetensors" not in rows, rows
    else:
        assert not rows
    p = torchrun(*args, "--out", tmp_path / "two")
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"({len(kept)} blocks reused from a killed run)" in " ".join(p.stdout.split())
    _equal(tmp_path / "one", tmp_path / "two")


STATIC_W8A8 = HERE.parent / "bench" / "recipes" / "rtn-static-w8a8.yaml"  # RTN with static activation ranges


@pytest.mark.parametrize("which,flags", [("moe8", ["--stream"]), ("unet", ["--no-stream"])])
def test_static_ranges_with_calls_split_across_ranks_equal_one_process(which, flags, moe8, unet, tmp_path):
    src = moe8 if which == "moe8" else unet
    args = [src, "--recipe", STATIC_W8A8, "--calib-size", "4", *flags]
    r = one_process(*args, "--out", tmp_path / "one")
    assert r.returncode == 0, r.stdout + r.stderr
    p = torchrun(*args, "--out", tmp_path / "two")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "share of the calibration calls" in " ".join(p.stdout.split())
    _equal(tmp_path / "one", tmp_path / "two")  # the static scales and zero points included


def test_calibrated_method_without_a_split_is_refused_in_one_line(moe8, tmp_path):
    p = torchrun(moe8, "--method", "flexround", "--out", tmp_path / "two")
    assert p.returncode != 0
    assert "has no expert or data split, so it does not run across ranks" in " ".join((p.stdout + p.stderr).split())
    assert "Traceback" not in p.stdout
    assert not (tmp_path / "two").exists()
