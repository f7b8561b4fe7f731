import pytest

from quantkit.config import LayerRule, Recipe, builtin_recipes, recipe_with_overrides
from quantkit.errors import QuantkitError


def test_builtin_recipes_validate():
    names = set(builtin_recipes())
    assert {"rtn-w8a8", "rtn-w4a16-g128", "rtn-w4a8", "mxfp4-w4a4"} <= names
    from quantkit.methods import METHODS

    for name in names:
        r = Recipe.load(name)
        assert r.method in METHODS
        assert "router" in r.skip_roles and "lm_head" in r.skip_roles
        # EDA-DM and DGQ recipes quantize the time embedding as their papers' code does (issue 16)
        assert "time_embedding" in r.skip_roles or r.method in ("eda-dm", "dgq")


def test_unknown_key_suggests_closest(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("method: rtn\nweigth: {kind: int, bits: 4}\n")
    with pytest.raises(QuantkitError, match="unknown key 'weigth'.*did you mean 'weight'"):
        Recipe.load(p)


def test_unknown_format_key_suggests(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("weight: {kind: int, bits: 4, group_sise: 128}\n")
    with pytest.raises(QuantkitError, match="did you mean 'group_size'"):
        Recipe.load(p)


def test_rule_order_name_then_pattern_then_role():
    r = Recipe.from_dict({
        "weight": {"kind": "int", "bits": 8},
        "rules": [
            {"role": "attention", "weight": {"kind": "int", "bits": 6}},
            {"pattern": r".*\.to_q", "weight": {"kind": "int", "bits": 5}},
            {"name": "a.to_q", "weight": {"kind": "int", "bits": 4}},
            {"role": "router", "skip": False},
        ],
    })
    assert r.plan("a.to_q", "attention").weight.bits == 4
    assert r.plan("b.to_q", "attention").weight.bits == 5
    assert r.plan("b.to_k", "attention").weight.bits == 6
    assert r.plan("b.ff", "linear").weight.bits == 8
    assert r.plan("lm_head", "lm_head").skip
    assert not r.plan("mlp.gate", "router").skip


def test_bad_rule():
    with pytest.raises(QuantkitError, match="exactly one"):
        LayerRule(name="a", pattern="b")
    with pytest.raises(QuantkitError, match="not a valid regex"):
        LayerRule(pattern="(")


def test_overrides():
    r = recipe_with_overrides(Recipe.load("rtn-w8a8"), wbits=4, group_size=128, abits=16)
    assert r.weight.bits == 4 and r.weight.group_size == 128 and r.activation is None
    r = recipe_with_overrides(Recipe(), fmt="mxfp4", abits=4)
    assert r.weight.kind == "mxfp4" and r.activation.format.kind == "mxfp4"
    with pytest.raises(QuantkitError, match="between 2 and 8"):
        recipe_with_overrides(Recipe(), wbits=12)


def test_roundtrip_dict():
    r = Recipe.load("rtn-w4a8")
    assert Recipe.from_dict(r.to_dict()) == r


def test_group_fallback_to_channel_is_recorded():
    from quantkit.layers import plan_layers
    from quantkit.models import load_model

    loaded = load_model("zoo:digits-t2i")  # has 32-wide layers that g128 cannot tile
    strict = Recipe.load("rtn-w4a16-g128").replace(group_fallback="error")
    with pytest.raises(QuantkitError, match="does not divide"):
        plan_layers(loaded.root, loaded.adapter, strict)
    tasks = plan_layers(loaded.root, loaded.adapter, Recipe.load("rtn-w4a16-g128"))
    grans = {t.plan.weight.granularity for t in tasks if not t.plan.skip}
    assert grans == {"group", "channel"}
    for t in tasks:
        if not t.plan.skip and t.plan.weight.granularity == "group":
            assert all(k % 128 == 0 for k in [t.module.weight[0].numel()])
