"""How the CLI shows things: progress bars (its own loops and the library's, through quantkit.progress) and tables
that stay readable when stdout is a pipe or a file."""
from __future__ import annotations

import contextlib
from typing import Iterator

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from quantkit.progress import reporting

console = Console()
err_console = Console(stderr=True)


class _DepthBars:
    """One bar per nesting depth of the library's `track` loops, under the command's own bar."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.tasks: dict[int, TaskID] = {}

    def __call__(self, depth: int, what: str, done: int, total: int) -> None:
        if done == 0:  # a loop starts: bars of loops nested in an earlier iteration are finished business
            for d, t in self.tasks.items():
                if d > depth:
                    self.bar.update(t, visible=False)
        if depth not in self.tasks:
            self.tasks[depth] = self.bar.add_task("  " * (depth + 1) + what, total=total, completed=done)
        else:
            self.bar.update(self.tasks[depth], description="  " * (depth + 1) + what, completed=done, total=total,
                            visible=True)


@contextlib.contextmanager
def progress_bars() -> Iterator[Progress]:
    """A rich Progress on stderr; the library's own long loops get their bars in it for as long as it is open."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=False) as bar:
        with reporting(_DepthBars(bar)):
            yield bar


def print_table(table: Table, out: Console | None = None) -> None:
    """On a terminal, as rich draws it. Piped or redirected: no box-drawing characters and no column cut to the
    terminal's width (rich would assume 80 columns and cut cells to '…'), no colour codes."""
    out = out or console
    if out.is_terminal:
        out.print(table)
        return
    table.box = box.MARKDOWN  # '| a | b |' rows: ASCII only, and what grep / column / a markdown file expect
    need = Measurement.get(out, out.options.update(max_width=1_000_000), table).maximum
    # Console.print clamps `width` to the console's own width: a console as wide as the table, on the same file.
    Console(file=out.file, width=max(need, 1), color_system=None, soft_wrap=False).print(table)
