"""The report as Markdown: the same sections as the HTML page, tables as pipe tables, plots
referred to the HTML page. Every string is escaped here, in one place (`_md`); commands and
the config go into fences no content can close."""

from __future__ import annotations

import re
from typing import Any

from pipeline.manifest import Manifest
from pipeline.report.blocks import REPORT_HTML, Img, Para, Pre, Section, Tab
from pipeline.report.sections import build_sections, headline


# What could open raw HTML or an autolink (`<` before a letter, `/`, `!` or `?`), spell a
# character reference (`&amp;`, `&#60;`) or close a link's text (`](`, `][`): only these are
# escaped, so `<=`, `a & b` and `[distill]` stay as written.
_HTML_OPENER = re.compile(r"<(?=[A-Za-z/!?])|&(?=#?[A-Za-z0-9]+;)|\](?=[(\[])")


def _md(s: Any) -> str:
    """Escape text for a Markdown paragraph or table cell with backslashes: HTML is shown,
    never interpreted, and a `|` or a newline cannot break a table row, while the raw file
    stays readable (`budget <= 2.00 pt`, not `&lt;=`). (`_` is left alone: inside names such as
    `openvino_int8` it never makes emphasis, and escaping it would clutter the raw file.)"""
    s = str(s).replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`").replace("*", "\\*")
    s = _HTML_OPENER.sub(lambda m: "\\" + m.group(0), s)
    return re.sub(r"[\r\n]+", " ", s)


def _md_para(s: Any) -> str:
    """`_md` for a paragraph of its own: text that would start a quote, heading or list is not."""
    s = _md(s)
    return "\\" + s if re.match(r">|#|[-+](\s|$)", s) else s


def _fence(text: str) -> str:
    # A fence longer than any backtick run inside, so the content can never close it.
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}\n{text.rstrip()}\n{ticks}"


def _md_block(b: Any) -> str:
    if isinstance(b, Para):
        return _md_para(b.text)
    if isinstance(b, Pre):
        return (f"**{_md(b.title)}**\n\n" if b.title else "") + _fence(b.text)
    if isinstance(b, Img):
        return f"_{_md(b.alt)}: see the plot in {REPORT_HTML}._"
    if isinstance(b, Tab):
        head = [f"**{_md(b.title)}**", ""] if b.title else []
        headers = [_md(h) or " " for h in b.headers]
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
        lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in b.rows]
        return "\n".join(head + lines)
    raise TypeError(f"unknown report block {type(b).__name__}")


def render_markdown(manifest: Manifest, sections: list[Section] | None = None) -> str:
    """The report as Markdown (tables; plots are in report.html)."""
    sections = build_sections(manifest) if sections is None else sections
    name = manifest.model.pipeline.get("name", "pipeline")
    parts = [f"# {_md(name)} — pipeline report", "", _md(headline(manifest))]
    for s in sections:
        parts += ["", f"## {_md(s.title)}", ""]
        parts.append("\n\n".join(_md_block(b) for b in s.blocks))
    return "\n".join(parts) + "\n"
