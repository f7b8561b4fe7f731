"""Calibration prompts and text: user files (--calib-prompts / --calib-text) or the shipped defaults."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from quantkit.errors import QuantkitError


def _default(name: str) -> str:
    return resources.files("quantkit.calib").joinpath("data", name).read_text(encoding="utf-8")


def read_prompts(path: str | Path | None = None) -> list[str]:
    """One prompt per non-empty line of `path`, or the shipped COCO captions."""
    if path is None:
        text = _default("prompts.txt")
    else:
        p = Path(path)
        if not p.is_file():
            raise QuantkitError(f"calibration prompts file {p} does not exist; give a text file with one prompt per line")
        text = p.read_text(encoding="utf-8", errors="replace")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise QuantkitError(f"calibration prompts file {path} has no prompts; give one prompt per line")
    return prompts


def read_text(path: str | Path | None = None) -> str:
    """The calibration corpus for language models: `path`, or the shipped tinyshakespeare excerpt."""
    if path is None:
        return _default("text.txt")
    p = Path(path)
    if not p.is_file():
        raise QuantkitError(f"calibration text file {p} does not exist; give a plain-text file")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise QuantkitError(f"calibration text file {p} is empty")
    return text


def heldout_text() -> str:
    """The shipped held-out text (last 10% of tinyshakespeare) for perplexity."""
    return _default("heldout.txt")
