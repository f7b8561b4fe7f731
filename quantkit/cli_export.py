"""`quantkit export`: hand a quantkit checkpoint to other runtimes (registered on cli.app)."""
from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from quantkit.cli import _setup_logging, app, console, user_errors


class ExportFormat(str, Enum):
    compressed_tensors = "compressed-tensors"


@app.command("export")
def export_cmd(
    ckpt: Path = typer.Argument(..., help="A quantkit checkpoint folder of a transformers language model."),
    format: ExportFormat = typer.Option(..., "--format", help="Target format."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (loads with transformers' from_pretrained)."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output folder."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the summary as JSON to PATH ('-' = stdout)."),
) -> None:
    """Export CKPT as compressed-tensors (pack-quantized, int-quantized, float-quantized, mxfp4-pack-quantized)."""
    _setup_logging(False)
    with user_errors():
        from quantkit.export.compressed_tensors import export

        summary = export(ckpt, out, overwrite=overwrite)
        if json_path == "-":
            sys.stdout.write(json.dumps(summary, indent=1) + "\n")
            return
        if json_path:
            Path(json_path).write_text(json.dumps(summary, indent=1))
        groups = ", ".join(f"{g['format']}" for g in summary["groups"].values())
        console.print(f"[green]wrote[/] {out}: {summary['quantized_linears']} quantized linears ({groups}), "
                      f"{summary['ignored']} kept in full precision (ignore list)")
