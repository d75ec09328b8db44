"""The runner: walks the registered stages in order, caches, measures, gates, records.

For each enabled stage it resolves the input artifacts from the manifest (re-hashing them),
computes the cache key (stage name, its config tables, the seed, input hashes, package
versions) and skips the stage when the manifest holds an `ok` record with the same key whose
outputs still hash to what was recorded. Otherwise it runs the stage, measures every artifact
the stage hands back with the one harness (accuracy, latency, params, MACs, size), checks the
gates and writes the manifest atomically. Once a stage has re-run, every later stage re-runs.

Exit codes: 0 success, 1 a stage failed, 2 bad input, 3 a gate failed (a failed INT8 quality gate
that an alternative build of it passes, its fallback or QAD build, is reported, not fatal).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from pipeline import dist, faults
from pipeline import gates as gates_mod
from pipeline import ship as ship_mod
from pipeline.errors import ConfigError, UserError
from pipeline.lock import WorkdirLock
from pipeline.manifest import (
    MANIFEST_NAME,
    METRIC_UNITS,
    Artifact,
    Manifest,
    ManifestError,
    StageRecord,
    artifact_record,
    verify_artifact,
)
from pipeline.schema import Config
from pipeline.stage import ScopedConfig, Stage, StageContext, StageUnavailable, load_stages, stages_for_target, targets
from pipeline.tasks import task_for

log = logging.getLogger(__name__)

EXIT_OK, EXIT_STAGE_FAILED, EXIT_BAD_INPUT, EXIT_GATE_FAILED = 0, 1, 2, 3

# Packages whose version changes can change an artifact; recorded and part of every cache key.
VERSIONED_PACKAGES = (
    "edge-mgd-pipeline", "torch", "torchvision", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu",
    "onnxslim", "openvino", "nncf", "torch-pruning", "tensorrt", "scikit-learn", "timm",
)


@dataclass
class RunOptions:
    """Which stages to consider: `--from`, `--until`, `--only`, `--force`, `--target`."""

    from_stage: str | None = None
    until_stage: str | None = None
    only: set[str] = field(default_factory=set)
    force: set[str] = field(default_factory=set)
    target: str | None = None  # a deployment target some stage ships to: run only the stages it needs
    rebuild_manifest: bool = False  # set a corrupt manifest aside and start a fresh one
    config_file: Path | None = None  # recorded in the manifest, so a message can name the config of a run dir


@dataclass
class RunOutcome:
    """What `run` did: the exit code and the manifest it left."""

    code: int
    manifest: Manifest
    visited: list[str]
    messages: list[str] = field(default_factory=list)


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that matter ('absent' when not installed)."""
    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def resolve_device(spec: str):
    """`auto` → CUDA when present else CPU; an explicit CUDA request without CUDA is bad input."""
    import torch

    if spec == "auto":
        return dist.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"pipeline.device = {spec!r} but no CUDA device is visible; use 'auto' or 'cpu'")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"pipeline.device = {spec!r} but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        return dist.local_device(dev)
    return torch.device(spec)


def cache_key(stage: Stage, cfg: Config, inputs: dict[str, Artifact], versions: dict[str, str]) -> str:
    """sha256 over everything that determines a stage's outputs."""
    payload = {
        "stage": stage.name,
        "config": {k: getattr(cfg, k).model_dump(mode="json") for k in stage.reads_for(cfg)},
        "seed": cfg.pipeline.seed,
        "task": cfg.pipeline.task,
        "inputs": {name: art.sha256 for name, art in sorted(inputs.items())},
        "versions": versions,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def select(stages: list[Stage], opts: RunOptions) -> list[str]:
    """Names of the stages this invocation may run, validating the option values."""
    names = [s.name for s in stages]
    for flag, value in (("--from", opts.from_stage), ("--until", opts.until_stage)):
        if value is not None and value not in names:
            raise ConfigError(f"{flag} {value!r}: no such stage; stages are {', '.join(names)}")
    for flag, values in (("--only", opts.only), ("--force", opts.force)):
        for v in values:
            if v not in names:
                raise ConfigError(f"{flag} {v!r}: no such stage; stages are {', '.join(names)}")
    known = targets(stages)
    if opts.target is not None and opts.target not in known:
        raise ConfigError(f"--target {opts.target!r}: no such target; targets are {', '.join(known)}")
    keep = stages_for_target(opts.target, stages) if opts.target else set(names)
    if opts.only:
        return [n for n in names if n in opts.only and n in keep]
    lo = names.index(opts.from_stage) if opts.from_stage else 0
    hi = names.index(opts.until_stage) if opts.until_stage else len(names) - 1
    if lo > hi:
        raise ConfigError(f"--from {opts.from_stage} comes after --until {opts.until_stage}")
    return [n for n in names[lo : hi + 1] if n in keep]


def preflight(cfg: Config, create: bool = True) -> None:
    """Every check of the user's input that can be made before anything runs: the data (through
    the task), then each enabled stage's own declared preflight, the device and the workdir.
    `create=False` (`validate`) checks the workdir could be made without making it.

    Raises :class:`ConfigError` (exit code 2) so that a typo never touches the manifest.
    """
    task_for(cfg).check_data(cfg.data, cfg.resolve("."))
    for stage in load_stages():
        if stage.preflight is not None and stage.enabled(cfg):
            stage.preflight(cfg)
    resolve_device(cfg.pipeline.device)
    (_check_writable if create else _check_could_write)(cfg.workdir, cfg.pipeline.workdir)


def _check_writable(workdir: Path, as_written: str) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"pipeline.workdir = {as_written!r} is not writable ({exc.strerror or exc})") from None


def _check_could_write(workdir: Path, as_written: str) -> None:
    """`_check_writable` without touching the disk: the workdir, or the nearest folder above it
    that exists, must be a folder this process may write into."""
    existing = Path(os.path.abspath(workdir))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        why = f"{existing} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = f"no permission to write in {existing}"
    else:
        return
    raise ConfigError(f"pipeline.workdir = {as_written!r} is not writable ({why})")


def _save(manifest: Manifest) -> None:
    """Write the manifest: rank 0 only under torchrun (every rank keeps the same records)."""
    if dist.is_main():
        manifest.save()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Runner:
    """Runs one config's stage chain against its workdir's manifest."""

    def __init__(self, cfg: Config, opts: RunOptions | None = None):
        self.cfg = cfg
        self.opts = opts or RunOptions()
        self.stages = load_stages()
        self.selected = select(self.stages, self.opts)

    def run(self) -> RunOutcome:
        """Run the selected stages; never raises for a stage failure (see the exit code)."""
        dist.init(self.cfg.pipeline.device)  # under torchrun: join the process group; rank 0 alone writes files
        preflight(self.cfg)
        # One writer per workdir; under torchrun rank 0 is the writer and holds the lock.
        lock = WorkdirLock(self.cfg.workdir) if dist.is_main() else contextlib.nullcontext()
        with lock:
            return self._run()

    def _load_manifest(self) -> Manifest:
        # A crash between writing the manifest's temp file and renaming it leaves the temp file;
        # the manifest itself is intact (old or new). We hold the lock: nobody else is writing.
        for stale in self.cfg.workdir.glob(f".{MANIFEST_NAME}.*.tmp"):
            stale.unlink(missing_ok=True)
        try:
            return Manifest.load(self.cfg.workdir)
        except ManifestError:
            if not self.opts.rebuild_manifest:
                raise
        path = self.cfg.workdir / MANIFEST_NAME
        aside = path.with_name(f"{MANIFEST_NAME}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, aside)  # kept for inspection, never deleted
        log.warning("manifest set aside as %s; starting a fresh one", aside.name)
        return Manifest(self.cfg.workdir)

    def _run(self) -> RunOutcome:
        cfg = self.cfg
        manifest = self._load_manifest()
        self._check_left_out_inputs(manifest)
        device = resolve_device(cfg.pipeline.device)
        versions = package_versions()
        task = task_for(cfg)
        # The units of the code that writes the metrics: the task's quality metrics, then the rest.
        manifest.model.metric_units = {**{m.name: {"unit": m.unit, "better": m.better} for m in task.quality},
                                       **METRIC_UNITS}
        manifest.model.pipeline = {
            "name": cfg.pipeline.name,
            "chain": [s.name for s in self.stages],
            "task": {"name": task.name, "metric": task.metric, "metrics": list(task.metrics),
                     "labels": {m.name: m.label for m in task.quality},
                     "axes": {m.name: m.axis_label for m in task.quality}, "history": task.history_metric},
            "config": cfg.model_dump(mode="json"),
            "seed": cfg.pipeline.seed,
            "device": str(device),
            "versions": versions,
            "updated": _now(),
        }
        if self.opts.config_file is not None:  # relative to the workdir: still right when the tree moves
            manifest.model.pipeline["config_file"] = os.path.relpath(Path(self.opts.config_file).resolve(),
                                                                     cfg.workdir.resolve())
        outcome = RunOutcome(code=EXIT_OK, manifest=manifest, visited=[])
        data_holder: dict[str, object] = {}
        rerun_rest = False  # once a stage re-ran, everything after it re-runs
        cached: list[str] = []
        # What this run did with each stage, for `status` and the report.
        manifest.model.pipeline["last_run"] = {"visited": outcome.visited, "cached": cached}

        for stage in self.stages:
            if stage.name not in self.selected:
                continue
            outcome.visited.append(stage.name)
            if not stage.enabled(cfg):
                manifest.stages[stage.name] = StageRecord(
                    status="skipped", reason=(stage.off_reason(cfg) if stage.off_reason is not None
                                              else f"disabled in the config ([{stage.name}] enabled = false)"),
                    config=getattr(cfg, stage.name).model_dump(mode="json"), artifacts=stage.artifacts, ended=_now(),
                )
                _save(manifest)
                continue
            inputs, problem = self._inputs(stage, manifest)
            if problem:
                self._record_failure(manifest, stage, problem, device, versions)
                outcome.code = EXIT_STAGE_FAILED
                outcome.messages.append(f"stage {stage.name}: {problem}")
                break
            key = cache_key(stage, cfg, inputs, versions)
            old = manifest.stages.get(stage.name)
            why = self._why_rerun(stage, old, key, rerun_rest, manifest)
            if why is None:
                log.info("stage %s: cached (key %s…), outputs verified", stage.name, key[:12])
                cached.append(stage.name)
                record, resume_files = old, []
            else:
                log.info("stage %s: running (%s)", stage.name, why)
                measured = {n: rec.metrics[n] for rec in manifest.stages.values() for n in inputs
                            if isinstance(rec.metrics.get(n), dict)}
                record, code, resume_files = self._execute(stage, key, inputs, device, versions, data_holder, measured)
                rerun_rest = True
                manifest.stages[stage.name] = record
                if code != EXIT_OK:
                    _save(manifest)
                    outcome.code = code
                    outcome.messages.append(f"stage {stage.name} {record.status}: {record.reason}")
                    break
            self._apply_gates(stage.name, record, manifest)
            manifest.stages[stage.name] = record
            _save(manifest)
            self._drop_resume_files(stage.name, resume_files)
            faults.point("stage-recorded")

        manifest.model.ship = ship_mod.choose(manifest.model, task.metric)
        _save(manifest)
        if outcome.code == EXIT_OK:
            failed, made_good = gates_mod.blocking(manifest.model)
            outcome.messages.extend(made_good)
            if failed:
                outcome.code = EXIT_GATE_FAILED
                outcome.messages.extend(g.message for g in failed)
            measured = {a for rec in manifest.stages.values() for a, m in rec.metrics.items() if isinstance(m, dict)}
            for name in gates_mod.unmeasured_budgets(cfg.gates, measured):
                outcome.messages.append(f"gates.latency_ms.{name}: not measured in this run (no stage produced it)")
        return outcome

    # -- helpers -------------------------------------------------------------------------

    def _check_left_out_inputs(self, manifest: Manifest) -> None:
        """`--from`/`--only` leave stages out: each input they would have made must already be
        recorded in the manifest. Checked before anything runs or is written, so a missing one is
        bad input (exit 2), not a failed stage in the manifest. (Whether a recorded file is still
        intact is checked when the stage runs.)"""
        by_name = {s.name: s for s in self.stages}
        made_by = {art: s.name for s in self.stages for art in s.outputs}
        available = set(manifest.artifact_index())
        for stage in self.stages:
            if stage.name not in self.selected or not stage.enabled(self.cfg):
                continue
            for spec in stage.inputs:
                names = spec.rstrip("?").split("|")
                if spec.endswith("?") or available.intersection(names):
                    continue
                producer = next((made_by[n] for n in names if n in made_by), "?")
                if producer in self.selected and not by_name[producer].enabled(self.cfg):
                    raise ConfigError(
                        f"{stage.name} needs {names[0]!r} from stage {producer}, which is disabled ([{producer}] "
                        f"enabled = false) and has not finished in {self.cfg.workdir}; enable {producer} or "
                        f"disable {stage.name}"
                    )
                if self.opts.only:
                    flag, fix = "--only " + " --only ".join(self.selected), f"add --only {producer}"
                elif self.opts.from_stage:
                    flag, fix = f"--from {self.opts.from_stage}", f"use --from {producer}"
                else:
                    flag, fix = f"--target {self.opts.target}", "run the whole chain once"
                raise ConfigError(
                    f"{flag}: stage {stage.name} needs {names[0]!r} from stage {producer}, which this run leaves "
                    f"out and {self.cfg.workdir} has not finished; {fix}, or run without {flag.split()[0]} first"
                )
            available.update(stage.outputs)

    def _inputs(self, stage: Stage, manifest: Manifest) -> tuple[dict[str, Artifact], str | None]:
        """Resolve and re-hash the stage's input artifacts from the manifest."""
        index = manifest.artifact_index()
        found: dict[str, Artifact] = {}
        for spec in stage.inputs:
            optional = spec.endswith("?")  # "teacher_onnx?": used when some stage produced it
            for name in spec.rstrip("?").split("|"):
                if name in index:
                    producer, art = index[name]
                    bad = verify_artifact(art, manifest.workdir)
                    if bad:
                        return found, f"input {name!r} from stage {producer} cannot be trusted: {bad}; re-run {producer}"
                    found[name] = art
                    break
            else:
                if not optional:
                    return found, f"input {spec!r} is not available: run the stage that produces it first"
        return found, None

    def _why_rerun(self, stage: Stage, old: StageRecord | None, key: str, rerun_rest: bool, manifest: Manifest) -> str | None:
        if stage.name in self.opts.force:
            return "forced"
        if old is None:
            return "no record"
        # `unavailable` is cached too: installing the missing package changes the versions in the key.
        if old.status not in ("ok", "gate_failed", "unavailable"):
            return f"last status {old.status}"
        if old.key != key:
            return "config, inputs or versions changed"
        if rerun_rest:
            return "an earlier stage re-ran"
        for art in old.outputs.values():
            bad = verify_artifact(art, manifest.workdir)
            if bad:
                log.warning("stage %s: %s", stage.name, bad)
                return f"output {bad}"
        return None

    def _context(self, stage: Stage, key: str, inputs: dict[str, Artifact], device, data_holder,
                 measured: dict[str, dict] | None = None) -> StageContext:
        ctx = StageContext(
            cfg=ScopedConfig(self.cfg, stage.name, stage.reads_for(self.cfg)), name=stage.name, workdir=self.cfg.workdir,
            inputs={n: self.cfg.workdir / a.path for n, a in inputs.items()}, device=device, key=key,
            measured=dict(measured or {}),
        )
        if "data" in data_holder:
            ctx._data = data_holder["data"]  # load the dataset once per run
        return ctx

    def _data(self, ctx: StageContext):
        """The run's dataset for measuring (the runner's job, whatever tables the stage reads)."""
        if ctx._data is None:
            from pipeline.data import load_bundle

            ctx._data = load_bundle(ctx.task, self.cfg.data, self.cfg.pipeline.seed, self.cfg.resolve("."))
        return ctx._data

    def _execute(self, stage, key, inputs, device, versions, data_holder,
                 measured: dict[str, dict] | None = None) -> tuple[StageRecord, int, list[Path]]:
        """Run one stage and measure what it produced: (its record, exit code, the resume files it
        used, to delete once the record is saved when the stage succeeded)."""
        import torch

        from pipeline.evaluate import measure

        started, t0 = _now(), time.perf_counter()
        ctx = self._context(stage, key, inputs, device, data_holder, measured)
        base = dict(
            key=key, config={k: getattr(self.cfg, k).model_dump(mode="json") for k in stage.reads_for(self.cfg)},
            inputs=inputs, started=started, seed=self.cfg.pipeline.seed, device=str(device), versions=versions,
            artifacts=stage.artifacts,
        )
        try:
            result = stage.run(ctx)
            undeclared = (set(result.outputs) | set(result.measure)) - set(stage.outputs)
            if undeclared:  # a programming error in the stage: one name per concept, declared up front
                raise RuntimeError(f"stage produced undeclared artifacts {sorted(undeclared)}")
            root = self.cfg.workdir.resolve()
            outside = [n for n, p in result.outputs.items() if not Path(p).resolve().is_relative_to(root)]
            if outside:  # artifacts live in the workdir: a path must never write (or point) elsewhere
                raise RuntimeError(f"artifacts {sorted(outside)} are outside the workdir {root}")
            dist.barrier()  # rank 0 has written the outputs that every rank now hashes
            data = self._data(ctx)
            data_holder["data"] = data
            metrics = {k: dict(v) for k, v in result.metrics.items()}
            # Measuring is rank 0's job; the others wait at the barrier below.
            for name, m in (result.measure.items() if dist.is_main() else ()):
                log.info("stage %s: measuring %s on %s (%s)", stage.name, name, m.runtime.name, m.runtime.device)
                threads = torch.get_num_threads()
                try:
                    measured = measure(
                        m.runtime, val_loader=data.loader("val", self.cfg.data.batch_size),
                        input_shape=data.input_shape, batch_size=self.cfg.data.batch_size,
                        bench=self.cfg.bench, task=ctx.task, num_classes=data.num_classes,
                        model=m.model, artifact_path=m.path,
                    )
                finally:
                    torch.set_num_threads(threads)  # [bench] threads must not leak into training
                # The image count is every quality figure's resolution (360 images: 0.28 pt of accuracy).
                metrics[name] = {**measured, **_val_images(data), **metrics.get(name, {})}
            dist.barrier()
            outputs = {n: artifact_record(p, self.cfg.workdir) for n, p in result.outputs.items()}
        except StageUnavailable as exc:
            return StageRecord(status="unavailable", reason=str(exc), ended=_now(),
                               seconds=time.perf_counter() - t0, **base), EXIT_OK, []
        except UserError as exc:
            return StageRecord(status="failed", reason=str(exc), ended=_now(),
                               seconds=time.perf_counter() - t0, **base), EXIT_BAD_INPUT, []
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.debug("stage %s failed", stage.name, exc_info=True)
                return StageRecord(status="failed", reason=f"{type(exc).__name__}: {exc}", ended=_now(),
                                   seconds=time.perf_counter() - t0, **base), EXIT_STAGE_FAILED, []
            # Writes are atomic, so nothing half-written was left; earlier artifacts are intact.
            reason = (f"disk full while writing {exc.filename or 'an artifact'} ({exc.strerror}); free space under "
                      f"{self.cfg.workdir} and run the same command again: finished stages are kept")
            return StageRecord(status="failed", reason=reason, ended=_now(),
                               seconds=time.perf_counter() - t0, **base), EXIT_BAD_INPUT, []
        except Exception as exc:  # a stage failure is recorded, never lost in a traceback
            log.debug("stage %s failed", stage.name, exc_info=True)
            return StageRecord(status="failed", reason=f"{type(exc).__name__}: {exc}", ended=_now(),
                               seconds=time.perf_counter() - t0, **base), EXIT_STAGE_FAILED, []
        record = StageRecord(
            status="ok", outputs=outputs, metrics=metrics, history=result.history,
            reference=sorted(n for n in result.measure if stage.artifacts[n].reference),
            warnings=result.warnings, unavailable=result.unavailable, commands=result.commands,
            ended=_now(), seconds=time.perf_counter() - t0, **base,
        )
        for w in result.warnings:
            log.warning("stage %s: %s", stage.name, w)
        return record, EXIT_OK, ctx.resume_files

    def _drop_resume_files(self, name: str, files: list[Path]) -> None:
        """Delete a finished stage's resume checkpoints. Called only after the manifest holding
        its record was written (atomically, fsynced): a kill before that leaves them to resume
        from; a kill after it finds the stage cached and never needs them."""
        if self.cfg.pipeline.keep_checkpoints or not dist.is_main():
            return
        freed = 0
        for path in files:
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            freed += size
        if freed:
            log.info("stage %s: deleted its resume checkpoints (%.1f MB; [pipeline] keep_checkpoints = true keeps them)",
                     name, freed / 1e6)

    def _record_failure(self, manifest: Manifest, stage: Stage, reason: str, device, versions) -> None:
        manifest.stages[stage.name] = StageRecord(
            status="failed", reason=reason, ended=_now(), seed=self.cfg.pipeline.seed,
            device=str(device), versions=versions, artifacts=stage.artifacts,
        )
        _save(manifest)

    def _apply_gates(self, name: str, record: StageRecord, manifest: Manifest) -> None:
        """Add speedup vs teacher to every measured artifact, then evaluate the gates."""
        teacher_name, teacher = _teacher_metrics(record, manifest)
        for art, m in record.metrics.items():
            if isinstance(m, dict) and art != teacher_name:
                s = gates_mod.speedup(teacher, m)
                if s is not None:
                    m["speedup_vs_teacher"] = s
        # An INT8 build's FP32 counterpart may come from an earlier stage (trt_qdq vs onnx).
        measured = {a: m for rec in manifest.stages.values() for a, m in rec.metrics.items() if isinstance(m, dict)}
        record.gates = gates_mod.check_stage(record, teacher, self.cfg.gates, task_for(self.cfg).metric,
                                             measured={**measured, **record.metrics})
        failed = any(g.passed is False for g in record.gates)
        if record.status in ("ok", "gate_failed"):
            record.status = "gate_failed" if failed else "ok"
        for g in record.gates:
            (log.warning if g.passed is False else log.info)("%s", g.message)


def _val_images(data) -> dict[str, int]:
    """`{"val_images": N}`, the validation split's size; {} for a split without a length."""
    try:
        return {"val_images": len(data.val)}
    except TypeError:
        return {}


def _teacher_metrics(record: StageRecord, manifest: Manifest) -> tuple[str | None, dict | None]:
    """The teacher in torch eager (the artifact declared as the teacher's torch build): its name
    and metrics, looked up in this record first, then in the manifest."""
    for rec in (record, *manifest.stages.values()):
        for art, role in rec.artifacts.items():
            if role.model == "teacher" and role.runtime == "torch" and isinstance(rec.metrics.get(art), dict):
                return art, rec.metrics[art]
    return None, None
