"""The search for the least pruning that meets a latency target: pure, deterministic given `measure`.

`measure(ratio) -> latency_ms` is one probe: the student pruned at `ratio`, built for the target
runtime and precision, timed (:mod:`stages.prune_target`). Probes are expensive (an export, a
build, a timing), so the search spends few of them:

1. ratio 0 (the unpruned student): the reference a `speedup` target divides, and one end of the
   bracket; ratio `max_ratio`: the other end. If even `max_ratio` misses the target the search
   stops with :class:`TargetUnreachable`, naming both latencies.
2. Inside the bracket, regula falsi with the Illinois modification: structured channel pruning
   removes a fraction `r` of the channels of both sides of most convolutions, so their cost falls
   about as `(1 - r)^2`, and latency is close to linear in `u = (1 - r)^2`. The next ratio is the
   linear interpolation in `u` towards a point just under the target (half the tolerance below it),
   rounded to `step`; when one end of the bracket is kept twice in a row its weight is halved, so a
   curved latency (per-op overhead, cache effects) cannot stall the search at one end.
3. The search stops when the smallest measured ratio that meets the target measures within
   `tolerance` under it, when the bracket is one `step` wide, or after `max_probes` probes (both
   bracket ends included). The answer is always a measured ratio that met the target: the
   smallest one, so the least pruning found.

A ratio is never measured twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

STEP = 0.01  # ratios probed are multiples of this (the bracket ends excepted)
TOLERANCE = 0.10  # a point this close under the target is good enough


class TargetUnreachable(RuntimeError):
    """Even the largest allowed ratio misses the latency target (the message gives the figures)."""

    def __init__(self, message: str, points: list[tuple[float, float]], target_ms: float):
        super().__init__(message)
        self.points = points
        self.target_ms = target_ms


@dataclass
class SearchResult:
    """The outcome: the chosen ratio, the target in ms, every probe `(ratio, latency_ms)` in the
    order measured, and why the search stopped."""

    ratio: float
    target_ms: float
    points: list[tuple[float, float]] = field(default_factory=list)
    stop: str = ""

    @property
    def latency_ms(self) -> float:
        """The measured latency of the chosen ratio."""
        return dict(self.points)[self.ratio]

    @property
    def within_tolerance(self) -> bool:
        """True when the chosen ratio measured within TOLERANCE under the target."""
        return self.target_ms * (1 - TOLERANCE) <= self.latency_ms <= self.target_ms


def _u(r: float) -> float:
    return (1.0 - r) ** 2


def search(measure: Callable[[float], float], *, target_ms: float | None = None, speedup: float | None = None,
           max_ratio: float = 0.8, max_probes: int = 6, step: float = STEP,
           tolerance: float = TOLERANCE) -> SearchResult:
    """The smallest measured ratio in `[0, max_ratio]` whose latency meets the target.

    The target is `target_ms`, or the unpruned latency divided by `speedup` (exactly one is
    given). Raises :class:`TargetUnreachable` when `max_ratio` misses it, and ValueError for
    arguments no search can use.
    """
    if (target_ms is None) == (speedup is None):
        raise ValueError("give target_ms or speedup, exactly one")
    if max_probes < 2:
        raise ValueError(f"max_probes must be >= 2 (the bracket), got {max_probes}")
    if not 0 < max_ratio < 1:
        raise ValueError(f"max_ratio must be in (0, 1), got {max_ratio}")
    measured: dict[float, float] = {}
    order: list[tuple[float, float]] = []

    def probe(r: float) -> float:
        r = round(r, 6)
        if r not in measured:
            lat = float(measure(r))
            if not (math.isfinite(lat) and lat > 0):
                raise ValueError(f"the probe at ratio {r:g} measured {lat!r} ms")
            measured[r] = lat
            order.append((r, lat))
        return measured[r]

    base = probe(0.0)
    target = float(target_ms) if target_ms is not None else base / float(speedup)  # type: ignore[arg-type]
    if base <= target:
        return SearchResult(0.0, target, order, "the unpruned student already meets the target")
    top = probe(max_ratio)
    if top > target:
        best = f"{base / top:.2f}x" if top > 0 else "?"
        raise TargetUnreachable(
            f"the target {target:.4g} ms is out of reach: even prune.max_ratio = {max_ratio:g} measures {top:.4g} ms "
            f"(unpruned {base:.4g} ms; the largest speedup within max_ratio is {best}); raise prune.max_ratio, relax "
            "the target, or choose a smaller student", order, target)
    aim = target * (1 - tolerance / 2)
    lo, hi = 0.0, round(max_ratio, 6)
    f_lo, f_hi = measured[lo] - aim, measured[hi] - aim
    kept = ""  # which end the last probe left in place, for the Illinois halving
    while True:
        if measured[hi] >= target * (1 - tolerance):
            return SearchResult(hi, target, order, f"within {tolerance:.0%} under the target")
        if hi - lo <= step + 1e-9:
            return SearchResult(hi, target, order, f"the bracket is one step ({step:g}) wide")
        if len(order) >= max_probes:
            return SearchResult(hi, target, order, f"prune.max_probes = {max_probes} reached")
        u_lo, u_hi = _u(lo), _u(hi)
        u = u_lo + f_lo * (u_hi - u_lo) / (f_lo - f_hi) if f_lo != f_hi else (u_lo + u_hi) / 2
        r = 1.0 - math.sqrt(min(max(u, 0.0), 1.0))
        r = round(round(r / step) * step, 6)
        r = min(max(r, round(lo + step, 6)), round(hi - step, 6))
        lat = probe(r)
        if lat <= target:
            hi, f_hi = r, lat - aim
            if kept == "lo":
                f_lo /= 2
            kept = "lo"
        else:
            lo, f_lo = r, lat - aim
            if kept == "hi":
                f_hi /= 2
            kept = "hi"
