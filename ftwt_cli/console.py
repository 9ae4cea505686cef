"""Terminal output: human text and progress go to stderr, the ``--json`` document alone to stdout."""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console, ConsoleDimensions
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table
from rich.text import Text

#: Width of output that is not a terminal (a file, a pipe, a CI log): wide enough that no table cell is cut.
LOG_WIDTH = 10_000


class _Console(Console):
    """A terminal keeps its own width; anywhere else rich would fall back to 80 columns and cut table cells
    (``feat…``), so a log gets :data:`LOG_WIDTH` unless COLUMNS says otherwise."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self._width is None and not self.is_terminal and not self._environ.get("COLUMNS", "").isdigit():
            return ConsoleDimensions(LOG_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


# markup=False: messages carry user text and option syntax such as 'ftwt[onnx]', which rich markup would
# eat; styles are given as Text styles instead.
console = _Console(stderr=True, markup=False)


def plain_table(*headers: str, title: str | None = None, **kwargs: Any) -> Table:
    """A rich Table whose title, headers and cells are shown verbatim (never parsed as markup)."""
    columns = (Column(header=Text(h)) for h in headers)
    return _PlainTable(*columns, title=Text(title) if title is not None else None, **kwargs)


class _PlainTable(Table):
    def add_row(self, *cells: Any, **kwargs: Any) -> None:
        super().add_row(*(Text(c) if isinstance(c, str) else c for c in cells), **kwargs)


def error_line(message: str, label: str = "error", style: str = "red") -> None:
    """``error: message`` on stderr, the message verbatim."""
    console.print(Text.assemble((f"{label}:", style), " ", message), soft_wrap=True, highlight=False)


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Any]:
    """A rich progress bar on stderr; yields ``advance(n=1, **fields)``; fields show after the bar."""
    columns = [
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}", markup=False),
    ]
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str | None = None) -> None:
            bar.update(task, advance=n, **({"info": info} if info is not None else {}))

        yield advance


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


def emit_json(document: Any) -> None:
    """Print one JSON document on stdout (non-finite floats become null, as JSON has no NaN)."""
    sys.stdout.write(json.dumps(_jsonable(document), indent=2) + "\n")
    sys.stdout.flush()
