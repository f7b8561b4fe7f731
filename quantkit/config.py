"""Recipes: frozen dataclasses validated on construction, read from and written to YAML / JSON.

A recipe = method + weight/activation formats + ordered per-layer rules + roles skipped by default.
Rules resolve by exact layer name first, then the first matching regex, then the defaults.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from quantkit.errors import QuantkitError
from quantkit.formats.spec import FormatSpec

# Layer roles the adapters assign. Roles in DEFAULT_SKIP_ROLES stay in full precision unless a
# recipe says otherwise: routers decide which expert runs, first/last diffusion convs and time
# embeddings are tiny but sensitive, the LM head and embeddings set the output distribution.
ROLES = ("linear", "conv", "attention", "mlp", "expert", "shared_expert", "router", "lm_head",
         "embedding", "time_embedding", "conv_in", "conv_out", "norm", "proj_in", "proj_out")
DEFAULT_SKIP_ROLES = ("router", "lm_head", "embedding", "time_embedding", "conv_in", "conv_out", "norm")


def _suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(d: dict[str, Any], cls: type, where: str) -> None:
    allowed = [f.name for f in dataclasses.fields(cls)]
    for k in d:
        if k not in allowed:
            raise QuantkitError(f"unknown key {k!r} in {where}{_suggest(k, allowed)}; allowed: {', '.join(allowed)}")


def _typed(value: Any, want: type | tuple[type, ...], field_name: str, words: str) -> Any:
    """`value` if it has type `want` (bools are not ints), else a one-line error."""
    bad_bool = isinstance(value, bool) and want in (int, (int, type(None)))
    if not isinstance(value, want) or bad_bool:
        raise QuantkitError(f"recipe field {field_name} must be {words}, got {value!r} ({type(value).__name__})")
    return value


def _spec(d: dict[str, Any] | FormatSpec | None, where: str) -> FormatSpec | None:
    if d is None or isinstance(d, FormatSpec):
        return d
    if not isinstance(d, dict):
        raise QuantkitError(f"{where} must be a mapping of format fields, got {type(d).__name__}")
    _check_keys(d, FormatSpec, where)
    return FormatSpec(**d)


@dataclass(frozen=True)
class ActivationConfig:
    """How layer inputs are quantized: a format and whether ranges are dynamic or calibrated."""

    format: FormatSpec
    dynamic: bool = True
    # DGQ's distribution-aware groups (quantizers/group_act.py): G ranges per tensor and timestep.
    groups: int | None = None

    def __post_init__(self) -> None:
        _typed(self.dynamic, bool, "activation.dynamic", "true or false")
        _typed(self.groups, (int, type(None)), "activation.groups", "an integer")
        if not self.dynamic and (self.format.kind != "int" or self.format.granularity != "tensor"):
            raise QuantkitError("static activation ranges need format kind 'int' with granularity 'tensor'")
        if self.groups is not None and (self.dynamic or self.format.symmetric or not 1 <= self.groups <= 255):
            raise QuantkitError("activation 'groups' (DGQ) needs static (dynamic: false) asymmetric int activations "
                                f"and 1-255 groups, got groups={self.groups}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ActivationConfig | None":
        if d is None:
            return None
        d = dict(d)
        dynamic = _typed(d.pop("dynamic", True), bool, "activation.dynamic", "true or false")
        groups = _typed(d.pop("groups", None), (int, type(None)), "activation.groups", "an integer")
        return cls(_spec(d, "activation"), dynamic, groups)

    def to_dict(self) -> dict[str, Any]:
        out = {**self.format.to_dict(), "dynamic": self.dynamic}
        if self.groups is not None:
            out["groups"] = self.groups
        return out


@dataclass(frozen=True)
class LayerRule:
    """Overrides for the layers it matches: `name` (exact), `pattern` (regex) or `role`."""

    name: str | None = None
    pattern: str | None = None
    role: str | None = None
    skip: bool = False
    weight: FormatSpec | None = None
    activation: ActivationConfig | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.name, self.pattern, self.role)) != 1:
            raise QuantkitError("a rule needs exactly one of 'name', 'pattern' or 'role'")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise QuantkitError(f"rule pattern {self.pattern!r} is not a valid regex: {e}") from None
        if self.role is not None and self.role not in ROLES:
            raise QuantkitError(f"unknown role {self.role!r}{_suggest(self.role, list(ROLES))}; allowed: {', '.join(ROLES)}")

    def matches(self, layer_name: str, role: str) -> bool:
        if self.name is not None:
            return self.name == layer_name
        if self.pattern is not None:
            return re.fullmatch(self.pattern, layer_name) is not None
        return self.role == role

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerRule":
        if not isinstance(d, dict):
            raise QuantkitError(f"each recipe rule must be a mapping, got {d!r}")
        _check_keys(d, cls, "rule")
        d = dict(d)
        _typed(d.get("skip", False), bool, "rule.skip", "true or false")
        for k in ("name", "pattern", "role"):
            _typed(d.get(k), (str, type(None)), f"rule.{k}", "a string")
        if "weight" in d:
            d["weight"] = _spec(d["weight"], "rule weight")
        if "activation" in d:
            d["activation"] = ActivationConfig.from_dict(d["activation"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in (("name", self.name), ("pattern", self.pattern), ("role", self.role)) if v}
        if self.skip:
            out["skip"] = True
        if self.weight is not None:
            out["weight"] = self.weight.to_dict()
        if self.activation is not None:
            out["activation"] = self.activation.to_dict()
        return out


@dataclass(frozen=True)
class LayerPlan:
    """What the recipe decides for one layer."""

    skip: bool
    weight: FormatSpec | None
    activation: ActivationConfig | None


@dataclass(frozen=True)
class Recipe:
    method: str = "rtn"
    weight: FormatSpec = field(default_factory=lambda: FormatSpec("int", 8, True, "channel"))
    activation: ActivationConfig | None = None
    skip_roles: tuple[str, ...] = DEFAULT_SKIP_ROLES
    rules: tuple[LayerRule, ...] = ()
    calib_size: int = 16
    seed: int = 0
    method_options: dict[str, Any] = field(default_factory=dict)
    # What to do with an int weight whose input size the group size does not divide (Stable Diffusion
    # has 320-wide layers, so g128 cannot tile them): "error", or "channel" = that layer gets one scale
    # per output channel (recorded per layer in the checkpoint and shown by `quantkit inspect`).
    group_fallback: str = "error"

    def __post_init__(self) -> None:
        _typed(self.method, str, "method", "a string")
        _typed(self.calib_size, int, "calib_size", "a positive integer")
        _typed(self.seed, int, "seed", "an integer")
        if self.group_fallback not in ("error", "channel"):
            raise QuantkitError(f"unknown group_fallback {self.group_fallback!r}; allowed: error, channel")
        for r in self.skip_roles:
            if r not in ROLES:
                raise QuantkitError(f"unknown role {r!r} in skip_roles{_suggest(r, list(ROLES))}; allowed: {', '.join(ROLES)}")
        if self.calib_size < 1:
            raise QuantkitError(f"calib_size must be at least 1, got {self.calib_size}")
        if self.weight.kind == "log2":
            raise QuantkitError("log2 is an attention-probability format, not a weight format; allowed: int, mxfp4, fp8")
        acts = [self.activation] + [r.activation for r in self.rules]
        if self.method != "dgq" and any(a is not None and a.groups is not None for a in acts):
            raise QuantkitError(f"activation 'groups' are DGQ's group quantizer; method {self.method!r} cannot "
                                "calibrate them (use method dgq, or drop 'groups')")

    def plan(self, layer_name: str, role: str) -> LayerPlan:
        """Resolve the rules for one layer: exact name, then regex, then role, then defaults."""
        for kind in ("name", "pattern", "role"):
            for rule in self.rules:
                if getattr(rule, kind) is not None and rule.matches(layer_name, role):
                    return LayerPlan(rule.skip, rule.weight or self.weight,
                                     rule.activation if rule.activation is not None else self.activation)
        return LayerPlan(role in self.skip_roles, self.weight, self.activation)

    # ---- serialization -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "weight": self.weight.to_dict(),
                "activation": None if self.activation is None else self.activation.to_dict(),
                "skip_roles": list(self.skip_roles), "rules": [r.to_dict() for r in self.rules],
                "calib_size": self.calib_size, "seed": self.seed, "method_options": dict(self.method_options),
                "group_fallback": self.group_fallback}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        if not isinstance(d, dict):
            raise QuantkitError(f"a recipe must be a mapping, got {type(d).__name__}")
        _check_keys(d, cls, "recipe")
        d = dict(d)
        for k, want, words in (("method", str, "a string"), ("calib_size", int, "a positive integer"),
                               ("seed", int, "an integer"), ("group_fallback", str, "'error' or 'channel'"),
                               ("skip_roles", (list, type(None)), "a list of roles"),
                               ("method_options", (dict, type(None)), "a mapping of option: value")):
            if k in d:
                _typed(d[k], want, k, words)
        if "weight" in d:
            d["weight"] = _spec(d["weight"], "weight")
        if "activation" in d:
            d["activation"] = ActivationConfig.from_dict(d["activation"])
        if "skip_roles" in d:
            d["skip_roles"] = tuple(d["skip_roles"] or ())
        if "rules" in d:
            if not isinstance(d["rules"], list):
                raise QuantkitError("recipe 'rules' must be a list")
            d["rules"] = tuple(LayerRule.from_dict(r) for r in d["rules"])
        if "method_options" in d:
            d["method_options"] = dict(d["method_options"] or {})
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """Read a YAML or JSON recipe file, or a built-in one by name (e.g. 'rtn-w8a8')."""
        p = Path(path)
        if not p.exists():
            p = builtin_recipe_path(str(path))
        try:
            data = yaml.safe_load(p.read_text()) if p.suffix in (".yaml", ".yml") else json.loads(p.read_text())
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise QuantkitError(f"recipe {p} is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
        if data is None or data == {}:
            raise QuantkitError(f"recipe {p} is empty; give at least 'method' (e.g. method: rtn) or a built-in "
                                "recipe name")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)


def builtin_recipes() -> dict[str, Path]:
    """Recipes shipped with the package (configs/*.yaml), by name."""
    from importlib import resources

    root = resources.files("quantkit.configs")
    return {Path(f.name).stem: Path(str(f)) for f in root.iterdir() if f.name.endswith(".yaml")}


def builtin_recipe_path(name: str) -> Path:
    recipes = builtin_recipes()
    stem = Path(name).stem if name.endswith((".yaml", ".yml")) else name
    if stem in recipes and ("/" not in name or not Path(name).is_absolute()):
        return recipes[stem]
    raise QuantkitError(
        f"recipe {name!r} not found: give a YAML/JSON file or a built-in name ({', '.join(sorted(recipes))})"
    )


def _group_size_flag(value: int | str) -> int | None:
    """--group-size: a positive integer, or 'channel' (None: one scale per output channel)."""
    if isinstance(value, str) and value.strip().lower() in ("channel", "per-channel"):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(value).strip() != str(n):
        raise QuantkitError(f"--group-size must be a positive integer dividing the input dimension (e.g. 32, 64, "
                            f"128) or 'channel' for one scale per output channel, got {value!r}")
    return n


def recipe_with_overrides(recipe: Recipe, *, method: str | None = None, wbits: int | None = None,
                          abits: int | None = None, group_size: int | str | None = None, fmt: str | None = None,
                          calib_size: int | None = None, seed: int | None = None) -> Recipe:
    """Apply command-line flags on top of a recipe (flags win).

    wbits/fmt/group_size change the default weight format; abits 16 turns activation quantization
    off, another value quantizes activations per token (int) or per 32 (mxfp4) dynamically.
    group_size "channel" means one scale per output channel.
    """
    w = recipe.weight.to_dict()
    if fmt is not None:
        if fmt not in ("int", "mxfp4", "fp8"):
            raise QuantkitError(f"unknown --format {fmt!r}; allowed: int, mxfp4, fp8")
        w["kind"] = fmt
        if fmt == "mxfp4":
            w.update(bits=4, symmetric=True, granularity="group", group_size=32)
        elif fmt == "fp8":
            w.update(bits=8, symmetric=True)
            if w["granularity"] == "group" and group_size is None:
                w.update(granularity="channel", group_size=None)
        elif recipe.weight.kind != "int":
            w.update(bits=8, granularity="channel", group_size=None, scale_mode="ocp_floor")
    if wbits is not None:
        w["bits"] = wbits
    if group_size is not None:
        group_size = _group_size_flag(group_size)
        w.update(granularity="group", group_size=group_size) if group_size else w.update(granularity="channel", group_size=None)
    changes: dict[str, Any] = {"weight": FormatSpec(**w)}
    if abits is not None:
        if abits == 16:
            changes["activation"] = None
        elif recipe.activation is not None and not recipe.activation.dynamic:
            # static recipes (EDA-DM, DGQ) keep their calibrated format, with the new width
            changes["activation"] = dataclasses.replace(
                recipe.activation, format=dataclasses.replace(recipe.activation.format, bits=abits))
        elif changes["weight"].kind == "mxfp4" and abits == 4:
            changes["activation"] = ActivationConfig(FormatSpec.mxfp4(changes["weight"].scale_mode), True)
        else:
            changes["activation"] = ActivationConfig(FormatSpec("int", abits, False, "channel"), True)
    elif fmt == "mxfp4" and recipe.activation is not None:
        changes["activation"] = ActivationConfig(FormatSpec.mxfp4(), True)
    if method is not None:
        changes["method"] = method
    if calib_size is not None:
        changes["calib_size"] = calib_size
    if seed is not None:
        changes["seed"] = seed
    return recipe.replace(**changes)
