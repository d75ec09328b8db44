"""Terminal output shared by every module: one rich console for logs and progress bars."""

from __future__ import annotations

import logging

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
