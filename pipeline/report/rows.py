"""What the report reads from a manifest: the task, the stages in pipeline order, the measured
artifacts with their declared roles, and the lookups between them.

Everything is derived from what the manifest records (`pipeline["task"]`, `pipeline["chain"]`,
each stage's `artifacts` roles), never from artifact names: an artifact without a recorded
role (an older manifest) shows an unknown runtime rather than a guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

from pipeline.gates import gate_value_text
from pipeline.manifest import ArtifactRole, GateResult, Manifest, StageRecord
from pipeline.report.fmt import axis_label, diff, is_num, metric_label
from pipeline.tasks.base import PER_IMAGE_FRACTION
# How a role's runtime is shown, where it is not its own name.
_RUNTIME_LABELS = {"torch": "torch eager"}


@dataclass(frozen=True)
class RecordedTask:
    """The run's task as its manifest records it, and its quality metrics (fractions 0..1,
    higher is better) with the display names the task declared."""

    name: str
    metric: str  # the primary metric: gated, plotted, compared with the teacher
    metrics: tuple[str, ...]  # every quality metric recorded, the primary one first
    labels: dict[str, str] = field(default_factory=dict)  # metric → display name, as recorded
    axes: dict[str, str] = field(default_factory=dict)  # metric → plot axis label, as recorded
    history: str = ""  # the primary metric's name in per-epoch histories (val_<history>)

    @property
    def label(self) -> str:
        """The primary metric's display name: 'accuracy', 'mIoU', 'mAP'."""
        return self.label_of(self.metric)

    def label_of(self, metric: str) -> str:
        """A metric's display name: as the run recorded it, else as a built-in task declares it."""
        return self.labels.get(metric) or metric_label(metric)

    def axis_of(self, metric: str) -> str:
        """A plot axis label for a metric (in %): as recorded, else as a built-in task declares it."""
        return self.axes.get(metric) or axis_label(metric)

    def curve_names(self) -> dict[str, str]:
        """Axis labels of every metric as per-epoch histories name them (the primary one also by
        its history name)."""
        names = {m: self.axis_of(m) for m in self.metrics}
        if self.history and self.history not in names:
            names[self.history] = self.axis_of(self.metric)
        return names

    @property
    def others(self) -> tuple[str, ...]:
        """The quality metrics besides the primary one."""
        return tuple(m for m in self.metrics if m != self.metric)


def task_of(manifest: Manifest) -> RecordedTask:
    """The task recorded in `pipeline["task"]`; the default task when absent (manifests written
    before the task was recorded)."""
    from pipeline.tasks import DEFAULT_TASK, get_task

    default = get_task(DEFAULT_TASK)
    raw = manifest.model.pipeline.get("task")
    raw = raw if isinstance(raw, dict) else {"name": default.name, "metric": default.metric,
                                             "metrics": list(default.metrics), "history": default.history_metric}
    metric = raw.get("metric")
    metric = metric if isinstance(metric, str) and metric else default.metric
    listed = raw.get("metrics") if isinstance(raw.get("metrics"), list) else []
    metrics = [metric] + [m for m in listed if isinstance(m, str) and m and m != metric]

    def names(key: str) -> dict[str, str]:
        found = raw.get(key)
        return {str(k): str(v) for k, v in found.items() if v} if isinstance(found, dict) else {}

    return RecordedTask(str(raw.get("name") or default.name), metric, tuple(dict.fromkeys(metrics)),
                        labels=names("labels"), axes=names("axes"), history=str(raw.get("history") or ""))


def runtime_label(runtime: str | None) -> str:
    """'torch' → 'torch eager'; '—' when unknown."""
    return _RUNTIME_LABELS.get(runtime, runtime) if runtime else "—"


def ordered_stages(manifest: Manifest) -> list[tuple[str, StageRecord]]:
    """Stages in pipeline order (`pipeline["chain"]`), stages outside the chain after, as
    recorded; the recorded order when the manifest has no chain."""
    chain = manifest.model.pipeline.get("chain")
    order = {str(s): i for i, s in enumerate(chain)} if isinstance(chain, list) else {}
    names = list(manifest.stages)
    return [(n, manifest.stages[n]) for n in sorted(names, key=lambda n: (order.get(n, len(order)), names.index(n)))]


def plain(x: Any) -> Any:
    """A pydantic model (or containers of them) as plain dicts and lists."""
    if hasattr(x, "model_dump"):
        return plain(x.model_dump(mode="json"))
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def target_order(manifest: Manifest) -> list[str]:
    """Deployment targets in the order their builds appear in the pipeline (from the roles)."""
    targets: list[str] = []
    for _, rec in ordered_stages(manifest):
        for role in rec.artifacts.values():
            if role.target and role.target not in targets:
                targets.append(role.target)
    return targets


def ship_choices(manifest: Manifest) -> dict[str, dict[str, Any]]:
    """The build chosen to ship per target (`manifest.model.ship`), as plain dicts, targets in
    pipeline order (others after, as recorded); {} when this manifest has no such section."""
    ship = plain(getattr(manifest.model, "ship", None) or {})
    if not isinstance(ship, dict):
        return {}
    order = {t: i for i, t in enumerate(target_order(manifest))}
    items = [(str(k), v) for k, v in ship.items() if isinstance(v, dict)]
    items.sort(key=lambda kv: order.get(kv[0], len(order)))  # stable: unknown targets keep their order
    return dict(items)


def deploy_file(manifest: Manifest, artifact: str | None) -> str:
    """The file to deploy for a recorded artifact, relative to the run directory (an OpenVINO
    IR is its `.xml` and the `.bin` beside it); '—' when no such output is recorded."""
    if not artifact:
        return "—"
    found = manifest.artifact_index().get(artifact)
    if found is None:
        return "—"
    path = found[1].path
    if path.lower().endswith(".xml"):
        return f"{path} (+ {PurePosixPath(path).with_suffix('.bin').name})"
    return path


def per_image_metric(manifest: Manifest, metric: str) -> bool:
    """Whether the metric is a share of the validation images (its unit, as the manifest
    records it), so that one image is 1/N of it: top-1 accuracy yes, mIoU and mAP no."""
    from pipeline.tasks import known_metrics

    unit = manifest.model.metric_units.get(metric)
    if not isinstance(unit, dict):  # not recorded: as a built-in task declares it
        declared = known_metrics().get(metric)
        unit = {"unit": declared.unit} if declared else {}
    return unit.get("unit") == PER_IMAGE_FRACTION


@dataclass
class ArtifactRow:
    """One measured artifact: where it came from, its declared role, and what was measured."""

    stage: str
    name: str
    status: str
    reference: bool
    metrics: dict[str, Any]
    gates: list[GateResult] = field(default_factory=list)
    role: ArtifactRole | None = None  # None: not recorded (a manifest older than roles)

    @property
    def runtime(self) -> str:
        """Where it was measured: torch eager, onnxruntime, openvino, tensorrt; '—' if unknown.
        A `runtime` entry in the artifact's metrics wins over the role."""
        return str(self.metrics.get("runtime") or runtime_label(self.role.runtime if self.role else None))

    @property
    def precision(self) -> str:
        """fp32, fp16 or int8; '—' if unknown. A `precision` entry in the metrics wins."""
        return str(self.metrics.get("precision") or (self.role.precision if self.role else None) or "—")

    @property
    def model(self) -> str | None:
        """Whose build this is: teacher, student, baseline; None when no role is recorded."""
        return self.role.model if self.role else None

    @property
    def is_teacher(self) -> bool:
        """The teacher in torch: what every 'vs teacher' figure compares with."""
        return self.role is not None and self.role.model == "teacher" and self.role.runtime == "torch"

    @property
    def latency_note(self) -> str | None:
        """Why the measured latency is not the target's (the build is never latency-gated)."""
        return self.role.latency_note if self.role else None


def measured_artifacts(manifest: Manifest) -> list[ArtifactRow]:
    """Every artifact with a measured quality metric or latency, in pipeline order."""
    task = task_of(manifest)
    rows = []
    for stage, rec in ordered_stages(manifest):
        for name, m in rec.metrics.items():
            role = rec.artifacts.get(name)
            if not isinstance(m, dict) or (role is not None and role.model == "none"):
                continue
            if any(k in m for k in task.metrics) or "latency_p50_ms" in m:
                row = ArtifactRow(stage, name, rec.status, False, m, [g for g in rec.gates if g.artifact == name], role)
                # The teacher in torch is the baseline of every comparison, not a reference row.
                row.reference = name in rec.reference or (role is not None and role.reference and not row.is_teacher)
                rows.append(row)
    return rows


def validation_images(rows: list[ArtifactRow]) -> list[int]:
    """The validation set sizes the quality figures were measured on (one, normally), as
    the runner records them with every artifact (`val_images`); [] in older manifests."""
    return sorted({int(r.metrics["val_images"]) for r in rows if is_num(r.metrics.get("val_images"))})


def teacher_row(rows: list[ArtifactRow]) -> ArtifactRow | None:
    """The teacher's torch build (role model teacher, runtime torch), when it was measured."""
    return next((r for r in rows if r.is_teacher), None)


def delta_vs_teacher(row: ArtifactRow, teacher: ArtifactRow | None, metric: str) -> float | None:
    """The row's metric minus the teacher's; None for the teacher itself or when unmeasured."""
    if teacher is None or row is teacher:
        return None
    return diff(row.metrics.get(metric), teacher.metrics.get(metric))


def same_runtime_teacher(name: str, by_name: dict[str, ArtifactRow]) -> str | None:
    """Name of the teacher's own FP32 build on `name`'s runtime, when that build was measured:
    only against it does a speedup say what compression bought (torch eager at small inputs is
    dominated by per-op overhead). None for the teacher's builds, artifacts without a role, and
    builds whose latency is not their target's (`latency_note`)."""
    row = by_name.get(name)
    if row is None or row.role is None or row.role.model == "teacher" or not row.role.runtime or row.latency_note:
        return None
    return next((n for n, r in by_name.items() if r.role is not None and r.role.model == "teacher"
                 and r.role.runtime == row.role.runtime and r.role.precision == "fp32"), None)


def int8_pairs(rows: list[ArtifactRow]) -> list[tuple[ArtifactRow, ArtifactRow]]:
    """(INT8 build, its FP32 counterpart on the same runtime) for every measured build whose
    role names an `fp32` counterpart that was measured too, in pipeline order."""
    by_name = {r.name: r for r in rows}
    return [(r, by_name[r.role.fp32]) for r in rows if r.role is not None and r.role.fp32 in by_name]


def training_method(row: ArtifactRow, method: str) -> str:
    """How a distill-stage artifact was trained: the configured method for the student, the
    task loss alone for the baseline, '—' when its role is not recorded."""
    return {"student": method, "baseline": "none (task loss only)"}.get(row.model or "", "—")


def gate_text(g: GateResult) -> str:
    """'max_accuracy_drop ok' / 'latency_ms FAIL' / '… not measured'."""
    verdict = "ok" if g.passed else "FAIL" if g.passed is False else "not measured"
    return f"{g.gate} {verdict}"


def gate_value(g: GateResult, which: str = "value") -> str:
    """A gate's measured value or budget in its unit: quality drops in points ('0.28 pt'),
    speedups as ratios, latencies in ms; '—' when not measured."""
    return gate_value_text(g.gate, g.value if which == "value" else g.budget)


def cached_state(rec: StageRecord, run_started: str, last_run: dict | None = None, name: str = "") -> str:
    """Whether the last run re-used this stage from the cache: from the runner's `last_run`
    record ('yes', 'no', or 'not run' for a stage the last run did not visit); manifests
    written before that record existed fall back to comparing timestamps. Only records the
    cache can re-use (ok, gate_failed, unavailable) can be cached."""
    if rec.status not in ("ok", "gate_failed", "unavailable"):
        return "—"
    if isinstance(last_run, dict) and name:
        if name in last_run.get("cached", []):
            return "yes"
        return "no" if name in last_run.get("visited", []) else "not run"
    try:
        ended, started = datetime.fromisoformat(rec.ended), datetime.fromisoformat(run_started)
    except (TypeError, ValueError):
        return "?"
    return "yes" if ended < started else "no"
