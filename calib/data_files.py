"""Calibration prompts and text: user files (--calib-prompts / --calib-text) or the shipped defaults."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from quantkit.errors import QuantkitError


def _default(name: str) -> str:
    return resources.files("quantkit.calib").joinpath("data", name).read_text(encoding="utf-8")


def _read_utf8(p: Path, what: str) -> str:
    """The file as UTF-8 text; binary or mis-encoded files are an error, not replacement characters."""
    data = p.read_bytes()
    if b"\x00" in data:
        raise QuantkitError(f"{what} {p} is a binary file (it contains NUL bytes); give UTF-8 plain text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QuantkitError(f"{what} {p} is not UTF-8 text (bad byte at offset {e.start}); "
                            "give UTF-8 plain text") from None


def read_prompts(path: str | Path | None = None) -> list[str]:
    """One prompt per non-empty line of `path`, or the shipped COCO captions."""
    if path is None:
        text = _default("prompts.txt")
    else:
        p = Path(path)
        if not p.is_file():
            raise QuantkitError(f"calibration prompts file {p} does not exist; give a text file with one prompt per line")
        text = _read_utf8(p, "calibration prompts file")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise QuantkitError(f"calibration prompts file {path} has no prompts (empty or only blank lines); "
                            "give one prompt per line")
    return prompts


def read_text(path: str | Path | None = None) -> str:
    """The calibration corpus for language models: `path`, or the shipped tinyshakespeare excerpt."""
    if path is None:
        return _default("text.txt")
    p = Path(path)
    if not p.is_file():
        raise QuantkitError(f"calibration text file {p} does not exist; give a plain-text file")
    text = _read_utf8(p, "calibration text file")
    if not text.strip():
        raise QuantkitError(f"calibration text file {p} is empty or only blank lines; give plain text")
    return text


def heldout_text() -> str:
    """The shipped held-out text (last 10% of tinyshakespeare) for perplexity."""
    return _default("heldout.txt")
