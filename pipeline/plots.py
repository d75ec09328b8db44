"""Plots for the run report: each function takes plain data and returns PNG bytes.

- `accuracy_vs_latency`: the Pareto view, the task's quality metric (accuracy, mIoU, mAP, ...)
  against latency p50 at batch 1 (log x), one labelled point per artifact, the Pareto front
  highlighted;
- `stage_bars`: the quality metric and latency p50 per artifact, grouped by stage;
- `training_curves`: loss and every recorded `train_*` / `val_*` metric per epoch for every
  artifact with a history.

Quality metrics are fractions 0..1, higher is better, drawn in %. The callers name them
(`metric` for titles, `axis` for the axis label); the defaults are classification's accuracy.

Missing data raises :class:`PlotDataMissing` with a sentence the report shows in place of the
plot: a run that measured nothing yet still gets a report, never a crash. Figures are drawn
with matplotlib's Agg canvas directly (no pyplot), so there is no global figure state and no
display is needed; matplotlib is imported inside the functions so importing this module is free.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PlotDataMissing(Exception):
    """There is not enough data for this plot; the message says what is missing."""


@dataclass(frozen=True)
class Point:
    """One artifact in the quality/latency plane."""

    label: str
    latency_ms: float
    accuracy: float  # the task's quality metric (accuracy, mIoU, mAP, ...), 0..1
    reference: bool = False  # measured for comparison only (baseline, the teacher's own builds)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pareto_front(points: Iterable[Point]) -> list[Point]:
    """The points no other point beats on both axes (lower latency and higher accuracy), sorted
    by latency. A point is dominated when another is at least as fast and as accurate, and
    strictly better on one of the two."""
    pts = [p for p in points if _finite(p.latency_ms) and _finite(p.accuracy)]
    front = [
        p for p in pts
        if not any(
            q.latency_ms <= p.latency_ms and q.accuracy >= p.accuracy
            and (q.latency_ms < p.latency_ms or q.accuracy > p.accuracy)
            for q in pts
        )
    ]
    return sorted(front, key=lambda p: (p.latency_ms, -p.accuracy))


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # No timestamp in the metadata, so the same manifest renders the same bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _a(word: str) -> str:
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def accuracy_vs_latency(points: Sequence[Point], metric: str = "accuracy", axis: str = "top-1 accuracy") -> bytes:
    """The quality metric (%) against latency p50 at batch 1 (ms, log scale), every point
    labelled; the Pareto front is drawn as a step line with filled markers, the rest hollow."""
    pts = [p for p in points if _finite(p.latency_ms) and p.latency_ms > 0 and _finite(p.accuracy)]
    if not pts:
        raise PlotDataMissing(f"no artifact has both {_a(metric)} and a latency p50 yet")
    front = pareto_front(pts)
    on_front = {id(p) for p in front}
    fig, (ax,) = _figure(7.5, 4.6)
    for p in pts:
        best = id(p) in on_front
        ax.scatter(
            [p.latency_ms], [p.accuracy * 100], s=70 if best else 45, zorder=3,
            marker="s" if p.reference else "o",
            facecolors="tab:orange" if best else "none", edgecolors="tab:orange" if best else "tab:blue",
            linewidths=1.5,
        )
    if len(front) > 1:
        # A step line: between two front points the best reachable quality is the slower one's.
        xs = [p.latency_ms for p in front]
        ys = [p.accuracy * 100 for p in front]
        ax.step(xs, ys, where="post", color="tab:orange", alpha=0.6, zorder=2, label="Pareto front")
    ax.set_xscale("log")
    lo, hi = min(p.latency_ms for p in pts), max(p.latency_ms for p in pts)
    ax.set_xlim(lo / 1.6, hi * 1.9)  # room for the labels right of the slowest point
    ax.set_xlabel("latency p50 at batch 1 (ms, log scale)")
    ax.set_ylabel(f"{axis} (%)")
    ax.set_title(f"{metric} vs latency (filled: Pareto front; squares: reference builds)")
    ax.grid(True, which="both", alpha=0.3)
    if len(front) > 1:
        ax.legend(loc="lower right", fontsize=8)
    _place_labels(fig, ax, [(p.label, p.latency_ms, p.accuracy * 100) for p in pts])
    return _png(fig)


# Label positions tried in turn (offset in points, horizontal alignment): right, below, left, ...
_LABEL_SPOTS = ((6, 4, "left"), (6, -11, "left"), (-6, 4, "right"), (-6, -11, "right"),
                (6, 13, "left"), (6, -20, "left"), (-6, 13, "right"), (-6, -20, "right"))


def _place_labels(fig, ax, labels: Sequence[tuple[str, float, float]]) -> None:
    """Annotate points so that labels do not overprint each other: each label takes the first
    spot around its point whose box is free (builds of one model often sit close together)."""
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()  # the final layout, so boxes are measured where they will be drawn
    taken = []
    for text, x, y in sorted(labels, key=lambda t: (t[1], -t[2])):
        ann = None
        for dx, dy, ha in _LABEL_SPOTS:
            if ann is not None:
                ann.remove()
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8, ha=ha)
            box = ann.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in taken):
                break
        taken.append(ann.get_window_extent(renderer))


def stage_bars(rows: Sequence[tuple[str, float | None, float | None]], metric: str = "accuracy",
               axis: str = "top-1 accuracy") -> bytes:
    """Two bar charts side by side, one bar per `(label, quality metric 0..1, latency p50 ms)` row
    in pipeline order: the metric (%) and latency p50 at batch 1 (ms). A missing value leaves a gap."""
    rows = [(lab, a if _finite(a) else None, lat if _finite(lat) else None) for lab, a, lat in rows]
    if not any(a is not None or lat is not None for _, a, lat in rows):
        raise PlotDataMissing(f"no stage has measured {_a(metric)} or a latency yet")
    labels = [r[0] for r in rows]
    fig, (ax_acc, ax_lat) = _figure(max(7.5, 0.9 * len(rows) + 3), 4.4, ncols=2)
    x = list(range(len(rows)))
    accs = [None if a is None else a * 100 for _, a, _ in rows]
    # Scores of one model family differ by a few points: start the axis near them (and say so).
    floor = max(0.0, math.floor(min(a for a in accs if a is not None) - 5)) if any(a is not None for a in accs) else 0.0
    acc_label = f"{axis} (%)" + (f", axis from {floor:.0f}%" if floor > 0 else "")
    for ax, values, color, ylabel, fmt in (
        (ax_acc, accs, "tab:green", acc_label, "{:.1f}"),
        (ax_lat, [lat for _, _, lat in rows], "tab:purple", "latency p50, batch 1 (ms)", "{:.2f}"),
    ):
        base = floor if ax is ax_acc else 0.0
        heights = [0.0 if v is None else v - base for v in values]
        bars = ax.bar(x, heights, bottom=base, color=color, alpha=0.8)
        for bar, v in zip(bars, values):
            ax.annotate("n/a" if v is None else fmt.format(v), (bar.get_x() + bar.get_width() / 2, base + bar.get_height()),
                        xytext=(0, 2), textcoords="offset points", ha="center", fontsize=7)
        ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
    ax_acc.set_title(f"{metric} per artifact")
    ax_lat.set_title("latency per artifact")
    return _png(fig)


# History keys name a metric after "train_" / "val_"; classification spells accuracy "acc".
_CURVE_NAMES = {"acc": "top-1 accuracy"}
_SPLITS = ("train", "val")


def training_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]],
                    metric_names: Mapping[str, str] | None = None) -> bytes:
    """Training loss, and every `train_<metric>` / `val_<metric>` recorded (val_acc, train_acc,
    val_miou, val_map, ...), per epoch, one colour per labelled history (teacher, students,
    pruning's healing); train dashed, val solid. `metric_names` maps a metric to its display
    name ("miou" → "mIoU"). Epochs without a value are skipped."""
    names = {**_CURVE_NAMES, **(metric_names or {})}
    series: dict[str, tuple[list, dict[tuple[str, str], list]]] = {}
    for label, epochs in histories.items():
        epochs = list(epochs or ())
        loss = [(e.get("epoch", i + 1), e.get("loss")) for i, e in enumerate(epochs)]
        loss = [(x, y) for x, y in loss if _finite(x) and _finite(y)]
        keys = dict.fromkeys(k for e in epochs for k in e if isinstance(k, str) and "_" in k
                             and k.split("_", 1)[0] in _SPLITS and k.split("_", 1)[1] != "loss")
        curves = {}
        for key in keys:
            split, metric = key.split("_", 1)
            pts = [(e.get("epoch", i + 1), e.get(key)) for i, e in enumerate(epochs)]
            pts = [(x, y) for x, y in pts if _finite(x) and _finite(y)]
            if pts:
                curves[(split, metric)] = pts
        if loss or curves:
            series[label] = (loss, curves)
    if not series:
        raise PlotDataMissing("no stage recorded a per-epoch training history")
    metrics = list(dict.fromkeys(m for _, curves in series.values() for _, m in curves))
    splits = [s for s in _SPLITS if any(s == sp for _, curves in series.values() for sp, _ in curves)]
    fig, (ax_loss, ax_acc) = _figure(9.5, 4.0, ncols=2)
    colors = [f"C{i % 10}" for i in range(len(series))]
    for color, (label, (loss, curves)) in zip(colors, series.items()):
        if loss:
            ax_loss.plot([x for x, _ in loss], [y for _, y in loss], marker="o", markersize=3, color=color, label=label)
        for (split, metric), pts in curves.items():
            parts = ([split] if len(splits) > 1 else []) + ([names.get(metric, metric)] if len(metrics) > 1 else [])
            ax_acc.plot([x for x, _ in pts], [y * 100 for _, y in pts], marker="o", markersize=3, color=color,
                        linestyle="--" if split == "train" else "-",
                        label=f"{label} ({', '.join(parts)})" if parts else label)
    ax_loss.set_title("training loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    shown = names.get(metrics[0], metrics[0]) if len(metrics) == 1 else "metrics"
    ax_acc.set_title(f"{' / '.join(splits) or 'val'} {shown}")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel(f"{shown} (%)")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _png(fig)
