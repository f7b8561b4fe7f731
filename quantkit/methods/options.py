"""Strict method options: every key known to the method it is given to, every value of the type of
its default (YAML's `"no"` is a string, never a truthy boolean)."""
from __future__ import annotations

import difflib
from typing import Any

from quantkit.errors import QuantkitError


def _owners(key: str) -> list[str]:
    from quantkit.methods.base import METHODS

    return sorted(n for n, cls in METHODS.items() if key in (cls.option_defaults() or {}))


def _type_ok(value: Any, default: Any) -> bool:
    if default is None or value is None:
        return True  # None defaults mean "unset": the method checks the value itself
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return True


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               tuple: "a list", list: "a list"}


def check_options(method: str, options: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Raise a one-line QuantkitError for an unknown option or a value of the wrong type."""
    if not isinstance(options, dict):
        raise QuantkitError(f"method_options must be a mapping, got {type(options).__name__}")
    for key, value in options.items():
        if key not in defaults:
            owners = [m for m in _owners(key) if m != method]
            close = difflib.get_close_matches(str(key), list(defaults), n=1)
            hint = (f" ({key!r} is an option of {', '.join(owners)})" if owners else
                    f" (did you mean {close[0]!r}?)" if close else "")
            allowed = ", ".join(sorted(defaults)) if defaults else f"none ({method} takes no method_options)"
            raise QuantkitError(f"unknown method option {key!r} for {method}{hint}; allowed: {allowed}")
        if not _type_ok(value, defaults[key]):
            want = _TYPE_WORDS.get(type(defaults[key]), type(defaults[key]).__name__)
            raise QuantkitError(f"method option {key} of {method} must be {want}, got {value!r} "
                                f"({type(value).__name__})")
