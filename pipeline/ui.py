"""Terminal output shared by every module: one rich console for logs and progress bars."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# stderr, so stdout stays clean for machine-readable output (e.g. `validate`).
console = Console(stderr=True)
if not console.is_terminal:
    # Logs and CI output: rich would squeeze tables into 80 columns; give them room.
    console.width = max(console.width, 150)
# stdout: what a command produces (`status`), so it can be piped, grepped and redirected.
out = Console()
if not out.is_terminal:
    out.width = max(out.width, 150)


class _QuietRootLibraries(logging.Filter):
    """ONNX Runtime's quantization tools log through the ROOT logger at INFO (one line per
    weight scale they adjust): keep their warnings, drop their chatter."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name != "root" or "onnxruntime" not in record.pathname


def setup_logging(verbose: bool = False) -> None:
    """Route logging through rich so log lines and progress bars do not overwrite each other."""
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=True, markup=False)
    if not verbose:
        handler.addFilter(_QuietRootLibraries())
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[handler],
        force=True,
    )
    # Third-party libraries are chatty at INFO; keep their warnings.
    for name in ("nncf", "torch_pruning", "PIL", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)


def progress() -> Progress:
    """A progress bar with counts, time and a free-text `info` field (loss, accuracy)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=True,
    )


def track(iterable: Iterable, description: str, total: int | None) -> Iterable:
    """:func:`progress` over `iterable` (count, elapsed, remaining) on an interactive terminal;
    the plain iterable otherwise (logs, CI), so nothing is slowed or cluttered."""
    if not console.is_terminal:
        return iterable
    return _tracked(iterable, description, total)


def _tracked(iterable: Iterable, description: str, total: int | None) -> Iterator:
    with progress() as bar:
        task = bar.add_task(description, total=total, info="")
        for item in iterable:
            yield item
            bar.advance(task)


def format_duration(seconds: float) -> str:
    """``42 s``, ``2 min 30 s``, ``1 h 05 min``: a wait in words a person reads at a glance."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s" if s else f"{m} min"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def clock_after(seconds: float, now: datetime | None = None) -> str:
    """The local wall-clock time `seconds` from now: ``13:05``, with the date when it is not today."""
    now = now or datetime.now()
    at = now + timedelta(seconds=seconds)
    return at.strftime("%H:%M") if at.date() == now.date() else at.strftime("%Y-%m-%d %H:%M")
