"""The report as one self-contained HTML page: inline CSS, plots as base64 PNG data URIs, a
Content-Security-Policy that forbids every network load, no scripts. Every string is escaped
here, in one place (`_h`)."""

from __future__ import annotations

import base64
import html
from typing import Any

from pipeline.manifest import Manifest
from pipeline.report.blocks import Img, Para, Pre, Section, Tab
from pipeline.report.sections import build_sections, headline

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
nav a{margin-right:1em}.scroll{overflow-x:auto}
table{border-collapse:collapse;margin:.6em 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f4f4f4}
caption{text-align:left;font-weight:600;padding:.3em 0}
td{white-space:nowrap}td.text{white-space:normal}td.wrap{white-space:normal;min-width:16em}tr.fail{background:#fdecec}tr.warn{background:#fff8e1}tr.dim{color:#777}
p.note{color:#666}p.warn{color:#8a6100}p.fail{color:#b00020;font-weight:600}
pre{background:#f6f8fa;padding:.7em;overflow-x:auto;white-space:pre-wrap;word-break:break-all}
img{max-width:100%;height:auto;display:block;margin:.6em 0}
"""
# No network, no scripts, no frames: the report stays inert whatever a manifest contains.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_CLASSES = {"", "ok", "fail", "warn", "dim", "note"}


def _h(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _cls(c: str) -> str:
    return f' class="{c}"' if c in _CLASSES and c else ""


def _cell_class(text: str) -> str:
    if len(text) > 40:
        return ' class="wrap"'
    return ' class="text"' if len(text) > 16 and " " in text else ""


def _html_block(b: Any) -> str:
    if isinstance(b, Para):
        return f"<p{_cls(b.cls)}>{_h(b.text)}</p>"
    if isinstance(b, Pre):
        title = f"<h3>{_h(b.title)}</h3>" if b.title else ""
        return f"{title}<pre><code>{_h(b.text)}</code></pre>"
    if isinstance(b, Img):
        data = base64.b64encode(b.png).decode("ascii")
        return f'<figure><img alt="{_h(b.alt)}" src="data:image/png;base64,{data}"><figcaption>{_h(b.alt)}</figcaption></figure>'
    if isinstance(b, Tab):
        out = ['<div class="scroll"><table>']
        if b.title:
            out.append(f"<caption>{_h(b.title)}</caption>")
        out.append("<thead><tr>" + "".join(f"<th>{_h(c)}</th>" for c in b.headers) + "</tr></thead><tbody>")
        for i, row in enumerate(b.rows):
            cls = b.row_classes[i] if i < len(b.row_classes) else ""
            # Numbers never break across lines; words may (so a wide table fits the page rather than
            # scroll), and long prose (reasons, messages) gets room to read.
            out.append(f"<tr{_cls(cls)}>" + "".join(f"<td{_cell_class(str(c))}>{_h(c)}</td>" for c in row) + "</tr>")
        out.append("</tbody></table></div>")
        return "".join(out)
    raise TypeError(f"unknown report block {type(b).__name__}")


def render_html(manifest: Manifest, sections: list[Section] | None = None) -> str:
    """The report as one self-contained HTML page (inline CSS, base64 PNG plots, no scripts,
    no network): every string from the manifest is escaped."""
    sections = build_sections(manifest) if sections is None else sections
    name = manifest.model.pipeline.get("name", "pipeline")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_h(name)} — pipeline report</title><style>{_CSS}</style></head><body>",
        f"<h1>{_h(name)} — pipeline report</h1>",
        f"<p>{_h(headline(manifest))}</p>",
        "<nav>" + "".join(f'<a href="#{s.id}">{_h(s.title)}</a>' for s in sections) + "</nav>",
    ]
    for s in sections:
        parts.append(f'<section id="{_h(s.id)}"><h2>{_h(s.title)}</h2>')
        parts.extend(_html_block(b) for b in s.blocks)
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
