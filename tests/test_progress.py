"""Progress of the library's own loops (quantkit.progress) and the CLI's pipe-friendly tables."""
from __future__ import annotations

import pytest

import quantkit
from quantkit.progress import reporting, track
from helpers import cli


def test_track_reports_each_loop_at_its_depth():
    seen = []
    with reporting(lambda *a: seen.append(a)):
        got = [(i, list(track("ab", "inner"))) for i in track(range(2), "outer")]
    assert got == [(0, ["a", "b"]), (1, ["a", "b"])]
    assert seen[:4] == [(0, "outer", 0, 2), (1, "inner", 0, 2), (1, "inner", 1, 2), (1, "inner", 2, 2)]
    assert seen[-1] == (0, "outer", 2, 2) and len(seen) == 1 + 2 * 4
    silent = []
    assert list(track(range(3), "unwatched")) == [0, 1, 2] and silent == []  # no reporter: plain iteration


def test_duquant_expert_and_gptq_loops_report(tmp_path):
    """The expert loop of DuQuant / EAQuant and GPTQ's column loop inside it report through the reporter."""
    from quantkit.models import load_model

    model = load_model("zoo:tiny-mixtral").obj
    recipe = {"method": "duquant", "weight": {"kind": "int", "bits": 4, "symmetric": True, "granularity": "channel"},
              "skip_roles": ["router", "lm_head", "embedding", "norm"], "calib_size": 2,
              "method_options": {"gptq": True, "steps": 2, "smooth": False}}
    seen = []
    with reporting(lambda *a: seen.append(a)):
        quantkit.quantize(model, recipe, calib=["a calibration text, long enough for one window. " * 8] * 2)
    experts = [s for s in seen if s[1] == "model.layers.1.mlp.experts: experts"]
    assert experts and experts[-1][2:] == (4, 4)
    depth = experts[0][0]
    assert any(s[1] == "model.layers.1: layers" and s[0] == depth - 1 for s in seen)
    assert any(s[1] == "GPTQ column blocks" and s[0] == depth + 1 for s in seen)


@pytest.fixture(scope="module")
def w8a8_mixtral(tmp_path_factory):
    ck = tmp_path_factory.mktemp("progress") / "ck"
    r = cli("quantize", "zoo:tiny-mixtral", "--out", ck, "--recipe", "rtn-w8a8", "--calib-size", "2")
    assert r.exit_code == 0, r.output
    return ck


def test_lm_eval_shows_router_record_bar(w8a8_mixtral):
    r = cli("eval", w8a8_mixtral, "--metrics", "router_topk_agreement", "--n", "2", "--seq-len", "16")
    assert r.exit_code == 0, r.output
    assert "router records" in r.output and "2/2" in r.output.split("router records")[1].splitlines()[0]


def test_tables_are_plain_and_whole_when_piped(w8a8_mixtral):
    """CliRunner's stdout is not a terminal: the inspect table has ASCII '|' rows, full layer names, no '…'."""
    r = cli("inspect", w8a8_mixtral)
    assert r.exit_code == 0, r.output
    rows = [line for line in r.output.splitlines() if line.startswith("| model.layers.")]
    assert rows and "| model.layers.1.self_attn.q_proj " in r.output
    assert "…" not in r.output and all(line.isascii() for line in r.output.splitlines())
