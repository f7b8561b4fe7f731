"""Every bad input gets one clear line and a non-zero exit, never a traceback."""
import json

import pytest

from helpers import cli, corrupt, one_line_error


def test_missing_model_path(tmp_path):
    msg = one_line_error(cli("quantize", tmp_path / "nope", "--out", tmp_path / "o"))
    assert "does not exist" in msg and "zoo:NAME" in msg


def test_unknown_model_type(tmp_path):
    d = tmp_path / "weird"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"hello": 1}))
    msg = one_line_error(cli("quantize", d, "--out", tmp_path / "o"))
    assert "unknown model type" in msg


def test_unknown_zoo_model(tmp_path):
    msg = one_line_error(cli("quantize", "zoo:nothing", "--out", tmp_path / "o"))
    assert "unknown zoo model" in msg and "tiny-sd" in msg


def test_unknown_recipe_key_suggests(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("method: rtn\nskip_role: [router]\n")
    msg = one_line_error(cli("quantize", "zoo:tiny-dit", "--out", tmp_path / "o", "--recipe", r))
    assert "unknown key 'skip_role'" in msg and "did you mean 'skip_roles'" in msg


def test_unknown_recipe_name(tmp_path):
    msg = one_line_error(cli("quantize", "zoo:tiny-dit", "--out", tmp_path / "o", "--recipe", "rtn-w3a3"))
    assert "not found" in msg and "rtn-w8a8" in msg


def test_unknown_method(tmp_path):
    msg = one_line_error(cli("quantize", "zoo:tiny-dit", "--out", tmp_path / "o", "--method", "rtm"))
    assert "unknown method 'rtm'" in msg and "did you mean 'rtn'" in msg


def test_group_size_does_not_divide(tmp_path):
    msg = one_line_error(cli("quantize", "zoo:tiny-dit", "--out", tmp_path / "o", "--wbits", "4", "--group-size", "96"))
    assert "group size 96 does not divide the input dimension" in msg


@pytest.mark.parametrize("flag,value", [("--wbits", "1"), ("--wbits", "9"), ("--abits", "12")])
def test_bits_out_of_range(tmp_path, flag, value):
    msg = one_line_error(cli("quantize", "zoo:tiny-dit", "--out", tmp_path / "o", flag, value))
    assert "bits must be between 2 and 8" in msg


def test_unknown_format(tmp_path):
    msg = one_line_error(cli("quantize", "zoo:tiny-dit", "--out", tmp_path / "o", "--format", "nf4"))
    assert "unknown --format 'nf4'" in msg and "mxfp4" in msg


@pytest.fixture(scope="module")
def dit_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "dit"
    r = cli("quantize", "zoo:tiny-dit", "--out", out)
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("keep", [0, 7, 100, -50])
def test_truncated_safetensors(tmp_path, dit_ckpt, keep):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(dit_ckpt, ck)
    f = ck / "diffusion_pytorch_model.safetensors"
    corrupt(f, keep if keep >= 0 else f.stat().st_size + keep)
    for cmd in (("inspect", ck), ("generate", ck)):
        msg = one_line_error(cli(*cmd))
        assert "truncated or corrupted" in msg


def test_corrupted_header(tmp_path, dit_ckpt):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(dit_ckpt, ck)
    f = ck / "diffusion_pytorch_model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"garbage!!!!!"
    f.write_bytes(bytes(data))
    assert "truncated or corrupted" in one_line_error(cli("inspect", ck))


def test_not_a_checkpoint(tmp_path):
    assert "not a quantkit checkpoint" in one_line_error(cli("inspect", tmp_path))


def test_corrupted_quantization_json(tmp_path, dit_ckpt):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(dit_ckpt, ck)
    (ck / "quantization.json").write_text("{not json")
    assert "corrupted" in one_line_error(cli("inspect", ck))


def test_bad_device(tmp_path):
    assert "allowed: cpu, cuda" in one_line_error(cli("quantize", "zoo:tiny-dit", "--out", tmp_path / "o", "--device", "tpu"))


def test_missing_calibration_file(tmp_path):
    r = tmp_path / "static.yaml"
    r.write_text("activation: {kind: int, bits: 8, granularity: tensor, dynamic: false}\n")
    msg = one_line_error(cli("quantize", "zoo:tiny-mixtral", "--out", tmp_path / "o", "--recipe", r,
                             "--calib-text", tmp_path / "none.txt"))
    assert "calibration text file" in msg and "does not exist" in msg


@pytest.mark.parametrize("exc", ["QuantkitError", "RuntimeError"])
def test_an_error_message_with_brackets_is_printed_not_parsed_as_markup(exc, capsys):
    """A gloo error names its source as "[/.../pair.cc:553]": rich took it for a closing tag and the error
    printer itself raised, so the rank died with a traceback instead of one line."""
    import typer

    from quantkit.cli import user_errors
    from quantkit.errors import QuantkitError

    err = QuantkitError if exc == "QuantkitError" else RuntimeError
    with pytest.raises(typer.Exit):
        with user_errors():
            raise err("[/__w/pytorch/third_party/gloo/transport/tcp/pair.cc:553] Connection closed by peer")
    out = capsys.readouterr().err
    assert "[/__w/pytorch/third_party/gloo/transport/tcp/pair.cc:553] Connection closed" in out.replace("\n", "")
