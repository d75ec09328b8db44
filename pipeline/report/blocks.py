"""The report's document model: sections of plain-text blocks, rendered to HTML and Markdown.

Blocks hold plain text only (never markup): each format escapes it once, at rendering.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The two files a report consists of, written into the run's workdir.
REPORT_HTML = "report.html"
REPORT_MD = "report.md"


@dataclass
class Para:
    """A paragraph of plain text."""

    text: str
    cls: str = ""  # one of the fixed CSS classes: "", "note", "warn", "fail"


@dataclass
class Tab:
    """A table of plain-text cells."""

    headers: list[str]
    rows: list[list[str]]
    title: str = ""
    row_classes: list[str] = field(default_factory=list)  # fixed CSS classes, one per row


@dataclass
class Pre:
    """Preformatted text: a command or the config."""

    text: str
    title: str = ""


@dataclass
class Img:
    """A PNG plot."""

    png: bytes
    alt: str


@dataclass
class Section:
    """One titled part of the report."""

    id: str
    title: str
    blocks: list[Any] = field(default_factory=list)
