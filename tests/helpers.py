"""Shared helpers for the end-to-end tests."""
from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

from quantkit.cli import app

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def root_of(obj, component):
    return getattr(obj, component) if component else obj


def forward(adapter, root, seed: int = 123) -> torch.Tensor:
    inp = adapter.synthetic_inputs(root, 1, seed)[0]
    with torch.no_grad():
        return adapter.output_tensor(root(*inp.args, **inp.kwargs))


def one_line_error(result) -> str:
    """The CLI's error output: exactly one non-empty line, no traceback."""
    text = result.output
    assert result.exit_code != 0, text
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def corrupt(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])
