"""Choices listed in the CLI's --help, without importing torch (help must stay fast).

Method, format and rounding names are written out here; tests/test_cli_choices.py checks them against
the registries so they cannot go stale. Recipe names are read from the packaged configs folder."""
from __future__ import annotations

from importlib import resources

METHOD_NAMES = ("rtn", "eda-dm", "flexround", "dgq", "eaquant", "duquant")
WEIGHT_FORMATS = ("int", "mxfp4", "fp8")
ROUNDING_NAMES = ("adaround", "flexround", "nearest")
DEVICES = ("cpu", "cuda")


def recipe_names() -> list[str]:
    try:
        return sorted(f.name[:-5] for f in resources.files("quantkit.configs").iterdir() if f.name.endswith(".yaml"))
    except (ModuleNotFoundError, OSError):
        return []


def one_of(names: tuple[str, ...] | list[str]) -> str:
    return "One of: " + ", ".join(names) + "."
