"""The INT8 fallback search: keep the fewest most-sensitive layers in floating point until the
INT8 build's metric drop passes its gate, or a limit is hit.

A pure loop over an evaluator, so it is deterministic and testable without a model: given the
quantized layers ranked most sensitive first, ``build_and_eval(excluded)`` builds the INT8 model
with ``excluded`` (a prefix of the ranking) kept in floating point and returns its metric and its
latency. The prefix grows 1, 2, 4, ... layers (one build per doubling, so a long ranking costs
log2(limit) builds, not one per layer); once a size passes, the sizes between the last failing
and the first passing one are bisected, so the build kept is the smallest prefix that passes
among those tried. Every build is recorded as a :class:`Step`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

# Tolerance for float round-off when a drop equals the budget (as the gates use).
_EPS = 1e-9


@dataclass(frozen=True)
class Step:
    """One build of the search: the layers kept in floating point and what it measured."""

    fp_layers: tuple[str, ...]
    metric: float
    drop: float
    latency_p50_ms: float | None
    passed: bool

    def record(self) -> dict:
        """The step as the manifest records it."""
        d = asdict(self)
        d["fp_layers"] = list(self.fp_layers)
        d["fp_layer_count"] = len(self.fp_layers)
        return d


@dataclass
class SearchResult:
    """Every step in the order they ran, and the chosen one (None: no size within the limit passed)."""

    steps: list[Step] = field(default_factory=list)
    chosen: Step | None = None
    stopped: str = ""

    def record(self) -> dict:
        return {"steps": [s.record() for s in self.steps], "stopped": self.stopped,
                "chosen_fp_layers": list(self.chosen.fp_layers) if self.chosen else None}


def sizes(limit: int) -> list[int]:
    """The prefix sizes tried before bisection: 1, 2, 4, ... and the limit itself."""
    out, n = [], 1
    while n < limit:
        out.append(n)
        n *= 2
    if limit > 0:
        out.append(limit)
    return out


def fallback(ranked: list[str], build_and_eval: Callable[[tuple[str, ...]], tuple[float, float | None]],
             fp32_metric: float, max_drop: float, max_fp_layers: int) -> SearchResult:
    """Search the fewest top-ranked layers to keep in floating point so that
    ``fp32_metric - metric <= max_drop``, trying at most ``max_fp_layers`` layers.

    ``ranked``: quantized layer names, most sensitive first. ``build_and_eval(excluded)`` returns
    ``(metric, latency_p50_ms)`` of the INT8 build with ``excluded`` kept in floating point.
    """
    result = SearchResult()
    limit = min(max_fp_layers, len(ranked))
    if limit <= 0:
        result.stopped = "no layer may be kept in floating point (max_fp_layers = 0 or nothing ranked)"
        return result
    tried: dict[int, Step] = {}

    def step(n: int) -> Step:
        if n not in tried:
            excluded = tuple(ranked[:n])
            metric, latency = build_and_eval(excluded)
            drop = fp32_metric - metric
            tried[n] = Step(excluded, float(metric), float(drop), latency, drop <= max_drop + _EPS)
            result.steps.append(tried[n])
        return tried[n]

    low = 0  # the largest size known to fail (0: plain PTQ, which failed)
    high = None
    for n in sizes(limit):
        if step(n).passed:
            high = n
            break
        low = n
    if high is None:
        result.stopped = (f"the limit: {limit} layer(s) in floating point still drop "
                          f"{result.steps[-1].drop * 100:.2f} pt, over the {max_drop * 100:.2f} pt budget")
        return result
    while high - low > 1:  # the smallest passing size between the last failure and the first pass
        mid = (low + high) // 2
        if step(mid).passed:
            high = mid
        else:
            low = mid
    result.chosen = tried[high]
    result.stopped = f"the gate: {high} layer(s) in floating point drop {tried[high].drop * 100:.2f} pt"
    return result
