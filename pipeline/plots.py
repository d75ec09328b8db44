"""Plots for the run report: each function takes plain data and returns PNG bytes.

- `accuracy_vs_latency`: the Pareto view, the task's quality metric (accuracy, mIoU, mAP, ...)
  against latency p50 at batch 1 (log x), one labelled point per artifact coloured by runtime,
  the Pareto front of the candidates (reference builds excluded) highlighted;
- `stage_bars`: the quality metric and latency p50 per artifact, grouped by stage;
- `latency_vs_ratio`: a latency search's probes (latency p50 against the pruning ratio), the target
  line and the chosen ratio;
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
    reference: bool = False  # measured for comparison only (the teacher's builds, the baseline): never on the front
    runtime: str = ""  # where it was measured (torch eager, onnxruntime, ...): one colour each, named in the legend


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


def accuracy_vs_latency(points: Sequence[Point], metric: str = "quality", axis: str = "quality metric") -> bytes:
    """The quality metric (%) against latency p50 at batch 1 (ms, log scale): see
    :func:`pareto_figure`."""
    fig, _ = pareto_figure(points, metric, axis)
    return _png(fig)


_UNKNOWN_RUNTIME = "runtime not recorded"


def pareto_figure(points: Sequence[Point], metric: str = "quality", axis: str = "quality metric"):
    """The Pareto view as a figure, and its point labels (matplotlib Text artists, so that a
    check can measure where they were drawn). One colour per runtime, named in the legend;
    candidates are filled circles, reference builds hollow squares; the Pareto front is taken
    over the candidates only (a reference build is what they are compared with, not an option)
    and drawn as a step line through ringed points. Every point is labelled, each label where
    it covers no other label and no point."""
    pts = [p for p in points if _finite(p.latency_ms) and p.latency_ms > 0 and _finite(p.accuracy)]
    if not pts:
        raise PlotDataMissing(f"no artifact has both {_a(metric)} and a latency p50 yet")
    from matplotlib.lines import Line2D

    front = pareto_front([p for p in pts if not p.reference])
    on_front = {id(p) for p in front}
    runtimes = list(dict.fromkeys(p.runtime or _UNKNOWN_RUNTIME for p in pts))
    colour = {rt: f"C{i % 10}" for i, rt in enumerate(runtimes)}
    fig, (ax,) = _figure(9.0, 5.0)
    for p in pts:
        c = colour[p.runtime or _UNKNOWN_RUNTIME]
        x, y = [p.latency_ms], [p.accuracy * 100]
        if p.reference:
            ax.scatter(x, y, s=50, marker="s", facecolors="none", edgecolors=c, linewidths=1.5, zorder=3)
        else:
            best = id(p) in on_front
            ax.scatter(x, y, s=80 if best else 45, marker="o", color=c, zorder=3,
                       edgecolors="black" if best else c, linewidths=1.4 if best else 0.5)
    if len(front) > 1:
        # A step line: between two front points the best reachable quality is the slower one's.
        ax.step([p.latency_ms for p in front], [p.accuracy * 100 for p in front], where="post", color="0.35",
                linestyle="--", linewidth=1, zorder=2)
    ax.set_xscale("log")
    lo, hi = min(p.latency_ms for p in pts), max(p.latency_ms for p in pts)
    ax.set_xlim(lo / 2.2, hi * 2.6)  # room for the labels left of the fastest and right of the slowest point
    ax.margins(y=0.15)
    ax.set_xlabel("latency p50 at batch 1 (ms, log scale)")
    ax.set_ylabel(f"{axis} (%)")
    ax.set_title(f"{metric} vs latency")
    ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], marker="o", linestyle="", color=colour[rt], label=rt) for rt in runtimes]
    handles.append(Line2D([], [], marker="o", linestyle="--", color="0.35", markerfacecolor="white",
                          markeredgecolor="black", label="Pareto front (candidates)"))
    if any(p.reference for p in pts):
        handles.append(Line2D([], [], marker="s", linestyle="", markerfacecolor="none", markeredgecolor="0.35",
                              label="reference build (not a candidate)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    labels = _place_labels(fig, ax, [(p.label, p.latency_ms, p.accuracy * 100) for p in pts])
    return fig, labels


# Label positions tried in turn around a point (offset direction in points, alignment), then
# the same directions further out with a leader line: the first spot that is free wins.
_LABEL_SPOTS = ((1, 0, "left"), (-1, 0, "right"), (0, 1, "center"), (0, -1, "center"),
                (1, 1, "left"), (1, -1, "left"), (-1, 1, "right"), (-1, -1, "right"))
_LABEL_STEP = 7  # points
_MARKER_HALF = 6  # pixels: half the size of the largest marker
# A label stays legible where it crosses the front's line or the grid.
_LABEL_BOX = dict(boxstyle="square,pad=0.1", facecolor="white", edgecolor="none", alpha=0.8)


def _text_box(ann, renderer):
    """Where an annotation's text is drawn, in pixels: the text alone, not its leader line."""
    from matplotlib.text import Text

    ann.update_positions(renderer)  # an annotation places its text only when asked (or drawn)
    return Text.get_window_extent(ann, renderer)


def _place_labels(fig, ax, labels: Sequence[tuple[str, float, float]]) -> list:
    """Annotate points so that no label overprints another label or a point and every label
    stays inside the axes: each label takes the first free spot around its point, nearest
    first (builds of one model often sit close together). Returns the labels' Text artists."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()  # the final layout, so boxes are measured where they will be drawn
    frame = ax.get_window_extent(renderer)
    marks = [ax.transData.transform((x, y)) for _, x, y in labels]
    taken = [Bbox.from_extents(mx - _MARKER_HALF, my - _MARKER_HALF, mx + _MARKER_HALF, my + _MARKER_HALF)
             for mx, my in marks]
    placed = []
    for text, x, y in sorted(labels, key=lambda t: (t[1], -t[2])):
        first = None
        for ring in range(1, 7):
            for dx, dy, ha in _LABEL_SPOTS:
                ann = ax.annotate(text, (x, y), xytext=(dx * _LABEL_STEP * ring, dy * _LABEL_STEP * ring),
                                  textcoords="offset points", fontsize=8, ha=ha, va="center", bbox=_LABEL_BOX,
                                  arrowprops=dict(arrowstyle="-", color="0.55", lw=0.6) if ring > 1 else None)
                box = _text_box(ann, renderer)
                inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
                if inside and not any(box.overlaps(b) for b in taken):
                    first = (ann, box)
                    break
                ann.remove()
            if first:
                break
        if first is None:  # nowhere free (a crowded plot): right of the point, as before
            ann = ax.annotate(text, (x, y), xytext=(_LABEL_STEP, 0), textcoords="offset points", fontsize=8,
                              ha="left", va="center", bbox=_LABEL_BOX)
            first = (ann, _text_box(ann, renderer))
        taken.append(first[1])
        placed.append(first[0])
    return placed


def stage_bars(rows: Sequence[tuple[str, float | None, float | None]], metric: str = "quality",
               axis: str = "quality metric") -> bytes:
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


def latency_vs_ratio(points: Sequence[tuple[float, float]], target_ms: float, chosen: float | None,
                     build: str = "") -> bytes:
    """A latency search: each probe's latency p50 (ms) against its pruning ratio, in probe order
    (numbered), the target as a horizontal line and the chosen ratio ringed."""
    pts = [(r, lat) for r, lat in points if _finite(r) and _finite(lat)]
    if not pts:
        raise PlotDataMissing("the search recorded no probe")
    fig, (ax,) = _figure(6.4, 4.0)
    ordered = sorted(pts)
    ax.plot([r for r, _ in ordered], [lat for _, lat in ordered], "-", color="tab:gray", alpha=0.5, zorder=1)
    meets = [_finite(target_ms) and lat <= target_ms for _, lat in pts]
    ax.scatter([r for r, _ in pts], [lat for _, lat in pts], c=["tab:green" if m else "tab:red" for m in meets],
               zorder=2, label="probe (green: meets the target)")
    for i, (r, lat) in enumerate(pts, 1):
        ax.annotate(str(i), (r, lat), xytext=(4, 4), textcoords="offset points", fontsize=8)
    if _finite(target_ms):
        ax.axhline(target_ms, color="tab:blue", linestyle="--", label=f"target {target_ms:.3g} ms")
    hit = [(r, lat) for r, lat in pts if chosen is not None and abs(r - chosen) < 1e-9]
    if hit:
        ax.scatter([hit[0][0]], [hit[0][1]], s=220, facecolors="none", edgecolors="black", linewidths=1.5, zorder=3,
                   label=f"chosen ratio {hit[0][0]:.2f}")
    ax.set_xlabel("pruning ratio (fraction of channels removed)")
    ax.set_ylabel(f"latency p50, batch 1 (ms){' on ' + build if build else ''}")
    ax.set_title("latency search: probes in the order measured")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


_SPLITS = ("train", "val")
_TERM_STYLES = ((0, (4, 2)), ":", "-.", (0, (1, 3)), (0, (6, 2, 1, 2)))  # task, mgd, kd, ...


def training_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]],
                    metric_names: Mapping[str, str] | None = None) -> bytes:
    """Training loss, and every `train_<metric>` / `val_<metric>` recorded (val_acc, train_acc,
    val_miou, val_map, ...), per epoch, one colour per labelled history (teacher, students,
    pruning's healing); train dashed, val solid. A history whose loss has several terms
    (`loss_task`, `loss_mgd`, `loss_kd`) also gets each term on the loss panel, in its colour
    with a line style per term, so the plot shows whether distillation pulls. `metric_names`
    maps a metric, as a history names it after "train_" / "val_", to its display name ("miou" →
    "mIoU"). Epochs without a value are skipped."""
    names = dict(metric_names or {})
    series: dict[str, tuple[list, dict[tuple[str, str], list]]] = {}
    term_series: dict[str, dict[str, list]] = {}
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
        terms = {}
        for key in dict.fromkeys(k for e in epochs for k in e if isinstance(k, str) and k.startswith("loss_")
                                 and "[" not in k):
            pts = [(e.get("epoch", i + 1), e.get(key)) for i, e in enumerate(epochs)]
            pts = [(x, y) for x, y in pts if _finite(x) and _finite(y)]
            if pts:
                terms[key[5:]] = pts
        if len(terms) > 1:
            term_series[label] = terms
    if not series:
        raise PlotDataMissing("no stage recorded a per-epoch training history")
    metrics = list(dict.fromkeys(m for _, curves in series.values() for _, m in curves))
    splits = [s for s in _SPLITS if any(s == sp for _, curves in series.values() for sp, _ in curves)]
    fig, (ax_loss, ax_acc) = _figure(9.5, 4.0, ncols=2)
    colors = [f"C{i % 10}" for i in range(len(series))]
    for color, (label, (loss, curves)) in zip(colors, series.items()):
        if loss:
            ax_loss.plot([x for x, _ in loss], [y for _, y in loss], marker="o", markersize=3, color=color, label=label)
        for style, (term, pts) in zip(_TERM_STYLES, term_series.get(label, {}).items()):
            ax_loss.plot([x for x, _ in pts], [y for _, y in pts], color=color, linestyle=style, linewidth=1,
                         label=f"{label}: {term}")
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
