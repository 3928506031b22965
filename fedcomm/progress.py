"""The progress bar of every long command: its iterations or rounds and the latest returns."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn


def progress_bar(enabled: bool, console: Console | None = None, unit: str = "") -> Progress:
    """A bar whose task has a ``status`` field; ``unit`` adds a "done/total unit" count."""
    columns: list[ProgressColumn] = [TextColumn("[bold]{task.description}"), BarColumn()]
    if unit:
        columns.append(TextColumn(f"{{task.completed}}/{{task.total}} {unit}"))
    columns += [TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
    return Progress(*columns, console=console, disable=not enabled)


def status(row: dict) -> str:
    """A metrics row in a few words: the training return, and the evaluation's if there is one
    (neither where private agents keep them); in waves, how many, and the slowest site."""
    parts = []
    if "return_mean" in row:
        parts.append(f"return {row['return_mean']:.2f}")
    if "eval_return" in row:
        parts.append(f"eval {row['eval_return']:.2f}")
    if row.get("waves", 1) > 1:
        parts.append(f"{row['waves']} waves")
    if "slowest_site" in row:
        parts.append(f"slowest site {row['slowest_site']} {row['slowest_site_s']:.0f} s")
    return " | ".join(parts)
