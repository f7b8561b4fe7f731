"""The bad-input catalogue (docs/bad-inputs.md), one case per row: each bad input is refused with a
one- or two-line message that says what is wrong, a non-zero exit, no traceback, no "internal
error", and nothing written that looks like a valid checkpoint."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

import bad_inputs as bi
from helpers import cli

STATIC_W8A8 = "method: rtn\nactivation: {kind: int, bits: 8, symmetric: false, granularity: tensor, dynamic: false}\n"


@dataclass
class Case:
    id: str
    build: Callable[[Path], list]  # tmp -> CLI arguments
    expect: tuple[str, ...]  # substrings of the message (case-insensitive)


def refused(result, out: Path | None, *needles: str, after_work: bool = False) -> str:
    """`after_work`: the fault comes after the run started, so the run's header and progress precede the error."""
    text = result.output
    assert result.exit_code != 0, text
    assert "Traceback" not in text and "internal error" not in text, text
    if after_work:
        text = text[text.index("error:"):]
    lines = [line for line in text.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2, text
    flat = " ".join(text.split()).lower()
    for n in needles:
        assert n.lower() in flat, (n, text)
    if out is not None:
        assert not (out / "quantization.json").exists(), "a checkpoint that looks valid was written"
        assert not list(out.parent.glob(f".{out.name}.tmp-*")), "a temp folder was left behind"
    return text


def q(model, out, *flags) -> list:
    return ["quantize", model, "--out", out, *flags]


def _src_file(tmp: Path) -> list:
    f = bi.write(tmp / "model.txt", "not a model")
    return q(f, tmp / "o")


def _bad_config(tmp: Path) -> list:
    d = bi.copy_zoo("tiny-dit", tmp / "dit")
    bi.write(d / "config.json", "{broken")
    return q(d, tmp / "o")


def _unknown_type(tmp: Path) -> list:
    (tmp / "m").mkdir()
    bi.write(tmp / "m" / "config.json", json.dumps({"hello": 1}))
    return q(tmp / "m", tmp / "o")


def _out_inside_source(tmp: Path) -> list:
    d = bi.copy_zoo("tiny-dit", tmp / "dit")
    return q(d, d / "quantized")


def _out_is_source(tmp: Path) -> list:
    d = bi.copy_zoo("tiny-dit", tmp / "dit")
    return q(d, d, "--overwrite")


def _out_contains_source(tmp: Path) -> list:
    d = bi.copy_zoo("tiny-dit", tmp / "a" / "dit")
    return q(d, tmp / "a", "--overwrite")


def _out_dot(tmp: Path) -> list:
    os.chdir(tmp)
    return q("zoo:tiny-dit", ".", "--overwrite")


def _out_under_file(tmp: Path) -> list:
    bi.write(tmp / "file.txt", "x")
    return q("zoo:tiny-dit", tmp / "file.txt" / "x")


def _out_read_only(tmp: Path) -> list:
    return q("zoo:tiny-dit", Path("/proc") / f"quantkit-{os.getpid()}" / "o")  # /proc: a read-only mount


def _out_not_empty(tmp: Path) -> list:
    bi.write((tmp / "o").mkdir() or tmp / "o" / "notes.txt", "mine")
    return q("zoo:tiny-dit", tmp / "o")


def _overwrite_foreign(tmp: Path) -> list:
    bi.write((tmp / "o").mkdir() or tmp / "o" / "notes.txt", "mine")
    return q("zoo:tiny-dit", tmp / "o", "--overwrite")


def _dit(fn) -> Callable[[Path], list]:
    return lambda tmp: q(bi.dit_variant(tmp, fn), tmp / "o")


def _mixtral(fn) -> Callable[[Path], list]:
    return lambda tmp: q(bi.mixtral_variant(tmp, fn), tmp / "o")


def _recipe(text: str, *flags: str, model: str = "zoo:tiny-dit") -> Callable[[Path], list]:
    return lambda tmp: q(model, tmp / "o", "--recipe", bi.write(tmp / "r.yaml", text), *flags)


def _flags(*flags, model: str = "zoo:tiny-dit") -> Callable[[Path], list]:
    return lambda tmp: q(model, tmp / "o", *flags)


def _prompts(data: bytes | str, recipe: str = STATIC_W8A8) -> Callable[[Path], list]:
    return lambda tmp: q("zoo:tiny-sd", tmp / "o", "--recipe", bi.write(tmp / "r.yaml", recipe),
                         "--calib-prompts", bi.write(tmp / "p.txt", data))


def _text(data: bytes | str) -> Callable[[Path], list]:
    return lambda tmp: q("zoo:tiny-mixtral", tmp / "o", "--recipe", bi.write(tmp / "r.yaml", STATIC_W8A8),
                         "--calib-text", bi.write(tmp / "t.txt", data))


CASES = [
    # paths
    Case("model-missing", lambda tmp: q(tmp / "nope", tmp / "o"), ("does not exist",)),
    Case("model-is-a-file", _src_file, ("is not a folder",)),
    Case("model-config-not-json", _bad_config, ("not valid JSON",)),
    Case("model-unknown-type", _unknown_type, ("unknown model type",)),
    Case("out-inside-source", _out_inside_source, ("is inside the source",)),
    Case("out-is-source", _out_is_source, ("is the source",)),
    Case("out-contains-source", _out_contains_source, ("contains the source",)),
    Case("out-is-cwd", _out_dot, ("current folder",)),
    Case("out-under-a-file", _out_under_file, ("which is a file",)),
    Case("out-read-only", _out_read_only, ("not writable",)),
    Case("out-not-empty", _out_not_empty, ("not empty", "--overwrite")),
    Case("overwrite-foreign-folder", _overwrite_foreign, ("only replaces a quantkit checkpoint",)),
    # model folders
    Case("tensor-missing", _dit(bi.drop_tensor), ("attn1.to_k.weight", "missing")),
    Case("expert-tensor-missing", _mixtral(bi.drop_expert), ("experts.1.w1.weight", "missing")),
    Case("tensor-unexpected", _dit(bi.add_tensor), ("extra_adapter.weight", "unexpected")),
    Case("tensor-wrong-shape", _dit(bi.reshape_tensor), ("attn1.to_k.weight", "shape")),
    Case("tensor-wrong-dtype", _dit(bi.int_tensor), ("attn1.to_k.weight", "dtype")),
    Case("pipeline-component-tensor-missing", lambda tmp: q(bi.pipeline_unet_tensor_missing(tmp), tmp / "o"),
         ("mid_block.resnets.1.conv2.weight", "missing")),
    Case("lm-tensor-wrong-shape", _mixtral(bi.reshape_tensor), ("self_attn.k_proj.weight", "shape")),
    Case("weight-nan", _dit(bi.nan_weight), ("attn1.to_k.weight", "NaN")),
    Case("weight-inf", _dit(bi.inf_weight), ("attn1.to_k.weight", "Inf")),
    Case("safetensors-empty", lambda tmp: q(bi.truncated_source(tmp, 0), tmp / "o"), (bi.DIT_WEIGHTS, "truncated")),
    Case("safetensors-truncated", lambda tmp: q(bi.truncated_source(tmp, -100), tmp / "o"), (bi.DIT_WEIGHTS, "truncated")),
    Case("safetensors-garbage-header", lambda tmp: q(bi.garbage_header(tmp), tmp / "o"), (bi.DIT_WEIGHTS, "corrupted")),
    Case("safetensors-oversized-header", lambda tmp: q(bi.oversized_header(tmp), tmp / "o"), (bi.DIT_WEIGHTS, "header claims")),
    Case("sharded-index-missing-shard", lambda tmp: q(bi.sharded_missing_shard(tmp), tmp / "o"),
         ("model-00002-of-00002.safetensors", "missing")),
    # recipes
    Case("recipe-unknown-key", _recipe("method: rtn\nskip_role: [router]\n"), ("skip_role", "did you mean 'skip_roles'")),
    Case("recipe-string-bool", _recipe("weight: {kind: int, bits: 4, symmetric: 'no'}\n"), ("symmetric", "true or false")),
    Case("recipe-string-bits", _recipe("weight: {kind: int, bits: '4'}\n"), ("bits", "integer")),
    Case("recipe-bits-out-of-range", _recipe("weight: {kind: int, bits: 12}\n"), ("between 2 and 8",)),
    Case("recipe-empty-file", _recipe(""), ("is empty",)),
    Case("recipe-not-a-mapping", _recipe("- rtn\n- w8\n"), ("must be a mapping",)),
    Case("recipe-contradiction", _recipe("weight: {kind: int, bits: 4, granularity: group}\n"), ("positive group_size",)),
    Case("recipe-string-dynamic", _recipe("activation: {kind: int, bits: 8, granularity: tensor, dynamic: 'no'}\n"),
         ("dynamic", "true or false")),
    Case("recipe-option-of-other-method", _recipe("method: rtn\nmethod_options: {iters: 5}\n"),
         ("'iters'", "eda-dm")),
    Case("recipe-option-wrong-type", _recipe("method: flexround\nmethod_options: {iters: 'many'}\n"),
         ("iters", "integer")),
    Case("recipe-option-unknown", _recipe("method: duquant\nmethod_options: {permut: true}\n"),
         ("permut", "did you mean 'permute'")),
    # flags
    Case("group-size-zero", _flags("--wbits", "4", "--group-size", "0"), ("positive integer", "channel")),
    Case("group-size-negative", _flags("--wbits", "4", "--group-size", "-4"), ("positive integer",)),
    Case("group-size-huge", _flags("--wbits", "4", "--group-size", str(1 << 20)), ("does not divide",)),
    Case("calib-size-zero", _flags("--calib-size", "0"), ("at least 1",)),
    Case("shard-size-zero", _flags("--max-shard-mb", "0"), ("--max-shard-mb",)),
    Case("rounding-with-rtn", _flags("--rounding", "flexround"), ("--rounding", "eda-dm")),
    Case("weight-recon-with-rtn", _flags("--weight-recon"), ("--weight-recon", "dgq")),
    Case("calib-prompts-to-lm", lambda tmp: q("zoo:tiny-mixtral", tmp / "o", "--calib-prompts",
                                              bi.write(tmp / "p.txt", "a cat\n")), ("--calib-text",)),
    Case("calib-prompts-to-rtn-dynamic", _prompts("a cat\n", recipe="method: rtn\n"), ("uses no calibration",)),
    Case("calib-text-to-diffusion", lambda tmp: q("zoo:tiny-dit", tmp / "o", "--calib-text",
                                                  bi.write(tmp / "t.txt", "text " * 100)), ("language models",)),
    Case("calib-steps-to-lm", lambda tmp: q("zoo:tiny-mixtral", tmp / "o", "--recipe",
                                            bi.write(tmp / "r.yaml", STATIC_W8A8), "--calib-steps", "4"),
         ("--calib-steps",)),
    Case("device-unknown", _flags("--device", "tpu"), ("allowed: cpu, cuda",)),
    # calibration
    Case("prompts-empty", _prompts(""), ("no prompts",)),
    Case("prompts-blank-lines", _prompts("\n   \n\t\n"), ("no prompts",)),
    Case("prompts-not-utf8", _prompts(b"a cat \xff\xfe on a mat\n"), ("not UTF-8",)),
    Case("text-binary", _text(b"\x00\x01\x02binary\x00" * 50), ("binary",)),
    Case("text-two-bytes", _text("ab"), ("tokens", "longer text")),
    Case("calib-file-other-model", lambda tmp: q("zoo:tiny-unet", tmp / "o", "--calib",
                                                 bi.calib_for_other_model(tmp)), ("does not fit this model",)),
    Case("calib-file-missing", _flags("--calib", "/nonexistent.calib"), ("does not exist",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = case.build(tmp_path)
    out = Path(args[args.index("--out") + 1]) if "--out" in args else None
    refused(cli(*args), out if out is not None and str(out) != "." else None, *case.expect)


def test_pickle_only_source_is_refused_unopened(tmp_path: Path) -> None:
    src, marker = bi.pickle_only(tmp_path)
    refused(cli(*q(src, tmp_path / "o")), tmp_path / "o", "pickle", "safetensors")
    assert not marker.exists(), "the pickle was unpickled"


def test_overwrite_refuses_foreign_file_in_previous_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert cli(*q("zoo:tiny-dit", out)).exit_code == 0
    bi.write(out / "my-notes.txt", "keep me")
    refused(cli(*q("zoo:tiny-dit", out, "--overwrite")), None, "my-notes.txt", "did not write")
    assert (out / "my-notes.txt").read_text() == "keep me" and (out / "quantization.json").exists()
    (out / "my-notes.txt").unlink()
    r = cli(*q("zoo:tiny-dit", out, "--overwrite", "--wbits", "4"))  # the documented safe result: replaced
    assert r.exit_code == 0, r.output
    assert json.loads((out / "quantization.json").read_text())["recipe"]["weight"]["bits"] == 4


def test_full_disk_while_writing(tmp_path: Path, monkeypatch) -> None:
    import errno

    import quantkit.io as qio

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(qio, "save_file", no_space)
    out = tmp_path / "o"
    refused(cli(*q("zoo:tiny-dit", out)), out, "No space left on device", "nothing was written", after_work=True)
    assert not out.exists()


# ---- checkpoints --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dit_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ck") / "dit"
    r = cli(*q("zoo:tiny-dit", out))
    assert r.exit_code == 0, r.output
    return out


def _edit_meta(ck: Path, fn) -> None:
    meta = json.loads((ck / "quantization.json").read_text())
    fn(meta)
    (ck / "quantization.json").write_text(json.dumps(meta))


def _wrong_shape(ck: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = bi.weight_file(ck)
    sd = load_file(str(f))
    k = next(k for k in sd if k.endswith("qweight"))
    sd[k] = sd[k][:-1].contiguous()
    save_file(sd, str(f))


# (id, damage, expected message, commands): inspect reads only headers and records, generate loads.
CKPT_CASES = [
    ("ckpt-newer-format", lambda ck: _edit_meta(ck, lambda m: m.update(format_version=99)), ("format version 99",),
     ("inspect", "generate")),
    ("ckpt-unknown-format", lambda ck: _edit_meta(ck, lambda m: m.update(format_version="2.x")), ("format_version",),
     ("inspect", "generate")),
    ("ckpt-missing-field", lambda ck: _edit_meta(ck, lambda m: m.pop("layers")), ("incomplete", "layers"),
     ("inspect", "generate")),
    ("ckpt-missing-weights", lambda ck: bi.weight_file(ck).unlink(), ("missing",), ("inspect", "generate")),
    ("ckpt-wrong-shape", _wrong_shape, ("has shape", "qweight"), ("generate",)),
    ("ckpt-layer-not-in-model", lambda ck: _edit_meta(ck, lambda m: m["layers"].update(
        {"nope.layer": next(iter(m["layers"].values()))})), ("nope.layer",), ("generate",)),
]
CKPT_RUNS = [(c[0], c[1], c[2], cmd) for c in CKPT_CASES for cmd in c[3]]


@pytest.mark.parametrize("name,damage,expect,cmd", CKPT_RUNS, ids=[f"{c[0]}-{c[3]}" for c in CKPT_RUNS])
def test_bad_checkpoint(tmp_path: Path, dit_ckpt: Path, name: str, damage, expect, cmd: str) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(dit_ckpt, ck)
    damage(ck)
    refused(cli(cmd, ck), None, *expect)


def test_generate_zero_steps(tmp_path: Path) -> None:
    refused(cli("generate", "zoo:tiny-sd", "--steps", "0", "--out", tmp_path / "x.png"), None, "--steps", "at least 1")
    assert not (tmp_path / "x.png").exists()


def test_library_warnings_are_not_muted() -> None:
    """transformers' / diffusers' load reports and fallbacks are warnings: the CLI's set-up keeps them."""
    import logging

    from quantkit.cli import _setup_logging

    _setup_logging(False)
    for lib in ("transformers", "diffusers"):
        assert logging.getLogger(lib).getEffectiveLevel() <= logging.WARNING, lib


def test_group_fallback_is_announced(tmp_path: Path) -> None:
    """rtn-w4a16-g128 on a model with layers 128 does not tile: the run header says which fell back."""
    r = cli("quantize", "zoo:digits-dit", "--recipe", "rtn-w4a16-g128", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "30 of 36 layers per channel: the group size does not divide" in " ".join(r.output.split())


def test_plain_save_of_a_quantized_model_is_refused_when_read_back(tmp_path: Path, dit_ckpt: Path) -> None:
    """A quantized model written with a plain save_pretrained holds qweight/scale, not weight: every
    quantkit command that reads it as a source refuses it instead of loading random layers."""
    import quantkit

    quantkit.load(dit_ckpt).save_pretrained(tmp_path / "plain")
    for args in (("quantize", tmp_path / "plain", "--out", tmp_path / "o"), ("generate", tmp_path / "plain")):
        refused(cli(*args), tmp_path / "o", "is missing from the weights")
