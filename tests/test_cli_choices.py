"""--help lists the real choices (checked against the registries, so the lists cannot go stale)."""
from __future__ import annotations

import re

from quantkit.cli_choices import METHOD_NAMES, ROUNDING_NAMES, WEIGHT_FORMATS, recipe_names
from helpers import cli


def test_choice_lists_match_registries():
    from quantkit.config import builtin_recipes
    from quantkit.formats.spec import FORMAT_KINDS
    from quantkit.methods import METHODS
    from quantkit.recon.layers import ROUNDINGS

    assert sorted(METHOD_NAMES) == sorted(METHODS)
    assert tuple(ROUNDING_NAMES) == tuple(ROUNDINGS)
    assert set(WEIGHT_FORMATS) == set(FORMAT_KINDS) - {"log2"}  # log2 is an attention-probability format
    assert recipe_names() == sorted(builtin_recipes())


def test_quantize_help_lists_choices():
    out = re.sub(r"\s+", " ", cli("quantize", "--help").output.replace("│", " "))
    for name in (*METHOD_NAMES, *ROUNDING_NAMES, "mxfp4", "cuda", "rtn-w4a16-g128", "dgq-w8a6"):
        assert name in out, name


def test_json_dash_is_stdout_everywhere(tmp_path):
    """`--json -` puts only JSON on stdout (quantize's messages go to stderr); `--json PATH` writes a file."""
    import json

    from typer.testing import CliRunner

    from quantkit.cli import app

    runner = CliRunner()
    ck = tmp_path / "ck"
    r = runner.invoke(app, ["quantize", "zoo:tiny-mixtral", "--out", str(ck), "--recipe", "rtn-w4a16-g128",
                            "--json", "-"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["method"] == "rtn" and summary["layers_quantized"] > 0
    r = runner.invoke(app, ["inspect", str(ck), "--json", "-"])
    assert json.loads(r.stdout)["totals"]["params_quantized"] > 0
    r = runner.invoke(app, ["inspect", str(ck), "--json", str(tmp_path / "i.json")])
    assert r.exit_code == 0 and json.loads((tmp_path / "i.json").read_text())["layers"]
    r = runner.invoke(app, ["activations", "zoo:tiny-mixtral", "--calib-size", "1", "--json", "-"])
    assert r.exit_code == 0 and isinstance(json.loads(r.stdout), list)
