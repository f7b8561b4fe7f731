"""Runs that are cut short: Ctrl-C, SIGINT, SIGKILL mid-run, two runs on one --out. After each, the
output folder is absent (never half-written) and a rerun resumes the finished blocks."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import quantkit.methods.eda_dm as eda_dm
from helpers import cli

# EDA-DM on the tiny UNet (14 blocks), as cheap as reconstruction gets.
RECIPE = """method: eda-dm
weight: {kind: int, bits: 4, symmetric: false}
activation: {kind: int, bits: 8, symmetric: false, granularity: tensor, dynamic: false}
calib_size: 2
method_options: {iters: ITERS, batch_size: 2, weight_init: minmax, act_init: minmax}
"""
REUSED = "finished by an earlier run"


def recipe(tmp: Path, iters: int) -> Path:
    p = tmp / f"eda-{iters}.yaml"
    p.write_text(RECIPE.replace("ITERS", str(iters)))
    return p


def payload_hashes(ckpt: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(ckpt.rglob("*.safetensors"))}


def reused_blocks(caplog) -> list[str]:
    return [r.getMessage().split()[1].rstrip(":") for r in caplog.records if REUSED in r.getMessage()]


def test_unet_kill_and_resume_skips_every_finished_block(tmp_path, monkeypatch, caplog):
    r = recipe(tmp_path, 1)
    out = tmp_path / "q"
    real = eda_dm.reconstruct_block
    done: list[str] = []

    def dying(name, *a, **k):
        if len(done) == 8 and dying.kill:  # past mid_block.resnets.0 / .1, which once shared a progress file
            raise KeyboardInterrupt
        done.append(name)
        return real(name, *a, **k)

    dying.kill = True
    monkeypatch.setattr(eda_dm, "reconstruct_block", dying)
    res = cli("quantize", "zoo:tiny-unet", "--recipe", r, "--out", out)
    assert res.exit_code == 130 and "interrupted" in res.output, res.output
    assert not out.exists()
    progress = tmp_path / ".q.progress"
    assert sorted(json.loads(p.read_text())["block"] for p in progress.glob("*.json")) == sorted(done)
    assert {"mid_block.resnets.0", "mid_block.resnets.1"} <= set(done)

    finished, done[:] = list(done), []
    dying.kill = False
    caplog.set_level(logging.WARNING)
    res = cli("quantize", "zoo:tiny-unet", "--recipe", r, "--out", out)
    assert res.exit_code == 0, res.output
    assert sorted(reused_blocks(caplog)) == sorted(finished)  # the log names every reused block
    assert not set(done) & set(finished) and len(done) == 14 - len(finished)
    assert f"({len(finished)} blocks reused from a killed run)" in " ".join(res.output.split())  # rich wraps
    assert not progress.exists()

    fresh = tmp_path / "fresh"
    assert cli("quantize", "zoo:tiny-unet", "--recipe", r, "--out", fresh, "--no-resume").exit_code == 0
    assert payload_hashes(out) == payload_hashes(fresh)  # resuming changes nothing in the result


def _start(args: list, tmp: Path, sig_env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(sig_env or {})}
    # SIGINT as a terminal delivers it: a test suite started in the background by a non-interactive shell
    # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt in the child.
    return subprocess.Popen([sys.executable, "-m", "quantkit.cli", "quantize", *map(str, args)], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.returncode} {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail("the run made no progress")
        time.sleep(0.05)


def test_concurrent_run_then_sigkill_then_resume(tmp_path, caplog):
    r = recipe(tmp_path, 20)
    out = tmp_path / "q"
    progress = tmp_path / ".q.progress"
    proc = _start(["zoo:tiny-unet", "--recipe", r, "--out", out], tmp_path)
    try:
        _wait_for(lambda: len(list(progress.glob("*.json"))) >= 1, proc)
        # a second run on the same --out is refused while the first holds the lock
        second = cli("quantize", "zoo:tiny-unet", "--recipe", r, "--out", out)
        assert second.exit_code != 0 and "another quantkit run is writing" in second.output, second.output
        _wait_for(lambda: len(list(progress.glob("*.json"))) >= 3, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert not out.exists()  # killed before the atomic rename: nothing that looks valid
    finished = {json.loads(p.read_text())["block"] for p in progress.glob("*.json")}
    caplog.set_level(logging.WARNING)
    res = cli("quantize", "zoo:tiny-unet", "--recipe", r, "--out", out)  # the dead run's lock is gone with it
    assert res.exit_code == 0, res.output
    assert set(reused_blocks(caplog)) == finished and len(finished) >= 3
    assert (out / "quantization.json").exists()


def test_sigint_leaves_nothing_and_exits_130(tmp_path):
    r = recipe(tmp_path, 20)
    out = tmp_path / "q"
    progress = tmp_path / ".q.progress"
    proc = _start(["zoo:tiny-unet", "--recipe", r, "--out", out], tmp_path)
    try:
        _wait_for(lambda: len(list(progress.glob("*.json"))) >= 1, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".q.tmp-*"))
    assert not (tmp_path / ".q.lock").exists()
