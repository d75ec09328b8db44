"""Prune to a latency target: which build is timed, the probe at one ratio, the search's record.

A user states a budget (`[prune] target_latency_ms`, p50 at batch 1 on `target_build`) or a
speedup over the unpruned student on that build (`target_speedup`); the ratio is searched
(:mod:`stages.ratio_search`). One probe at ratio `r`:

1. a copy of the student pruned at `r` by the prune stage's own Torch-Pruning setup
   (:func:`stages.prune.make_pruner`: the same ignored layers, `round_to`, `steps`), not healed.
   The channel counts, all a latency depends on, do not depend on which channels go, so `taylor`
   importance is replaced by `magnitude` here (no gradient pass per probe);
2. built the way a later stage builds `target_build`, through the probe that stage declares
   (:class:`pipeline.stage.Probe`: export, conversion, INT8 calibrated on a few images), so this
   module names no runtime;
3. timed by the shared harness (:func:`pipeline.bench.measure_latency`) at batch 1 with the
   configured threads: the median over `BLOCKS` blocks of `[bench] runs` runs, so one burst of
   load on the machine moves one block, not the figure. Probes run back to back in one process.

MACs and params of every probed network are recorded. The probes are kept in
`<workdir>/prune/latency_search.json`, keyed on everything a probe's latency depends on (the
student's weights, the build and its config tables, the input size, threads, `[bench]`, the
pruning structure, package versions, this machine), not on the target: a re-run, or a run
with another target, re-uses them instead of timing again.

Before anything trains (:func:`preflight`), the bracket (ratio 0 and `max_ratio`) is probed on
an untrained student of the same architecture: latency depends on the architecture, not the
weights, so a target out of reach is refused with exit code 2 before hours of training.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import platform
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.bench import measure_latency, resolve_threads
from pipeline.errors import ConfigError
from pipeline.evaluate import count_macs, count_params
from pipeline.manifest import atomic_write_bytes
from pipeline.stage import Probe, ProbeSpec, Stage, load_stages, probe_builds
from stages.ratio_search import SearchResult, TargetUnreachable, search

log = logging.getLogger(__name__)

RECORD = "latency_search.json"
PREFLIGHT_RECORD = "latency_preflight.json"
BLOCKS = 5  # timed blocks per probe; the probe's latency is their median
CALIBRATION_IMAGES = 8  # images an INT8 probe calibrates on (timing only: accuracy is not judged on probes)
MACHINE_NOTE = ("A budget in ms holds on the machine that measured it (this one); use target_speedup for a "
                "budget that travels (CI, another host)")


def _target_keys(cfg) -> str:
    return "prune.target_latency_ms" if cfg.prune.target_latency_ms is not None else "prune.target_speedup"


def resolve_build(cfg, stages: list[Stage] | None = None) -> tuple[str, Stage, Probe]:
    """The build a target is timed on: `[prune] target_build`, or the first build a later stage
    declares as its preferred probe (`Probe.default`), or the first build there is.

    Raises :class:`ConfigError` naming the builds this config makes when it names none of them,
    and saying why when the build cannot be made or timed on this machine.
    """
    stages = stages or load_stages()
    builds = probe_builds(cfg, stages)
    name = cfg.prune.target_build
    if not builds:
        raise ConfigError(f"{_target_keys(cfg)}: no enabled stage after prune makes a build to time it on; enable "
                          "[onnx] (and [openvino] or [tensorrt]) or use prune.ratio")
    if not name:
        name = next((n for n, (_, p) in builds.items() if p.default and p.unavailable(cfg) is None),
                    next(iter(builds)))
    if name not in builds:
        declared = {a: s for s in stages for a in s.probes}
        if name in declared:
            why = f"this config does not build it (enable [{declared[name].name}] and the build in it)"
        else:
            why = "no stage declares such a build"
        raise ConfigError(f"prune.target_build = {name!r}: {why}; builds this config makes: {', '.join(builds)}")
    stage, probe = builds[name]
    missing = probe.unavailable(cfg)
    if missing:
        raise ConfigError(f"prune.target_build = {name!r} cannot be built and timed on this machine: {missing}; "
                          "time another build, or search on the target machine")
    return name, stage, probe


def extra_reads(cfg) -> tuple[str, ...]:
    """The tables a targeted prune stage also depends on: `[bench]` (threads, runs) and the tables
    of the build it times. Nothing without a target (the ratio mode's key is unchanged)."""
    if not cfg.prune.enabled or not cfg.prune.targeted:
        return ()
    try:
        _, stage, probe = resolve_build(cfg)
    except ConfigError:
        return ("bench",)  # preflight refuses the config before the key matters
    return ("bench", stage.name, *probe.reads)


def time_build(runtime: Any, input_shape: tuple[int, int, int], bench: Any, *, macs: int) -> tuple[float, float]:
    """(p50, p90) in ms at batch 1: medians over BLOCKS blocks of the shared harness (`bench.runs`
    runs each, `bench.warmup` before the first). `macs` is unused here; a fake timer in the tests
    derives its latency from it."""
    blocks = [measure_latency(runtime, input_shape, 1, warmup=bench.warmup if i == 0 else 0, runs=bench.runs)
              for i in range(BLOCKS)]
    return statistics.median(b.p50_ms for b in blocks), statistics.median(b.p90_ms for b in blocks)


@dataclass
class Prober:
    """One probe per call: `prober(ratio)` prunes a copy of `student`, builds it with `probe` and
    times it; returns the point as a dict (ratio, latency_p50_ms, latency_p90_ms, macs, params, seconds)."""

    cfg: Any
    task: Any
    probe: Probe
    student: torch.nn.Module
    input_shape: tuple[int, int, int]
    calibration: list
    work_dir: Path
    timer: Callable[..., tuple[float, float]] | None = None

    def __call__(self, ratio: float) -> dict[str, Any]:
        import time

        from stages.pruning import make_pruner

        t0 = time.perf_counter()
        model = copy.deepcopy(self.student).cpu().eval()
        if ratio > 0:
            pcfg = self.cfg.prune.model_copy(update={"ratio": ratio, "importance": (
                "magnitude" if self.cfg.prune.importance == "taylor" else self.cfg.prune.importance)})
            example = torch.zeros(1, *self.input_shape)
            with torch.random.fork_rng():
                pruner = make_pruner(model, example, pcfg, self.cfg.distill.student, self.task, log_level=logging.DEBUG)
                for _ in range(pcfg.steps):
                    pruner.step()
            model.zero_grad(set_to_none=True)
        macs, params = count_macs(model, self.input_shape), count_params(model)
        threads = torch.get_num_threads()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            with tempfile.TemporaryDirectory(dir=self.work_dir, prefix=".probe-") as tmp:
                spec = ProbeSpec(self.input_shape, resolve_threads(self.cfg.bench.threads), Path(tmp), self.calibration,
                                 self.task, self.cfg)
                runtime = self.probe.build(model, spec)
                p50, p90 = (self.timer or time_build)(runtime, self.input_shape, self.cfg.bench, macs=macs)
                del runtime
        finally:
            torch.set_num_threads(threads)
        point = {"ratio": ratio, "latency_p50_ms": p50, "latency_p90_ms": p90, "macs": int(macs), "params": int(params),
                 "seconds": round(time.perf_counter() - t0, 2)}
        log.info("prune: probe at ratio %.2f: p50 %.3f ms, p90 %.3f ms, %.3g MACs, %.3g params (%.1f s)", ratio, p50,
                 p90, macs, params, point["seconds"])
        return point


class Record:
    """The probes measured so far under one key, on disk as JSON (rewritten atomically after each)."""

    def __init__(self, path: Path | None, key: str):
        self.path, self.key = path, key
        self.points: dict[float, dict[str, Any]] = {}
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = {}
            if isinstance(data, dict) and data.get("key") == key:
                self.points = {round(float(p["ratio"]), 6): p for p in data.get("points", [])}

    def measure(self, prober: Callable[[float], dict[str, Any]], reused: set[float]) -> Callable[[float], float]:
        """A `measure(ratio) -> p50` for the search: a recorded point is reused (and noted in
        `reused`), a new one is probed and saved at once."""

        def measure(ratio: float) -> float:
            r = round(ratio, 6)
            if r in self.points:
                reused.add(r)
            else:
                self.points[r] = prober(r)
                self._save()
            return float(self.points[r]["latency_p50_ms"])

        return measure

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {"key": self.key, "points": sorted(self.points.values(), key=lambda p: p["ratio"])}
        atomic_write_bytes(self.path, json.dumps(body, indent=1).encode())


def _key(cfg, build: str, stage: Stage, probe: Probe, input_shape, weights: str) -> str:
    """What a probe's latency depends on (not the target: the points serve any target)."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "torch-pruning", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    p = cfg.prune
    payload = {
        "weights": weights, "build": build, "arch": cfg.distill.student, "input": list(input_shape),
        "tables": {t: getattr(cfg, t).model_dump(mode="json") for t in dict.fromkeys((stage.name, *probe.reads))},
        "bench": cfg.bench.model_dump(mode="json"), "threads": resolve_threads(cfg.bench.threads),
        "prune": {"steps": p.steps, "round_to": p.round_to, "ignore_layers": p.ignore_layers,
                  "importance": p.importance},
        "versions": versions, "machine": [platform.node(), platform.machine(), platform.processor(),
                                          resolve_threads(0)],
        "blocks": BLOCKS, "calibration_images": CALIBRATION_IMAGES,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _run_search(cfg, measure: Callable[[float], float]) -> SearchResult:
    p = cfg.prune
    return search(measure, target_ms=p.target_latency_ms, speedup=p.target_speedup, max_ratio=p.max_ratio,
                  max_probes=p.max_probes)


def _random_calibration(input_shape) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(1, *input_shape, generator=g),) for _ in range(CALIBRATION_IMAGES)]


def search_ratio(ctx, student: torch.nn.Module) -> dict[str, Any]:
    """Search the ratio for the stage's target on the trained `student`; return the manifest's
    record of the search (`chosen_ratio` is the answer). Raises :class:`TargetUnreachable` (a
    stage failure naming the latencies) when even `max_ratio` misses the target."""
    cfg = ctx.cfg
    # Which build is found from every stage's enabled flag; the chosen one's tables are in the key.
    build, stage, probe = resolve_build(getattr(cfg, "unscoped", cfg))
    images = []
    for batch in ctx.data.loader("calibration", 1):
        images.append((batch[0][:1].cpu(),))
        if len(images) >= CALIBRATION_IMAGES:
            break
    weights = hashlib.sha256(Path(ctx.inputs["student"]).read_bytes()).hexdigest()
    shape = tuple(ctx.data.input_shape)
    record = Record(ctx.out_dir / RECORD, _key(cfg, build, stage, probe, shape, weights))
    prober = Prober(cfg, ctx.task, probe, student, shape, images or _random_calibration(shape), ctx.out_dir)
    reused: set[float] = set()
    result = _run_search(cfg, record.measure(prober, reused))
    role = stage.artifacts[build]
    points = [{**record.points[r], "reused": r in reused} for r, _ in result.points]
    log.info("prune: ratio %.2f meets %.4g ms on %s (%.4g ms measured; %d probes, %d timed now): %s", result.ratio,
             result.target_ms, build, result.latency_ms, len(points), len(points) - len(reused), result.stop)
    p = cfg.prune
    return {
        "target_latency_ms": p.target_latency_ms, "target_speedup": p.target_speedup, "target_ms": result.target_ms,
        "build": build, "runtime": role.runtime, "precision": role.precision,
        "threads": resolve_threads(cfg.bench.threads), "input_shape": list(shape), "batch": 1,
        "blocks": BLOCKS, "runs_per_block": cfg.bench.runs, "max_ratio": p.max_ratio, "max_probes": p.max_probes,
        "probes": points, "probes_used": len(points), "probes_timed_now": len(points) - len(reused),
        "chosen_ratio": result.ratio, "chosen_latency_ms": result.latency_ms,
        "unpruned_latency_ms": float(record.points[0.0]["latency_p50_ms"]),
        "within_tolerance": result.within_tolerance, "stop": result.stop, "note": MACHINE_NOTE,
    }


def preflight(cfg, student: torch.nn.Module) -> None:
    """Before training: the target build exists and runs here, and the bracket on an untrained
    `student` of the same architecture reaches the target. Raises :class:`ConfigError`."""
    build, stage, probe = resolve_build(cfg)
    from pipeline.tasks import task_for
    from stages.pruning import ignored_modules, too_narrow

    task = task_for(cfg)
    at_max = cfg.prune.model_copy(update={"ratio": cfg.prune.max_ratio})
    try:
        too_narrow(student, ignored_modules(student, at_max, task), at_max)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("prune.ratio =", "prune.max_ratio =")) from None
    shape = (3, cfg.data.image_size, cfg.data.image_size)
    folder = cfg.workdir / "prune" if cfg.workdir.is_dir() else None
    record = Record(folder / PREFLIGHT_RECORD if folder else None,
                    _key(cfg, build, stage, probe, shape, "untrained"))
    prober = Prober(cfg, task, probe, student, shape, _random_calibration(shape), folder or Path(tempfile.gettempdir()))
    reused: set[float] = set()
    measure = record.measure(prober, reused)
    p = cfg.prune
    try:
        search(measure, target_ms=p.target_latency_ms, speedup=p.target_speedup, max_ratio=p.max_ratio, max_probes=2)
    except TargetUnreachable as exc:
        raise ConfigError(f"{_target_keys(cfg)}: on {build}, measured before training on an untrained "
                          f"{cfg.distill.student} (latency follows the architecture, not the weights), {exc}") from None
