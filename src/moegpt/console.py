"""Terminal output shared by the CLI verbs: progress bars and tables (rich)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

T = TypeVar("T")

# Status and progress go to stderr so stdout stays clean for results (tables, --json).
stderr = Console(stderr=True, soft_wrap=True)  # status lines never wrap mid-word
# Wide when piped (files, pagers, CI logs): the planner's tables have long notes.
stdout = Console(width=None if sys.stdout.isatty() else 140)


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a progress bar on an interactive stderr; silently otherwise."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=True, disable=not sys.stderr.isatty()) as bar:
        yield from bar.track(items, total=total, description=description)


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M' with decimal prefixes; counts use B for billions, units G.
    Beyond the tera range, scientific notation (2.15e25)."""
    if abs(n) >= 1e15:
        mantissa, exponent = f"{n:.3g}".split("e")
        return f"{mantissa}e{int(exponent)}{' ' + unit if unit else ''}"
    for scale, prefix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{prefix}{unit}"
    return f"{n:.3g}{unit}"
