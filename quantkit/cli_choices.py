"""Choices listed in the CLI's --help, without importing torch (help must stay fast).

Method, format and rounding names are written out here; tests/test_cli_choices.py checks them against
the registries so they cannot go stale. Recipe names are read from the packaged configs folder."""
from __future__ import annotations

from importlib import resources

METHOD_NAMES = ("rtn", "eda-dm", "flexround", "dgq", "eaquant", "duquant", "hadamard")
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


JSON_HELP = "Write the result as JSON to PATH; '-' writes it to stdout (instead of the table)."


def emit_json(target: str | None, data: object) -> bool:
    """`--json PATH|-` on every command: write `data` to PATH, or to stdout for '-'.
    Returns True when stdout got the JSON (the caller then prints nothing else there)."""
    import json
    import sys
    from pathlib import Path

    if target is None:
        return False
    text = json.dumps(data, indent=1)
    if target == "-":
        sys.stdout.write(text + "\n")
        return True
    p = Path(target)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return False
