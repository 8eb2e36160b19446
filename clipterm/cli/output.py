"""Output for one-shot commands: human tables on stdout, JSON with `--json`, progress and errors on stderr."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)

JSON_HELP = "Print JSON on stdout instead of a table (it carries a \"schema\" version)."


def emit_json(payload: dict[str, Any], schema: str) -> None:
    """Print one JSON document with its schema name first."""
    print(json.dumps({"schema": schema, **payload}, indent=2, default=_jsonable))


def emit_json_line(payload: dict[str, Any]) -> None:
    print(json.dumps(payload, default=_jsonable), flush=True)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__fspath__"):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def error(message: str, hint: str | None = None) -> None:
    """One line for the error, one for the hint, on stderr."""
    from rich.markup import escape  # a message may hold brackets ("clipterm[lm]", "[0, 1]") that are not markup

    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True)
    if hint:
        stderr.print(f"[dim]hint:[/] {escape(hint)}", highlight=False)


@contextmanager
def progress(description: str, total: int | None, unit: str = "images") -> Iterator[Any]:
    """A rich progress bar on stderr with a rate column; yields `advance(n, note=None)` (note: a live figure)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=stderr, transient=False, disable=not sys.stderr.isatty() and not os.environ.get("CLIPTERM_PROGRESS")) as bar:
        task = bar.add_task(description, total=total, rate="", note="")

        def advance(n: int = 1, note: str | None = None) -> None:
            bar.advance(task, n)
            if note is not None:
                bar.update(task, note=note)
            speed = bar.tasks[0].speed
            if speed:
                bar.update(task, rate=f"{speed:,.0f} {unit}/s")

        yield advance
