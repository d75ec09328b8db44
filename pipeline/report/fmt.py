"""Formatting measured values as short strings, and naming the quality metrics.

Quality metrics are fractions 0..1, higher is better: they are shown as percentages, and their
differences in percentage points. Their names come from the tasks' declarations.
"""

from __future__ import annotations

import math
from typing import Any

def metric_label(name: str) -> str:
    """A quality metric's display name as a built-in task declares it ('miou' → 'mIoU'; a
    task's history name, e.g. 'acc', as its primary metric); any other name with its
    underscores as spaces."""
    from pipeline.tasks import known_metrics

    found = known_metrics().get(name)
    return found.label if found else name.replace("_", " ")


def axis_label(name: str) -> str:
    """The label of a plot axis showing this metric (in %), where it says more than the display
    name ('top-1 accuracy'), as a built-in task declares it."""
    from pipeline.tasks import known_metrics

    found = known_metrics().get(name)
    return found.axis_label if found else metric_label(name)


def is_num(x: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt_fixed(value: Any, spec: str, scale: float = 1.0) -> str:
    """`format(value * scale, spec)`, '—' when missing."""
    return "—" if value is None else format(value * scale, spec)


def size_text(n: Any) -> str:
    """Bytes in binary units, '—' when missing: 44770315 → '42.7 MiB'."""
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_pct(x: Any) -> str:
    """0.9375 → '93.75%'; '—' when not measured."""
    return f"{x * 100:.2f}%" if is_num(x) else "—"


def fmt_pt(x: Any) -> str:
    """A difference of two fractions in percentage points: 0.0125 → '+1.25 pt'."""
    return f"{x * 100:+.2f} pt" if is_num(x) else "—"


def fmt_ms(x: Any) -> str:
    """Milliseconds with about three significant digits: 0.0412, 0.44, 6.85, 23.8, 412."""
    if not is_num(x):
        return "—"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 0.1:
        return f"{x:.2f}"
    return f"{x:.4f}"


def fmt_count(x: Any) -> str:
    """11173962 → '11.17 M', 1.16e9 → '1.16 G'."""
    if not is_num(x):
        return "—"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            v = x / div
            return f"{v:.{2 if abs(v) < 10 else 1 if abs(v) < 100 else 0}f} {unit}"
    return f"{x:.0f}"


def fmt_ratio(x: Any) -> str:
    """2.6 → '2.60×'."""
    return f"{x:.2f}×" if is_num(x) else "—"


def fmt_speed(x: Any) -> str:
    """A speed ratio (old time / new time, or new rate / old rate) worded by its direction:
    2.19 → '2.19× faster', 0.64 → '1.56× slower' (never '0.64× faster'); '—' when missing."""
    if not is_num(x) or x <= 0:
        return "—"
    if round(x, 2) == 1.0:
        return "same speed (1.00×)"
    return f"{x:.2f}× faster" if x > 1 else f"{1 / x:.2f}× slower"


def fmt_size(x: Any) -> str:
    """Bytes in binary units: 44770315 → '42.7 MiB'."""
    return size_text(int(x)) if is_num(x) else "—"


def ratio(num: Any, den: Any) -> float | None:
    """num / den, None when either is missing or den is 0."""
    return float(num) / float(den) if is_num(num) and is_num(den) and den else None


def diff(a: Any, b: Any) -> float | None:
    """a - b, None when either is missing."""
    return float(a) - float(b) if is_num(a) and is_num(b) else None
